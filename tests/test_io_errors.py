"""Adapter files (lowrank/io.py, lowrank/peft_config.py): every bad input is refused with a message that names
the problem, and the model is left exactly as it was (parameters, buffers, requires_grad flags, module types).
"""

import copy
import json
import re

import pytest
import torch
from _helpers import assert_unchanged, snapshot
from _io_models import TARGETS, Tiny, adapted, randomize
from safetensors.torch import load_file, save_file

import lowrank
import lowrank.io as lio


@pytest.fixture
def base():
    return Tiny().eval()


# ---------------------------------------------------------------------------------------------- bad input

DELETE = object()


def edit_config(**changes):
    def edit(d):
        config = json.loads((d / "adapter_config.json").read_text())
        for k, v in changes.items():
            config.pop(k) if v is DELETE else config.__setitem__(k, v)
        (d / "adapter_config.json").write_text(json.dumps(config))
        unbind(d)

    return edit


def unbind(d):
    """Drop the copy of the config lowrank keeps in the weights' metadata: the folder is then what PEFT (or a
    hand edit) would leave, without it a changed config is the config (with it: refused as from another save)."""
    tensors = load_file(d / "adapter_model.safetensors")
    save_file(tensors, d / "adapter_model.safetensors", metadata={"format": "pt"})


def edit_tensors(fn):
    def edit(d):
        tensors = load_file(d / "adapter_model.safetensors")
        fn(tensors)
        save_file(tensors, d / "adapter_model.safetensors", metadata={"format": "pt"})

    return edit


def rename(old, new):
    def fn(t):
        for part in "AB":
            t[f"base_model.model.{new}.lora_{part}.weight"] = t.pop(f"base_model.model.{old}.lora_{part}.weight")

    return fn


def write(name, data: bytes):
    return lambda d: (d / name).write_bytes(data)


def truncate(d):
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[:-10])


A0, B1 = "base_model.model.blocks.0.up.lora_A.weight", "base_model.model.blocks.1.down.lora_B.weight"
BAD_INPUTS = {
    "no-config": (lambda d: (d / "adapter_config.json").unlink(), FileNotFoundError, "no adapter_config.json in"),
    "no-weights": (
        lambda d: (d / "adapter_model.safetensors").unlink(), FileNotFoundError, "no adapter_model.safetensors in"
    ),
    "pickle-only": (
        lambda d: ((d / "adapter_model.safetensors").rename(d / "adapter_model.bin")), FileNotFoundError,
        "pickled adapters are not loaded",
    ),
    "bad-json": (write("adapter_config.json", b'{"peft_type": "LORA",'), ValueError, "is not valid JSON"),
    "json-list": (write("adapter_config.json", b"[1, 2]"), ValueError, "must hold a JSON object, got list"),
    "peft-type": (edit_config(peft_type="IA3"), ValueError, "peft_type is 'IA3'; lowrank loads only LoRA"),
    "no-peft-type": (edit_config(peft_type=DELETE), ValueError, "peft_type is None"),
    "dora": (
        edit_config(use_dora=True), ValueError, "lacks a lora_magnitude_vector tensor but the config says use_dora=true"
    ),
    "lora-bias": (edit_config(lora_bias=True), ValueError, "does not support: {'lora_bias': True}"),
    "bias-all": (edit_config(bias="all"), ValueError, "does not support: {'bias': 'all'}"),
    "modules-to-save": (edit_config(modules_to_save=["head"]), ValueError, "'modules_to_save': ['head']"),
    "layer-replication": (edit_config(layer_replication=[[0, 1]]), ValueError, "'layer_replication': [[0, 1]]"),
    "unknown-field": (edit_config(future_feature={"on": 1}), ValueError, "'future_feature': {'on': 1}"),
    "r-string": (edit_config(r="4"), ValueError, "r must be a positive integer, got '4'"),
    "r-bool": (edit_config(r=True), ValueError, "r must be a positive integer, got True"),
    "alpha-negative": (edit_config(lora_alpha=-8), ValueError, "lora_alpha must be a positive number, got -8"),
    "dropout": (edit_config(lora_dropout=1.5), ValueError, "lora_dropout must be a number in [0, 1), got 1.5"),
    "rslora-string": (edit_config(use_rslora="yes"), ValueError, "use_rslora must be true or false"),
    "pattern-regex": (edit_config(rank_pattern={"(": 2}), ValueError, "rank_pattern key '(' is not a valid regular"),
    "pattern-value": (edit_config(alpha_pattern={"up": "x"}), ValueError, "alpha_pattern['up'] must be a positive"),
    "r-disagrees": (edit_config(r=8), ValueError, "config gives r=8 and the module is 12 -> 20: expected (8, 12)"),
    "rank-pattern-disagrees": (
        edit_config(rank_pattern={"down": 2}), ValueError, "lora_B (12, 4), but the config gives r=2"
    ),
    "unknown-module": (
        edit_tensors(rename("blocks.0.up", "blocks.0.nope")), ValueError, "does not have: ['blocks.0.nope']"
    ),
    "not-linear": (
        edit_tensors(rename("blocks.0.up", "blocks.0.act")), ValueError, "'blocks.0.act' is a GELU, not a linear"
    ),
    "foreign-tensor": (
        edit_tensors(lambda t: t.__setitem__("base_model.model.blocks.0.up.lora_E", torch.ones(20))),
        ValueError, "['base_model.model.blocks.0.up.lora_E'] cannot be loaded: not a LoRA weight in PEFT's layout",
    ),
    "magnitude-without-dora": (
        edit_tensors(lambda t: t.__setitem__("base_model.model.blocks.0.up.lora_magnitude_vector", torch.ones(20))),
        ValueError, "blocks.0.up has a lora_magnitude_vector tensor but the config says use_dora=false",
    ),
    "missing-tensor": (edit_tensors(lambda t: t.pop(B1)), ValueError, "missing tensors ['blocks.1.down.lora_B']"),
    "shape-vs-module": (
        edit_tensors(lambda t: t.__setitem__(A0, torch.zeros(4, 13))), ValueError,
        "has lora_A (4, 13) and lora_B (20, 4), but the config gives r=4 and the module is 12 -> 20",
    ),
    "int-dtype": (
        edit_tensors(lambda t: t.__setitem__(A0, t[A0].to(torch.int32))), ValueError,
        "blocks.0.up.lora_A has dtype torch.int32; LoRA weights must be floating point",
    ),
    "nan": (edit_tensors(lambda t: t[A0].view(-1).__setitem__(5, float("nan"))), ValueError, "lora_A holds NaN or inf"),
    "float64-overflow": (
        edit_tensors(lambda t: t.__setitem__(A0, torch.full((4, 12), 1e300, dtype=torch.float64))), ValueError,
        "beyond the float32 range",
    ),
    "not-safetensors": (
        write("adapter_model.safetensors", b"PK\x03\x04 a zip file"), ValueError, "not a valid safetensors"
    ),
    "empty-file": (write("adapter_model.safetensors", b""), ValueError, "not a valid safetensors file"),
    "truncated": (truncate, ValueError, "not a valid safetensors file"),
    "no-lora-tensors": (edit_tensors(lambda t: t.clear()), ValueError, "holds no LoRA tensors"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_and_leaves_model_unchanged(tmp_path, base, case):
    mutate, error, message = BAD_INPUTS[case]
    lowrank.save_adapter(adapted(base), tmp_path)
    mutate(tmp_path)
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(error, match=re.escape(message)):
        lowrank.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


def test_missing_directory(tmp_path, base):
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(FileNotFoundError, match="adapter directory .*nowhere does not exist"):
        lowrank.load_adapter(model, tmp_path / "nowhere")
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda m: lowrank.inject(m, ["up"], r=4, alpha=8), "already has adapters, but on other modules"),
        (lambda m: lowrank.merge(lowrank.inject(m, TARGETS, r=4, alpha=8)), "are merged into the base weights"),
        (lambda m: lowrank.inject(m, TARGETS, r=4, alpha=16), "already has an adapter with r=4, scale=4"),
        (lambda m: lowrank.inject(m, TARGETS, r=4, alpha=8, rslora=True), "already has an adapter with r=4, scale=4"),
        (lambda m: lowrank.inject(m, TARGETS, r=2, alpha=4), "blocks.0.up already has an adapter with r=2, scale=2"),
    ],
    ids=["other-targets", "merged", "alpha", "rslora", "rank"],
)
def test_adapted_model_that_does_not_fit(tmp_path, base, setup, message):
    lowrank.save_adapter(adapted(base), tmp_path)
    model = copy.deepcopy(base)
    setup(model)
    randomize(model) if not any(l.merged for _, l in lowrank.lora_layers(model)) else None
    snap = snapshot(model)
    with pytest.raises(ValueError, match=re.escape(message)):
        lowrank.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


