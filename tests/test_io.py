"""Adapter files (lowrank/io.py): layout, round trips, merged export, atomic writes.

References are independent of the code under test: the exact key names and config fields PEFT reads, and a
float64 dense forward W + scale * B @ A of the tiny model (``_io_models.reference_forward``). Bad inputs:
``test_io_errors.py``.
"""

import copy
import json
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _helpers import assert_unchanged, snapshot
from _io_models import (
    F32_TOL,
    TARGETS,
    Tiny,
    adapted,
    adapters_of,
    dense_weights,
    randomize,
    reference_forward,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

import lowrank


@pytest.fixture
def base():
    return Tiny().eval()


@pytest.fixture
def x():
    return torch.randn(3, 12)


# ---------------------------------------------------------------------------------------------- save and load


def test_round_trip_identical_outputs(tmp_path, base, x):
    model = adapted(base)
    lowrank.save_adapter(model, tmp_path)
    loaded = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    assert [n for n, _ in lowrank.lora_layers(loaded)] == TARGETS
    # Same weights, same ops, same order: bit-identical outputs.
    assert torch.equal(loaded(x), model(x))
    ref = reference_forward(dense_weights(base, adapters_of(model)), x)
    torch.testing.assert_close(loaded(x).double(), ref, **F32_TOL)
    assert (ref - base(x).double()).abs().max() > 0.1  # the adapters matter at this tolerance


def test_file_layout_keys_and_config(tmp_path, base):
    model = adapted(base, dropout=0.05)
    assert lowrank.save_adapter(model, tmp_path, base_model_name_or_path="org/tiny") == tmp_path
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        # The config is bound to the weights (lowrank/files.py): a copy of its text in the safetensors metadata.
        config = (tmp_path / "adapter_config.json").read_text()
        assert f.metadata() == {"format": "pt", "lowrank.adapter_config": config}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    expected_keys = {f"base_model.model.{t}.lora_{p}.weight" for t in TARGETS for p in "AB"}
    assert set(tensors) == expected_keys
    for name, layer in lowrank.lora_layers(model):
        a, b = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape == (4, layer.in_features) and b.shape == (layer.out_features, 4)
        assert a.dtype == b.dtype == torch.float32 and a.is_contiguous() and b.is_contiguous()
        assert torch.equal(a, layer.lora_A) and torch.equal(b, layer.lora_B)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: config[k] for k in ["peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "fan_in_fan_out"]} == {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "use_rslora": False,
        "fan_in_fan_out": False,
    }  # fmt: skip
    # One regex PEFT full-matches (a list entry would be a suffix): it selects exactly the adapted layers.
    selected = [n for n, _ in base.named_modules() if n and re.fullmatch(config["target_modules"], n)]
    assert selected == TARGETS and config["bias"] == "none"
    assert config["base_model_name_or_path"] == "org/tiny"
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {} and config["use_dora"] is False


def test_rank_and_alpha_patterns_round_trip(tmp_path, base, x):
    model = copy.deepcopy(base)
    lowrank.inject(model, ["up", "down", "head"], r=4, alpha=8, rank_pattern={"blocks.0.down": 2},
                   alpha_pattern={"blocks.1.down": 2.5, "head": 2.5})  # fmt: skip
    randomize(model)
    lowrank.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)  # the most common values
    assert config["rank_pattern"] == {"blocks.0.down": 2}
    assert config["alpha_pattern"] == {"blocks.1.down": 2.5, "head": 2.5}
    loaded = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    got = {n: (l.r, l.alpha, l.scale) for n, l in lowrank.lora_layers(loaded)}
    assert got == {n: (l.r, l.alpha, l.scale) for n, l in lowrank.lora_layers(model)}
    assert torch.equal(loaded(x), model(x))


def test_rslora_and_dropout_round_trip(tmp_path, base, x):
    model = adapted(base, r=3, alpha=6, rslora=True, dropout=0.2)
    lowrank.save_adapter(model, tmp_path)
    loaded = lowrank.load_adapter(copy.deepcopy(base), tmp_path).eval()
    for _, layer in lowrank.lora_layers(loaded):
        assert layer.rslora and layer.dropout_p == 0.2 and layer.scale == pytest.approx(6 / 3**0.5, rel=1e-15)
    assert torch.equal(loaded(x), model.eval()(x))


def test_merged_model_saves_the_adapter_not_merged_weights(tmp_path, base, x):
    model = adapted(base)
    before = adapters_of(model)
    lowrank.merge(model)
    lowrank.save_adapter(model, tmp_path)
    assert all(layer.merged for _, layer in lowrank.lora_layers(model))  # saving does not unmerge
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for name, (a, b, _) in before.items():
        assert torch.equal(tensors[f"base_model.model.{name}.lora_A.weight"], a)
        assert torch.equal(tensors[f"base_model.model.{name}.lora_B.weight"], b)
    loaded = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(x).double(), reference_forward(dense_weights(base, before), x), **F32_TOL)


