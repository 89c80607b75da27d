"""LoRA on MoE experts stored as 3-D parameters (lowrank/lora_experts.py, inject(target_parameters=...)).

References: the base model with each adapted expert weight replaced by the dense ``W_e + scale * B_e A_e``
(float64, transformers' own eager expert loop), and PEFT 0.21's ``target_parameters`` (files, logits and
gradients both ways) on Mixtral (weights (E, out, in)) and gpt-oss (transposed (E, in, out), with biases).
Tolerances: float64 model vs float64 dense reference, 1e-10 (summation order only); float32 vs PEFT's float32,
1e-5 (float32 rounding of O(1) logits; the adapters move them by > 0.05).
"""

import copy
import warnings

import peft
import pytest
import torch
from _helpers import assert_unchanged, snapshot
from _moe_models import EXPERT_PARAMS, FAMILIES, experts_of, tiny_moe
from safetensors.torch import load_file

import lowrank
from lowrank.lora_experts import LoRAExperts

F64 = {"atol": 1e-10, "rtol": 1e-10}  # float64 both sides: summation order only
F32 = {"atol": 1e-5, "rtol": 1e-5}  # float32 both sides, different op order


def _ids():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lowrank.lora_layers(model):
            for adapter in layer.adapters.values():
                for p in adapter.parameters():
                    p.normal_(0, 0.3, generator=g)
    return model