def test_failure_during_injection_rolls_back(tmp_path, base, monkeypatch):
    model = copy.deepcopy(base)
    lowrank.inject(model, ["up", "down"], r=4, alpha=8, rank_pattern={"down": 2})
    lowrank.save_adapter(randomize(model), tmp_path)
    calls = []

    def flaky_inject(*args, **kwargs):  # the adapter is in, then something fails (e.g. out of memory)
        calls.append(1)
        lowrank.inject(*args, **kwargs)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(lio, "inject", flaky_inject)
    fresh = copy.deepcopy(base)
    snap = snapshot(fresh)
    with pytest.raises(RuntimeError, match="out of memory"):
        lowrank.load_adapter(fresh, tmp_path)
    assert len(calls) == 1
    assert_unchanged(fresh, snap)  # the adapters are gone, requires_grad flags restored


def test_bad_adapter_leaves_nf4_model_unchanged(tmp_path, base):
    lowrank.save_adapter(adapted(base), tmp_path)
    edit_tensors(lambda t: t.__setitem__(A0, torch.zeros(4, 11)))(tmp_path)
    qmodel = lowrank.quantize(copy.deepcopy(base))
    snap = snapshot(qmodel)
    with pytest.raises(ValueError, match=re.escape("blocks.0.up has lora_A (4, 11)")):
        lowrank.load_adapter(qmodel, tmp_path)
    assert_unchanged(qmodel, snap)


def test_bare_lora_layer_is_refused_by_both_writers(tmp_path):
    """Adapter keys name each layer by its place in a model; a bare LoRALinear has none (its key would be
    'base_model.model..lora_A.weight', which no loader accepts). Nothing is written."""
    layer = lowrank.LoRALinear(torch.nn.Linear(6, 4), r=2)
    for save in (lowrank.save_adapter, lowrank.save_merged):
        with pytest.raises(ValueError, match="bare LoRALinear"):
            save(layer, tmp_path)
    assert list(tmp_path.iterdir()) == []