def test_save_rejects_what_it_cannot_write(tmp_path, base):
    with pytest.raises(ValueError, match="has no LoRA layers to save"):
        lowrank.save_adapter(copy.deepcopy(base), tmp_path)
    model = adapted(base, targets=["up"])
    with pytest.raises(ValueError, match=re.escape("unknown adapter 'b'; the model has ['default']")):
        lowrank.save_adapter(model, tmp_path, "b")
    layer = model.blocks[1].up  # one adapter mixing rsLoRA and plain LoRA cannot be written in PEFT's config
    layer.adapters["default"] = lowrank.LoRAAdapter(layer.in_features, layer.out_features, 4, 8, rslora=True)
    with pytest.raises(ValueError, match="one use_rslora flag"):
        lowrank.save_adapter(model, tmp_path)
    model = adapted(base)
    with torch.no_grad():
        model.blocks[1].down.lora_B[0, 0] = float("nan")
    with pytest.raises(
        ValueError, match=re.escape("non-finite adapter weights (NaN or inf) in ['blocks.1.down.lora_B']")
    ):
        lowrank.save_adapter(model, tmp_path)
    assert not tmp_path.exists() or os.listdir(tmp_path) == []  # nothing written


def test_mixed_dropout_writes_the_most_common_with_a_warning(tmp_path, base):
    model = adapted(base, targets=["up", "down"], dropout=0.1)
    layer = model.blocks[1].down  # an adapter built by hand with another dropout than the rest of its adapter
    layer.adapters["default"] = lowrank.LoRAAdapter(layer.in_features, layer.out_features, 4, 8, dropout=0.3)
    with pytest.warns(UserWarning, match=re.escape("layers use different dropout [0.1, 0.3]")):
        lowrank.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_dropout"] == 0.1


def test_failed_write_leaves_previous_adapter_intact(tmp_path, base, monkeypatch):
    (tmp_path / "README.md").write_text("user notes")
    lowrank.save_adapter(adapted(base), tmp_path)
    old = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}

    def crash(f, tensors, metadata=None):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(lowrank._safetensors, "write", crash)
    with pytest.raises(OSError, match="disk full"):
        lowrank.save_adapter(adapted(base, r=2), tmp_path)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == old  # no temp file left either


def test_load_into_already_adapted_model_replaces_weights(tmp_path, base, x):
    source = adapted(base, dropout=0.1)
    lowrank.save_adapter(source, tmp_path)
    target = adapted(base)  # same targets, r and alpha; other random weights; no dropout
    layers_before = dict(lowrank.lora_layers(target))
    lowrank.load_adapter(target, tmp_path)
    assert dict(lowrank.lora_layers(target)) == layers_before  # the same modules, weights replaced
    assert all(layer.dropout_p == 0.0 for layer in layers_before.values())  # the model's own dropout stays
    assert torch.equal(target(x), source.eval()(x))


def test_strict_false_skips_modules_the_model_lacks(tmp_path, base, x):
    lowrank.save_adapter(adapted(base), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.extra.proj.lora_A.weight"] = torch.zeros(4, 3)
    tensors["base_model.model.extra.proj.lora_B.weight"] = torch.zeros(3, 4)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=re.escape("modules the model does not have: ['extra.proj']")):
        lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    with pytest.warns(UserWarning, match="skipped tensors for"):
        loaded = lowrank.load_adapter(copy.deepcopy(base), tmp_path, strict=False)
    assert [n for n, _ in lowrank.lora_layers(loaded)] == TARGETS
    # strict=False on an adapted model: it may keep adapters the file does not cover.
    model = adapted(base, targets=TARGETS + ["head"])
    head_b = model.head.lora_B.detach().clone()
    with pytest.warns(UserWarning, match="skipped tensors for"):
        lowrank.load_adapter(model, tmp_path, strict=False)
    assert torch.equal(model.head.lora_B, head_b)


def test_accepts_peft_variants_and_harmless_fields(tmp_path, base, x):
    """'.default' key segments, null-valued fields, regex target_modules, other init schemes, unknown null fields."""
    model = adapted(base)
    lowrank.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    save_file(renamed, tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config |= {
        "target_modules": r".*\.(up|down)", "init_lora_weights": "pissa", "rank_pattern": None, "use_dora": False,
        "modules_to_save": [], "layer_replication": None, "future_switch": None, "fan_in_fan_out": True,
        "task_type": "CAUSAL_LM", "peft_version": "0.99.0", "loftq_config": {}, "exclude_modules": "head",
    }  # fmt: skip
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded(x), model(x))