def _dense(base, model, names=("default",)):
    """``base`` with every adapted expert weight replaced by W + sum of the adapters' dense per-expert deltas."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in lowrank.lora_layers(model):
            if not isinstance(layer, LoRAExperts):
                continue
            experts = ref.get_submodule(name)
            for n in names:
                adapter = layer.adapters[n]
                for p in adapter.params:
                    a, b = adapter.lora_A[p].double(), adapter.lora_B[p].double()
                    delta = adapter.scale * torch.bmm(b, a)  # (E, out, in)
                    w = getattr(experts, p)
                    w += (delta.transpose(1, 2) if experts.is_transposed else delta).to(w.dtype)
    return ref


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_merge_disable_eject_match_the_dense_weights(family):
    base = tiny_moe(family).double()
    sd0 = {k: v.clone() for k, v in base.state_dict().items()}
    model = lowrank.inject(copy.deepcopy(base), [], target_parameters=EXPERT_PARAMS, r=3, alpha=6)
    ids = _ids()
    torch.testing.assert_close(_logits(model, ids), _logits(base, ids), **F64)  # B = 0
    _randomize(model)
    ref = _logits(_dense(base, model), ids)
    assert (ref - _logits(base, ids)).abs().max() > 0.05
    unmerged = _logits(model, ids)
    torch.testing.assert_close(unmerged, ref, **F64)
    lowrank.merge(model)
    torch.testing.assert_close(_logits(model, ids), ref, **F64)
    with lowrank.disabled(model):
        torch.testing.assert_close(_logits(model, ids), _logits(base, ids), **F64)
    assert all(torch.equal(v, sd0[k]) for k, v in lowrank.eject(copy.deepcopy(model)).state_dict().items())
    lowrank.unmerge(model)
    assert torch.equal(_logits(model, ids), unmerged)
    lowrank.eject(model)
    assert all(torch.equal(v, sd0[k]) for k, v in model.state_dict().items())


def test_several_adapters_sum_and_dropout_trains():
    base = tiny_moe("qwen3_moe").double()
    model = lowrank.inject(copy.deepcopy(base), [], target_parameters=EXPERT_PARAMS, r=2, alpha=2)
    lowrank.inject(model, [], target_parameters=["down_proj"], r=3, alpha=6, adapter_name="b", dropout=0.5)
    _randomize(model)
    ids = _ids()
    lowrank.set_adapter(model, ["default", "b"])
    model.eval()  # no dropout in eval mode: the dense reference with both adapters
    torch.testing.assert_close(_logits(model, ids), _logits(_dense(base, model, ("default", "b")), ids), **F64)
    model.train()
    lowrank.set_adapter(model, "b")
    out = model(ids).logits
    assert not torch.allclose(out.double(), _logits(_dense(base, model, ("b",)), ids))  # dropout is on
    out.square().mean().backward()
    layer = experts_of(model)
    assert layer.adapters["b"].lora_A["down_proj"].grad.abs().max() > 0
    assert layer.adapters["default"].lora_A["gate_up_proj"].grad is None  # inactive adapter: frozen


def _peft(base, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, **kw))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3, generator=g)
    return pm


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_peft_target_parameters_file_loads_with_same_logits_and_gradients(tmp_path, family):
    base = tiny_moe(family)
    theirs = _peft(base, target_modules=["q_proj"], target_parameters=EXPERT_PARAMS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path)
    ours = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    adapted = sorted(n for n, _ in lowrank.lora_layers(ours))
    assert adapted == ["model.layers.0.mlp.experts", "model.layers.0.self_attn.q_proj"]
    ids = _ids()
    expected = _logits(theirs, ids)
    assert (expected - _logits(base, ids)).abs().max() > 0.05
    torch.testing.assert_close(_logits(ours, ids), expected, **F32)
    ours(ids).logits.square().mean().backward()
    theirs(ids).logits.square().mean().backward()
    layer = experts_of(ours)
    wrapper = theirs.base_model.model.model.layers[0].mlp.experts  # PEFT's outer ParamWrapper: down_proj
    e, r = 4, 2
    grad_a = wrapper.lora_A["default"].weight.grad.reshape(e, r, -1)  # PEFT's stacked layout, see peft_layout.py
    grad_b = wrapper.lora_B["default"].weight.grad.reshape(-1, r, e).permute(2, 0, 1)
    torch.testing.assert_close(layer.adapters["default"].lora_A["down_proj"].grad, grad_a, **F32)
    torch.testing.assert_close(layer.adapters["default"].lora_B["down_proj"].grad, grad_b, **F32)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_our_file_loads_in_peft_with_same_logits(tmp_path, family):
    base = tiny_moe(family)
    # v_proj gets r=4 through rank_pattern, the experts r=2: the config's patterns must resolve in PEFT too.
    model = lowrank.inject(copy.deepcopy(base), ["v_proj"], target_parameters=EXPERT_PARAMS, r=2, alpha=4,
                           rank_pattern={"v_proj": 4})  # fmt: skip
    _randomize(model)
    lowrank.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    stem = "base_model.model.model.layers.0.mlp.experts"
    assert {f"{stem}.base_layer.lora_A.weight", f"{stem}.lora_B.weight"} <= keys  # PEFT's nesting (gate_up inner)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert sorted(theirs.targeted_module_names) == ["model.layers.0.self_attn.v_proj"]
    assert len(theirs.targeted_parameter_names) == 2
    torch.testing.assert_close(_logits(theirs, ids := _ids()), _logits(model, ids), **F32)
    again = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(_logits(again, ids), _logits(model, ids))
    replaced = _randomize(lowrank.load_adapter(copy.deepcopy(base), tmp_path), seed=7)
    lowrank.load_adapter(replaced, tmp_path)  # same adapter name and layers: only the weights are replaced
    assert torch.equal(_logits(replaced, ids), _logits(model, ids))


def test_all_linear_matches_peft_and_warns_about_experts():
    base = tiny_moe("mixtral")
    with pytest.warns(UserWarning, match=r"mlp\.experts\.gate_up_proj, .*target_parameters"):
        model = lowrank.inject(copy.deepcopy(base), "all-linear")
    theirs = _peft(base, target_modules="all-linear")
    assert sorted(n for n, _ in lowrank.lora_layers(model)) == sorted(theirs.targeted_module_names)


def test_bad_targets_are_refused_and_model_unchanged():
    model = tiny_moe("mixtral")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"\['experts.up_proj'\] matched no parameter .*3-D parameters: model"):
        lowrank.inject(model, [], target_parameters=["experts.up_proj"])
    with pytest.raises(ValueError, match=r"matched model\.layers\.0\.mlp\.gate\.weight, a 2-D parameter"):
        lowrank.inject(model, ["q_proj"], target_parameters=["mlp.gate.weight"])
    with pytest.raises(TypeError, match="must be a list"):
        lowrank.inject(model, [], target_parameters="mlp.experts.down_proj")
    assert_unchanged(model, snap)
    lowrank.inject(model, [], target_parameters=EXPERT_PARAMS)
    with pytest.raises(ValueError, match=r"\['default'\] in model\.layers\.0\.mlp\.experts are ExpertsAdapter"):
        with lowrank.mixed_batch(model, ["default", None]):
            pass


def test_expert_count_mismatch_with_a_file(tmp_path):
    model = _randomize(lowrank.inject(tiny_moe("mixtral"), [], target_parameters=EXPERT_PARAMS, r=2))
    lowrank.save_adapter(model, tmp_path)
    other = tiny_moe("mixtral", num_local_experts=6)
    snap = snapshot(other)
    with pytest.raises(
        ValueError, match=r"gate_up_proj has lora_A \(8, 32\).*the model has 6 experts .* expected \(12, 32\)"
    ):
        lowrank.load_adapter(other, tmp_path)
    assert_unchanged(other, snap)


def test_save_merged_writes_the_dense_expert_weights(tmp_path):
    base = tiny_moe("gpt_oss")
    model = _randomize(lowrank.inject(copy.deepcopy(base), ["q_proj"], target_parameters=EXPERT_PARAMS, r=2))
    path = lowrank.save_merged(model, tmp_path / "merged.safetensors")
    restored = copy.deepcopy(base)
    restored.load_state_dict(load_file(path), strict=True)
    torch.testing.assert_close(_logits(restored, ids := _ids()), _logits(model, ids), **F32)
