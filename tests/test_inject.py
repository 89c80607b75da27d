"""Model surgery: target forms, freezing, adapter parameters by type, merge/unmerge/eject/disabled, errors."""

import pytest
import torch
import torch.nn as nn
from _helpers import assert_unchanged, snapshot

import lowrank
from lowrank import LoRALinear


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.norm = nn.LayerNorm(d)
        # Names containing "lora" that are NOT adapters: must never be picked up by name matching.
        self.lora_gate = nn.Linear(d, d)
        self.lora_scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        h = self.norm(x)
        return x + self.v_proj(torch.tanh(self.q_proj(h))) * torch.sigmoid(self.lora_gate(h)) * self.lora_scale


class Toy(nn.Module):
    def __init__(self, d: int = 12, vocab: int = 20):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def names(model) -> list[str]:
    return [n for n, _ in lowrank.lora_layers(model)]


@pytest.mark.parametrize(
    "targets,expected",
    [
        (["q_proj"], ["layers.0.q_proj", "layers.1.q_proj"]),
        (["layers.1.v_proj", "0.q_proj"], ["layers.0.q_proj", "layers.1.v_proj"]),
        (r"layers\.\d\.(q|v)_proj", ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]),
        (
            lambda name, m: isinstance(m, nn.Linear) and m.bias is None and "lm_head" not in name,
            ["layers.0.v_proj", "layers.1.v_proj"],
        ),
        ("all-linear", [f"layers.{i}.{p}" for i in range(2) for p in ("q_proj", "v_proj", "lora_gate")]),
        (["lm_head"], ["lm_head"]),  # the head only when named explicitly
    ],
)
def test_target_forms(targets, expected):
    model = Toy()
    assert lowrank.inject(model, targets, r=2) is model
    assert names(model) == expected


def test_exclude_wins_and_list_entries_are_suffixes_not_substrings():
    model = Toy()
    lowrank.inject(model, "all-linear", exclude=["layers.0.lora_gate", "v_proj"])
    assert names(model) == ["layers.0.q_proj", "layers.1.q_proj", "layers.1.lora_gate"]
    # "proj" is a substring of q_proj but not a "."-suffix of any name: a typo-like entry must not match.
    with pytest.raises(ValueError, match="matched no module"):
        lowrank.inject(Toy(), ["proj"])