def test_missing_fields_use_peft_defaults(tmp_path, base, x):
    """PEFT reads a missing r / lora_alpha as 8; so do we (then the shapes must fit r = 8)."""
    model = adapted(base, r=8, alpha=8)
    lowrank.save_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file(load_file(tmp_path / "adapter_model.safetensors"), tmp_path / "adapter_model.safetensors")  # as PEFT
    loaded = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    assert {(l.r, l.alpha, l.rslora) for _, l in lowrank.lora_layers(loaded)} == {(8, 8.0, False)}
    assert torch.equal(loaded(x), model(x))


# ---------------------------------------------------------------------------------------------- merged export


def test_save_merged_dense_float32(tmp_path, base, x):
    model = adapted(base, targets=["up", "blocks.1.down"])
    expected = dense_weights(base, adapters_of(model))
    snap = snapshot(model)
    file = lowrank.save_merged(model, tmp_path / "merged.safetensors")
    assert_unchanged(model, snap)  # not merged as a side effect
    merged = load_file(file)
    assert set(merged) == set(base.state_dict())  # the original key names, nothing else
    for name, (w, b) in expected.items():
        assert merged[f"{name}.weight"].dtype == torch.float32
        # float32 sum of W and a rank-4 float32 delta, |w| < 1: a few ulps (6e-8); adapters move weights by ~0.1.
        torch.testing.assert_close(merged[f"{name}.weight"].double(), w, rtol=0, atol=5e-7)
        if b is not None:
            assert torch.equal(merged[f"{name}.bias"], base.get_submodule(name).bias)
    assert torch.equal(merged["blocks.0.down.weight"], base.blocks[0].down.weight)  # not adapted: untouched
    restored = copy.deepcopy(base)
    restored.load_state_dict(merged, strict=True)
    torch.testing.assert_close(restored(x), model(x), **F32_TOL)


def test_save_merged_of_quantized_conv1d_keeps_conv1d_layout(tmp_path):
    # GPT-2's Conv1D quantized to NF4 is stored (out, in); the dense export must go back to (in, out) so that
    # the file loads into the original model class. Non-square layers make a wrong layout fail loudly, and the
    # square-free check below (outputs) catches a silently transposed one.
    base = nn.Sequential(Conv1D(64, 128), nn.GELU(), Conv1D(128, 64))  # weights (128, 64) and (64, 128)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    qmodel = lowrank.quantize(copy.deepcopy(base), targets=["0", "2"])
    model = adapted(qmodel, targets=["0"], r=2, alpha=4)
    merged = load_file(lowrank.save_merged(model, tmp_path / "m.safetensors"))
    assert merged["0.weight"].shape == (128, 64) and merged["2.weight"].shape == (64, 128)
    restored = copy.deepcopy(base)
    restored.load_state_dict(merged, strict=True)
    x = torch.randn(3, 128)
    # Same dequantized weights summed in a different order (dense vs NF4 op): float32 rounding only.
    torch.testing.assert_close(restored(x), model(x), **F32_TOL)

    lowrank.merge(model)
    again = load_file(lowrank.save_merged(model, tmp_path / "model.safetensors"))
    assert (tmp_path / "model.safetensors").is_file() and all(layer.merged for _, layer in lowrank.lora_layers(model))
    assert all(torch.equal(again[k], merged[k]) for k in merged)  # the merge state does not change the export


def test_save_merged_bfloat16_rounds_once(tmp_path, base):
    model = adapted(base.to(torch.bfloat16))  # A, B stay float32
    merged = load_file(lowrank.save_merged(model, tmp_path / "m.safetensors"))
    for name, (a, b, scale) in adapters_of(model).items():
        w = base.get_submodule(name).weight
        expected = (w.double() + scale * b.double() @ a.double()).to(torch.bfloat16)
        got = merged[f"{name}.weight"]
        assert got.dtype == torch.bfloat16
        # Summing in float32 then rounding to bf16 equals direct rounding except at near-ties: at most 1 ulp (2^-7 rel).
        torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=0)
        assert (got == expected).float().mean() > 0.99


