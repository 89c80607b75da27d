"""lowrank.param_groups (LoRA+): groups and learning rates, checked against PEFT's create_loraplus_optimizer."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import tiny_llama
from torch import nn

import lowrank


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(12, 10)
        self.v = nn.Linear(12, 10)
        self.head = nn.Linear(10, 5)


def _lr_by_param(groups) -> dict[int, tuple[float, float]]:
    out = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in out, "a parameter in two groups"
            out[id(p)] = (g["lr"], g["weight_decay"])
    return out


@pytest.mark.parametrize("dora", [False, True])
def test_matches_peft_loraplus_per_parameter(dora):
    """Same model, same adapters: every trainable tensor gets the learning rate PEFT's LoRA+ gives it."""
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    torch.manual_seed(0)
    base = tiny_llama()
    ours = lowrank.inject(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, alpha=8, dora=dora)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          use_dora=dora))  # fmt: skip
    lr, ratio, wd = 1e-3, 16.0, 0.01
    groups = lowrank.param_groups(ours, lr, loraplus_ratio=ratio, weight_decay=wd)
    opt = create_loraplus_optimizer(peft, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                    loraplus_weight_decay=wd)  # fmt: skip
    peft_lr = {}
    names = {id(p): n for n, p in peft.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            # PEFT's names: ...q_proj.lora_A.default.weight / ...lora_magnitude_vector.default.weight
            n = names[id(p)].removeprefix("base_model.model.").replace(".default.weight", "")
            peft_lr[n] = (g["lr"], g["weight_decay"])
    ours_lr = _lr_by_param(groups)
    # Our names: ...q_proj.adapters.default.lora_A -> the same key as PEFT's above.
    mine = {n.replace(".adapters.default.", "."): ours_lr[id(p)] for n, p in ours.named_parameters() if p.requires_grad}
    assert mine == peft_lr
    expected_b = {n for n in mine if n.endswith(("lora_B", "lora_magnitude_vector"))}
    assert {n for n, (g_lr, _) in mine.items() if g_lr == lr * ratio} == expected_b
    assert len(expected_b) == (8 if dora else 4)  # 2 layers x 2 targets, B (+ magnitude)


def test_groups_several_adapters_and_other_trainables():
    model = lowrank.inject(_Net(), ["q", "v"], r=2, alpha=4)
    lowrank.inject(model, ["q"], r=3, alpha=3, adapter_name="b")
    lowrank.set_adapter(model, ["default", "b"])
    model.head.bias.requires_grad_(True)  # an unfrozen 1-D tensor: lr, no weight decay
    model.head.weight.requires_grad_(True)
    groups = {g["name"]: g for g in lowrank.param_groups(model, 0.1, loraplus_ratio=4, weight_decay=0.5)}
    assert set(groups) == {"lora_A", "lora_B", "other", "other_no_decay"}
    layers = dict(lowrank.lora_layers(model))
    a_params = [layers["q"].adapters["default"].lora_A, layers["q"].adapters["b"].lora_A,
                layers["v"].adapters["default"].lora_A]  # fmt: skip
    assert {id(p) for p in groups["lora_A"]["params"]} == {id(p) for p in a_params}
    assert len(groups["lora_B"]["params"]) == 3
    assert groups["lora_B"]["lr"] == pytest.approx(0.4) and groups["lora_A"]["lr"] == 0.1
    assert groups["other"]["params"] == [model.head.weight] and groups["other"]["weight_decay"] == 0.5
    assert groups["other_no_decay"]["params"] == [model.head.bias] and groups["other_no_decay"]["weight_decay"] == 0
    # Frozen tensors are left out (an inactive adapter's A and B do not require grad).
    lowrank.set_adapter(model, "b")
    groups = {g["name"]: g for g in lowrank.param_groups(model, 0.1)}
    assert {id(p) for p in groups["lora_A"]["params"]} == {id(layers["q"].adapters["b"].lora_A)}
    assert groups["lora_B"]["lr"] == 0.1  # no ratio: B at lr


def test_an_optimizer_step_uses_the_group_rates():
    """SGD, one step: A moves by lr * grad and B by lr * ratio * grad (the groups reach the optimizer)."""
    torch.manual_seed(0)
    model = lowrank.inject(_Net(), ["q"], r=2, alpha=2)
    layer = dict(lowrank.lora_layers(model))["q"]
    with torch.no_grad():
        layer.lora_B.normal_()
    opt = torch.optim.SGD(lowrank.param_groups(model, 0.01, loraplus_ratio=8))
    model.q(torch.randn(4, 12)).square().sum().backward()
    a0, b0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    ga, gb = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    opt.step()
    torch.testing.assert_close(layer.lora_A.detach(), a0 - 0.01 * ga, rtol=0, atol=1e-7)  # float32 axpy
    torch.testing.assert_close(layer.lora_B.detach(), b0 - 0.08 * gb, rtol=0, atol=1e-7)


@pytest.mark.parametrize("kwargs, match", [
    ({"loraplus_ratio": 0}, "loraplus_ratio must be a finite number > 0"),
    ({"loraplus_ratio": -2.0}, "loraplus_ratio must be a finite number > 0"),
    ({"loraplus_ratio": float("inf")}, "loraplus_ratio must be a finite number > 0"),
    ({"lr": 0.0}, "lr must be a finite number > 0"),
    ({"weight_decay": -1e-3}, "weight_decay must be a finite number >= 0"),
])  # fmt: skip
def test_bad_arguments(kwargs, match):
    model = lowrank.inject(_Net(), ["q"], r=2)
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    args = {"lr": 1e-3} | kwargs
    with pytest.raises(ValueError, match=match):
        lowrank.param_groups(model, args.pop("lr"), **args)
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags


def test_nothing_trainable():
    model = _Net().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        lowrank.param_groups(model, 1e-3)