def test_freezes_everything_but_the_adapters_and_finds_them_by_type():
    model = Toy()
    lowrank.inject(model, ["q_proj", "v_proj"], r=3, alpha=6.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # Parameter names are the modules' (adapters.<name>.lora_A); state-dict keys are shorter (see below).
    assert trainable == [
        f"layers.{i}.{p}.adapters.default.lora_{ab}" for i in range(2) for p in ("q_proj", "v_proj") for ab in "AB"
    ]
    params = lowrank.adapter_parameters(model)
    layers = dict(lowrank.lora_layers(model))
    assert params == [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]
    # The user's own "lora_gate" / "lora_scale" are not adapters even though their names say "lora".
    ids = {id(p) for p in params}
    assert id(model.layers[0].lora_scale) not in ids and id(model.layers[0].lora_gate.weight) not in ids
    sd = lowrank.adapter_state_dict(model)
    assert list(sd) == [f"layers.{i}.{p}.lora_{ab}" for i in range(2) for p in ("q_proj", "v_proj") for ab in "AB"]
    full = model.state_dict()
    assert all(torch.equal(sd[k], full[k]) for k in sd)
    assert sd["layers.0.q_proj.lora_A"].data_ptr() == layers["layers.0.q_proj"].lora_A.data_ptr()


def test_second_adapter_on_other_layers_is_active_alone_until_set_adapter():
    model = Toy()
    lowrank.inject(model, ["q_proj"])
    lowrank.inject(model, ["v_proj"], r=4, adapter_name="b")
    assert len(lowrank.adapter_parameters(model)) == 8 and len(lowrank.adapter_parameters(model, "b")) == 4
    assert [p.requires_grad for p in lowrank.adapter_parameters(model)] == [False, False, True, True] * 2
    lowrank.set_adapter(model, ["default", "b"])
    assert all(p.requires_grad for p in lowrank.adapter_parameters(model))


def test_outputs_unchanged_after_inject_and_state_dict_names():
    model = Toy().eval()
    ids = torch.randint(0, 20, (2, 5))
    before = model(ids)
    keys = list(model.state_dict())
    lowrank.inject(model, "all-linear", r=2)
    assert torch.equal(model(ids), before)  # B = 0
    after = list(model.state_dict())
    adapter_keys = [k for k in after if k not in keys]
    assert [k for k in after if k in keys] == keys  # original names and order, no ".base."
    assert len(adapter_keys) == 12 and all(k.endswith((".lora_A", ".lora_B")) for k in adapter_keys)
    # A checkpoint of the original model loads into the injected one with strict=True.
    fresh = Toy()
    result = model.load_state_dict(fresh.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(model.layers[0].q_proj.weight, fresh.layers[0].q_proj.weight)


def train_steps(model, steps=3):
    opt = torch.optim.AdamW(lowrank.adapter_parameters(model), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randint(0, 20, (4, 6))).logsumexp(-1).mean().backward()
        opt.step()


def test_train_merge_unmerge_disabled_eject_roundtrip():
    model = Toy()
    original_modules = {n: m for n, m in model.named_modules()}
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 20, (3, 7))
    base_out = model.eval()(ids)
    lowrank.inject(model, ["q_proj", "v_proj", "lm_head"], r=4, alpha=8.0)
    model.train()
    train_steps(model)
    model.eval()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd0.items())  # only adapters moved
    adapted = model(ids)
    assert not torch.allclose(adapted, base_out, atol=1e-4)

    lowrank.merge(model)
    lowrank.merge(model)
    merged = model(ids)
    # float32, 2 blocks + head of width 12-20: a few ulps of the logits' size (~1) each layer.
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    with lowrank.disabled(model):
        assert torch.equal(model(ids), base_out)
    lowrank.unmerge(model)
    lowrank.unmerge(model)
    assert torch.equal(model(ids), adapted)  # unmerge restored the exact weights

    lowrank.merge(model)  # eject must unmerge first
    assert lowrank.eject(model) is model
    assert {n: m for n, m in model.named_modules()} == original_modules  # the very same module objects
    sd = model.state_dict()
    assert list(sd) == list(sd0) and all(torch.equal(sd[k], sd0[k]) for k in sd0)
    assert torch.equal(model(ids), base_out)


def test_disabled_restores_previous_flags_even_on_error():
    model = lowrank.inject(Toy(), ["q_proj"])
    model.layers[1].q_proj.enabled = False
    with pytest.raises(KeyError), lowrank.disabled(model) as m:
        assert m is model and not any(layer.enabled for _, layer in lowrank.lora_layers(model))
        raise KeyError("boom")
    assert [layer.enabled for _, layer in lowrank.lora_layers(model)] == [True, False]


def test_eject_of_a_bare_layer_returns_its_base():
    base = nn.Linear(3, 3)
    assert lowrank.eject(LoRALinear(base)) is base


def test_bf16_model_gets_float32_adapters_on_its_device():
    model = Toy().to(torch.bfloat16)
    lowrank.inject(model, ["q_proj"])
    layer = model.layers[0].q_proj
    assert layer.lora_A.dtype == torch.float32 and layer.lora_A.device == layer.base.weight.device
    assert model(torch.randint(0, 20, (1, 3))).dtype == torch.bfloat16
    lowrank.inject(model, ["v_proj"], adapter_dtype=torch.bfloat16, adapter_name="bf16")
    assert model.layers[0].v_proj.lora_B.dtype == torch.bfloat16