def test_save_merged_tied_weights(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.proj, self.out = nn.Embedding(10, 12), nn.Linear(12, 12), nn.Linear(12, 10, bias=False)
            self.out.weight = self.embed.weight

    base = Tied()
    model = copy.deepcopy(base)
    lowrank.inject(model, ["proj"], r=2, alpha=2)
    merged = load_file(lowrank.save_merged(model, tmp_path / "m.safetensors"))
    assert torch.equal(merged["embed.weight"], merged["out.weight"])
    restored = Tied()
    restored.load_state_dict(merged, strict=True)
    assert torch.equal(restored.embed.weight, base.embed.weight)


def test_conv1d_round_trip_and_merged_layout(tmp_path):

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj = Conv1D(20, 12), Conv1D(12, 20)  # Conv1D(nf=out, nx=in): weight (in, out)

        def forward(self, x):
            return self.c_proj(F.gelu(self.c_fc(x)))

    base = Mlp()
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn_like(p) * 0.2)  # HF inits Conv1D biases to zero
    model = adapted(base, targets=["c_fc", "c_proj"], r=3, alpha=6)
    lowrank.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    a = load_file(tmp_path / "adapter_model.safetensors")["base_model.model.c_fc.lora_A.weight"]
    assert a.shape == (3, 12)  # A is (r, in) for Conv1D too
    x = torch.randn(4, 12)
    loaded = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded(x), model(x))
    merged = load_file(lowrank.save_merged(model, tmp_path / "m.safetensors"))
    for name, (a, b, scale) in adapters_of(model).items():
        w = base.get_submodule(name).weight.double()  # (in, out)
        # float32 sum, |w| < 1: a few ulps.
        torch.testing.assert_close(
            merged[f"{name}.weight"].double(), w + scale * (b.double() @ a.double()).T, rtol=0, atol=5e-7
        )
    restored = copy.deepcopy(base)
    restored.load_state_dict(merged, strict=True)
    torch.testing.assert_close(restored(x), model(x), **F32_TOL)


# ---------------------------------------------------------------------------------------------- NF4 bases


def nf4_weights(qmodel) -> dict:
    """float64 dense weights of a quantized Tiny: its dequantized NF4 weights (what the model computes with)."""
    return {
        name: (qmodel.get_submodule(name).dequantize_weight(torch.float64), qmodel.get_submodule(name).bias)
        for name in ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "head"]
    }


def test_load_into_nf4_model(tmp_path, base, x):
    source = adapted(base)
    lowrank.save_adapter(source, tmp_path)
    qmodel = lowrank.quantize(copy.deepcopy(base))
    weights = nf4_weights(qmodel)
    loaded = lowrank.load_adapter(qmodel, tmp_path)
    assert all(type(layer.base).__name__ == "NF4Linear" for _, layer in lowrank.lora_layers(loaded))
    for name, (a, b, scale) in adapters_of(source).items():
        w, bias = weights[name]
        weights[name] = (w + scale * b.double() @ a.double(), bias)
    ref = {n: (w, None if bias is None else bias.double()) for n, (w, bias) in weights.items()}
    torch.testing.assert_close(loaded(x).double(), reference_forward(ref, x), **F32_TOL)

    # And back: the NF4 model's adapter round-trips into another quantized copy, bit for bit.
    lowrank.save_adapter(loaded, tmp_path / "again")
    other = lowrank.load_adapter(lowrank.quantize(copy.deepcopy(base)), tmp_path / "again")
    assert torch.equal(other(x), loaded(x))


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16, torch.float64])
def test_save_merged_nf4(tmp_path, base, x, compute_dtype):
    qmodel = lowrank.quantize(copy.deepcopy(base), compute_dtype=compute_dtype)
    weights = nf4_weights(qmodel)
    model = adapted(qmodel, targets=["up"])
    snap = snapshot(model)
    merged = load_file(lowrank.save_merged(model, tmp_path / "m.safetensors"))
    assert_unchanged(model, snap)
    assert set(merged) == set(base.state_dict())  # dense keys: no absmax / quant_state left
    dtype = compute_dtype or torch.float32
    adapters = adapters_of(model)
    for name, (w, bias) in weights.items():
        if name in adapters:
            a, b, scale = adapters[name]
            w = w + scale * b.double() @ a.double()
        got = merged[f"{name}.weight"]
        assert got.dtype == dtype and got.shape == w.shape
        if dtype == torch.float32:  # float32 sum of the exact dequantized weight and the delta: a few ulps
            torch.testing.assert_close(got.double(), w, rtol=0, atol=5e-7)
        elif dtype == torch.float64:  # summed in float64 (the export widens to the base's dtype): ~1e-16 relative
            torch.testing.assert_close(got, w, rtol=0, atol=1e-12)
        else:  # bf16: one rounding of the float32 sum, at most 1 ulp = 2^-7 relative
            torch.testing.assert_close(got.float(), w.float(), rtol=2**-7, atol=0)
        if bias is not None:
            assert merged[f"{name}.bias"].dtype == dtype
    if compute_dtype is None:
        restored = copy.deepcopy(base)
        restored.load_state_dict(merged, strict=True)
        torch.testing.assert_close(restored(x), model(x), **F32_TOL)
