"""inject(..., init="pissa" | "pissa_niter_<k>" | "loftq"): outputs at init, eject, sharing, bad input.

References: the original float model's weights and logits (float64 where it matters), PEFT loading the files.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import assert_unchanged, snapshot, tiny_llama
from torch import nn

import lowrank

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture
def base():
    torch.manual_seed(0)
    return tiny_llama().eval()


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))


def _perturb(model, seed=7, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lowrank.lora_layers(model):
            for ad in layer.adapters.values():
                ad.lora_A.add_(torch.randn(ad.lora_A.shape, generator=g) * std)
                ad.lora_B.add_(torch.randn(ad.lora_B.shape, generator=g) * std)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2"])
def test_pissa_keeps_outputs_and_eject_is_exact(base, ids, init):
    original = {k: v.clone() for k, v in base.state_dict().items()}
    want = base(ids).logits
    model = lowrank.inject(copy.deepcopy(base), TARGETS, r=4, alpha=8, init=init)
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)  # float32 SVD round-off
    layer = dict(lowrank.lora_layers(model))["model.layers.0.self_attn.q_proj"]
    ad = layer.adapters["default"]
    w = original["model.layers.0.self_attn.q_proj.weight"].double()
    # The base is the residual of the top-r singular part (float64 SVD of the original weight).
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    fit = ad.scale * ad.lora_B.double() @ ad.lora_A.double()
    if init == "pissa":  # exact SVD: the best rank-4 part, to float32 round-off
        torch.testing.assert_close(fit, (u[:, :4] * s[:4]) @ vh[:4], rtol=0, atol=1e-5)
    else:  # 2 power iterations on a random (flat-spectrum) weight: most of the top-4 energy, not all of it
        energy = fit.square().sum() / s[:4].square().sum()
        assert 0.9 < energy <= 1 + 1e-6
    torch.testing.assert_close(layer.base.weight.double() + ad.scale * ad.lora_B.double() @ ad.lora_A.double(),
                               w, rtol=0, atol=1e-6)  # fmt: skip
    _perturb(model)
    lowrank.eject(model)
    state = model.state_dict()
    assert state.keys() == original.keys()
    for k, v in original.items():
        assert torch.equal(state[k], v), k


def test_pissa_adapter_converted_for_the_original_base(base, ids, tmp_path):
    from peft import PeftModel

    model = lowrank.inject(copy.deepcopy(base), TARGETS, r=4, alpha=8, init="pissa")
    _perturb(model)  # "trained"
    want = model(ids).logits
    assert (want - base(ids).logits).abs().max() > 0.05  # the training matters at the tolerances below
    lowrank.save_pissa_as_lora(model, tmp_path)
    ours = lowrank.load_adapter(copy.deepcopy(base), tmp_path)  # onto the unmodified base
    assert dict(lowrank.lora_layers(ours))["model.layers.0.self_attn.q_proj"].r == 8
    torch.testing.assert_close(ours(ids).logits, want, rtol=1e-5, atol=1e-5)  # float32: W + s B'A' vs W_res + s BA
    peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(peft(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_pissa_with_dora_starts_at_the_base(base, ids):
    model = lowrank.inject(copy.deepcopy(base), TARGETS, r=4, alpha=8, init="pissa", dora=True)
    torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)  # float32 round-off


def test_loftq_beats_plain_qlora_and_eject_is_within_its_error(base, ids):
    original = {k: v.clone() for k, v in base.state_dict().items()}
    want = base(ids).logits.double()
    model = lowrank.inject(copy.deepcopy(base), TARGETS, r=4, alpha=8, init="loftq")
    layers = dict(lowrank.lora_layers(model))
    assert all(isinstance(layer.base, lowrank.NF4Linear) for layer in layers.values())
    report = lowrank.loftq_report(model)
    assert [row["layer"] for row in report] == list(layers)
    assert all(row["ratio"] < 1 for row in report)
    # Recompute one layer's error independently (float64, from the NF4 bytes and the adapter).
    layer = layers["model.layers.1.mlp.down_proj"]
    ad = layer.adapters["default"]
    w = original["model.layers.1.mlp.down_proj.weight"].double()
    deq = lowrank.nf4.dequantize(layer.base.nf4_weight(), torch.float64)
    err = torch.linalg.norm(w - deq - ad.scale * ad.lora_B.double() @ ad.lora_A.double()).item()
    assert report[-1]["error"] == pytest.approx(err, rel=1e-4)  # float32 vs float64 sums
    # End to end: closer to the float model than QLoRA's plain NF4 base (same targets, fresh adapter).
    qlora = lowrank.inject(lowrank.quantize(copy.deepcopy(base), targets=TARGETS), TARGETS, r=4, alpha=8)
    d_loftq = (model(ids).logits.double() - want).norm()
    d_qlora = (qlora(ids).logits.double() - want).norm()
    assert d_loftq < d_qlora
    # Eject: the original modules, weights deq(Q) + s B0 A0, i.e. within the reported error of W.
    _perturb(model)
    lowrank.eject(model)
    for row in report:
        mod = model.get_submodule(row["layer"])
        assert type(mod) is nn.Linear
        w = original[row["layer"] + ".weight"].double()
        assert torch.linalg.norm(mod.weight.double() - w).item() <= row["error"] * (1 + 1e-4) + 1e-6


def test_loftq_is_reproducible_so_an_adapter_can_be_reloaded(base, ids, tmp_path):
    """A LoftQ adapter applies to its own Q: the init rebuilds Q byte for byte from the same float weights."""
    a = lowrank.inject(copy.deepcopy(base), TARGETS, r=4, alpha=8, init="loftq")
    _perturb(a)
    lowrank.save_adapter(a, tmp_path)
    b = lowrank.inject(copy.deepcopy(base), TARGETS, r=4, alpha=8, init="loftq")
    for (_, la), (_, lb) in zip(lowrank.lora_layers(a), lowrank.lora_layers(b), strict=False):
        assert torch.equal(la.base.weight, lb.base.weight)
    lowrank.load_adapter(b, tmp_path)
    assert torch.equal(b(ids).logits, a(ids).logits)


# ---- bad input: a clear error, the model unchanged ----------------------------------------------------------


def test_unknown_init(base):
    snap = snapshot(base)
    with pytest.raises(ValueError, match="unknown init 'olora'"):
        lowrank.inject(base, TARGETS, r=4, init="olora")
    assert_unchanged(base, snap)


def test_loftq_on_a_quantized_base(base):
    model = lowrank.quantize(base, targets=TARGETS)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: init='loftq' on an already-quantized"):
        lowrank.inject(model, TARGETS, r=4, init="loftq")
    assert_unchanged(model, snap)


def test_loftq_on_nan_weights(base):
    with torch.no_grad():
        base.model.layers[1].mlp.down_proj.weight[0, 3] = float("nan")
    snap = snapshot(base)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj: the weight holds 1 NaN/inf"):
        lowrank.inject(base, TARGETS, r=4, init="loftq")
    assert_unchanged(base, snap)


def test_pissa_rank_larger_than_the_layer(base):
    snap = snapshot(base)
    # v_proj is 64 -> 32 (2 kv heads of 16): r = 40 fits q_proj (64 x 64) but not v_proj.
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.v_proj: r=40 is larger than min"):
        lowrank.inject(base, TARGETS, r=40, init="pissa")
    assert_unchanged(base, snap)


def test_pissa_on_a_quantized_base(base):
    model = lowrank.quantize(base, targets=TARGETS)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="PiSSA needs the dense weight"):
        lowrank.inject(model, TARGETS, r=4, init="pissa")
    assert_unchanged(model, snap)