def test_summary_numbers():
    model = Toy(d=12, vocab=20)
    total = sum(p.numel() for p in model.parameters())
    lowrank.inject(model, ["q_proj"], r=2, alpha=3.0)
    lowrank.inject(model, ["lm_head"], r=4, alpha=4.0, rslora=True, adapter_name="head")
    lowrank.set_adapter(model, ["default", "head"])  # both trainable
    adapter = 2 * 2 * (12 + 12) + 4 * (12 + 20)
    frozen_bytes = 4 * total + 4 * sum(b.numel() for b in model.buffers())
    text = lowrank.summary(model)
    assert f"trainable {adapter:,} / total {total + adapter:,} parameters" in text
    assert f"({100 * adapter / (total + adapter):.4f}%)" in text
    assert "adapted layers: 3" in text
    assert "adapters: ['default', 'head']; active: ['default', 'head']" in text
    assert "'default': 2 x Linear, r=2, alpha=3, scale=1.5, dropout=0" in text
    assert "'head': 1 x Linear, r=4, alpha=4, scale=2, dropout=0" in text
    assert f"frozen parameters and buffers: {frozen_bytes:,} bytes" in text
    lowrank.merge(model)
    # Merged: each dense layer also holds its set-aside original weight (2 q_proj of 12x12, the 20x12 head).
    extra = 4 * (2 * 12 * 12 + 20 * 12)
    assert f"frozen parameters and buffers: {frozen_bytes + extra:,} bytes" in lowrank.summary(model)
    assert "'default': 2 x Linear, r=2, alpha=3, scale=1.5, dropout=0, merged" in lowrank.summary(model)


# --- errors: each leaves the model exactly as it was ----------------------------------------------------------


@pytest.mark.parametrize(
    "targets,kwargs,error,match",
    [
        (["k_proj"], {}, ValueError, r"matched no module of Toy.*leaf names \['q_proj', 'v_proj', 'lora_gate'"),
        (["q_proj", "qproj"], {}, ValueError, r"targets \['qproj'\] matched no module"),
        (r"layers\.0", {}, ValueError, r"not linear layers: \['layers.0 \(Block\)'\]"),
        (["norm"], {}, ValueError, r"not linear layers: \['layers.0.norm \(LayerNorm\)'"),
        (["q_proj"], {"r": 0}, ValueError, "r must be an int >= 1"),
        (["q_proj"], {"alpha": -1.0}, ValueError, "alpha must be a finite number > 0"),
        (["q_proj"], {"dropout": 1.5}, ValueError, r"dropout must be a probability"),
        (["q_proj"], {"adapter_dtype": torch.int8}, TypeError, "adapter_dtype"),
        ("(", {}, ValueError, "not a valid regular expression"),
        (42, {}, TypeError, "targets must be a list of names"),
        ([], {}, ValueError, "non-empty list"),
    ],
)
def test_errors_leave_the_model_unchanged(targets, kwargs, error, match):
    model = Toy()
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        lowrank.inject(model, targets, **kwargs)
    assert_unchanged(model, snap)


def test_injecting_twice_is_an_error_and_changes_nothing():
    model = lowrank.inject(Toy(), ["q_proj"])
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"\['layers.0.q_proj', 'layers.1.q_proj'\] already carry a LoRA adapter"):
        lowrank.inject(model, ["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="already carry a LoRA adapter"):
        lowrank.inject(model, "all-linear")
    assert_unchanged(model, snap)


def test_shared_layer_is_an_error():
    model = Toy()
    model.layers[1].q_proj = model.layers[0].q_proj  # one module under two names
    snap = snapshot(model)
    with pytest.raises(ValueError, match="shared by several parents"):
        lowrank.inject(model, ["q_proj"])
    assert_unchanged(model, snap)


def test_exclude_all_linear_is_refused():
    model = Toy()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="exclude='all-linear'"):
        lowrank.inject(model, "all-linear", exclude="all-linear")
    assert_unchanged(model, snap)


def test_failure_while_building_wrappers_leaves_the_model_unchanged(monkeypatch):
    """inject builds every wrapper before swapping any in: a failure on the third (e.g. out of memory) must leave
    no layer wrapped and every requires_grad flag as it was (building a wrapper freezes its base)."""
    model = Toy()
    model.layers[1].q_proj.weight.requires_grad_(False)  # a mixed starting state, to see it restored exactly
    snap = snapshot(model)
    built = []
    original_init = LoRALinear.__init__

    def flaky_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        built.append(self)
        if len(built) == 3:
            raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(LoRALinear, "__init__", flaky_init)
    with pytest.raises(RuntimeError, match="simulated out of memory"):
        lowrank.inject(model, ["q_proj", "v_proj"])
    assert len(built) == 3 and names(model) == []
    assert_unchanged(model, snap)
