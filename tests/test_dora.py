"""DoRA (lowrank/dora.py DoRAAdapter, inject(dora=True)): float64 dense references, PEFT both ways, merging.

Reference: ``W' = m * (W0 + s B A) / ||W0 + s B A||_row`` built densely in float64 from the layer's own tensors
(W0: the base weight, dequantized for NF4), ``y = x W'^T + b``; gradients from autograd on that dense form with
the norm detached (the paper's section 4.3).
"""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import assert_unchanged, snapshot, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import lowrank


def _base(kind: str, dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(24, 18, bias=bias)
    with torch.no_grad():
        lin.weight.add_(0.05)  # non-zero mean rows
        if bias:
            lin.bias.normal_()
    if kind == "conv1d":
        conv = Conv1D(18, 24)
        with torch.no_grad():
            conv.weight.copy_(lin.weight.T)
            conv.bias.copy_(lin.bias)
        return nn.Sequential(conv.to(dtype))
    model = nn.Sequential(lin.to(dtype))
    if kind == "nf4":
        lowrank.quantize(model, targets=["0"], block_size=64)
    return model


def _w0(model) -> torch.Tensor:
    """The base weight as the layer sees it, (out, in) float64 (independent of the adapter code)."""
    base = model[0].base
    if isinstance(base, lowrank.NF4Linear):
        return lowrank.nf4.dequantize(base.nf4_weight(), torch.float64)
    return (base.weight.T if isinstance(base, Conv1D) else base.weight).double()


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _, layer in lowrank.lora_layers(model):
        for ad in layer.adapters.values():
            with torch.no_grad():
                ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * 0.3)
                m = ad.lora_magnitude_vector
                m.mul_(1 + 0.2 * torch.randn(m.shape, generator=g))
    return model


def _reference(model, x, detach_norm=True):
    """float64 dense DoRA forward of the single adapted layer model[0], differentiable in A, B, m."""
    layer = model[0]
    ad = layer.adapters["default"]
    a, b, m = (t.double() for t in (ad.lora_A, ad.lora_B, ad.lora_magnitude_vector))
    w = _w0(model) + ad.scale * b @ a
    n = torch.linalg.vector_norm(w, dim=1)
    n = n.detach() if detach_norm else n
    y = x.double() @ ((m / n)[:, None] * w).T
    return y if layer.bias is None else y + layer.bias.double()


@pytest.mark.parametrize("kind,bias", [("linear", True), ("linear", False), ("conv1d", True), ("nf4", True),
                                       ("nf4", False)])  # fmt: skip
def test_forward_and_gradients_match_the_dense_reference(kind, bias, monkeypatch):
    model = _randomize(lowrank.inject(_base(kind, bias=bias), ["0"], r=4, alpha=8, dora=True))
    x = torch.randn(5, 3, 24)
    general = []  # calls of the general form (base_out + term); without a bias the layer takes add_to's one pass
    real = lowrank.dora.DoRAAdapter.forward
    monkeypatch.setattr(lowrank.dora.DoRAAdapter, "forward", lambda *a, **k: general.append(1) or real(*a, **k))
    y = model(x)
    assert len(general) == (1 if bias else 0)
    ref = _reference(model, x)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)  # float32 matmuls over 24 terms
    with lowrank.disabled(model):
        assert (ref - model(x).double()).abs().max() > 0.1  # the adapter matters at the tolerance above
    g = torch.randn_like(y)
    (y * g).sum().backward()
    ad = model[0].adapters["default"]
    params = [ad.lora_A, ad.lora_B, ad.lora_magnitude_vector]
    ours = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    (_reference(model, x) * g.double()).sum().backward()
    for got, p in zip(ours, params, strict=False):
        torch.testing.assert_close(got.double(), p.grad.double(), rtol=1e-4, atol=1e-5)  # float32 vs float64 chains


def test_output_unchanged_at_init_and_magnitude_is_the_row_norm():
    model = _base("linear")
    x = torch.randn(4, 24)
    before = model(x)
    lowrank.inject(model, ["0"], r=4, alpha=8, dora=True)
    m = model[0].adapters["default"].lora_magnitude_vector
    torch.testing.assert_close(m.double(), torch.linalg.vector_norm(_w0(model), dim=1), rtol=1e-6, atol=0)  # f32 sum
    # B = 0: n == m to the bit (same float32 computation), so the term added is exactly (1 - 1) W0 x + 0.
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("dtype, tol", [
    (torch.bfloat16, 3e-2),  # bf16 weights and activations: 2^-8 relative per rounding, |y| ~ 3
    (torch.float16, 4e-3),   # fp16: 2^-11 relative per rounding
])  # fmt: skip
@pytest.mark.parametrize("kind", ["linear", "nf4"])
@pytest.mark.parametrize("bias", [True, False])
def test_half_precision_bases(dtype, tol, kind, bias):
    model = _randomize(lowrank.inject(_base(kind, dtype, bias=bias), ["0"], r=4, alpha=8, dora=True))
    x = torch.randn(6, 24).to(dtype)
    y = model(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), _reference(model, x), rtol=tol, atol=tol)
    y.float().sum().backward()
    assert model[0].adapters["default"].lora_magnitude_vector.grad is not None


def test_dropout_follows_peft():
    """Training with dropout: y = base(x) + (m/n - 1) W0 d(x) + (m/n) s B A d(x), one mask d for both terms."""
    model = _randomize(lowrank.inject(_base("linear", bias=True), ["0"], r=4, alpha=8, dropout=0.3, dora=True))
    model.train()
    x = torch.randn(7, 24)
    torch.manual_seed(5)
    y = model(x)
    torch.manual_seed(5)
    xd = torch.nn.functional.dropout(x, 0.3, training=True).double()  # the same mask
    layer, ad = model[0], model[0].adapters["default"]
    w0, a, b, m = _w0(model), ad.lora_A.double(), ad.lora_B.double(), ad.lora_magnitude_vector.double()
    n = torch.linalg.vector_norm(w0 + ad.scale * b @ a, dim=1)
    ref = x.double() @ w0.T + layer.bias.double() + (m / n - 1) * (xd @ w0.T) + (m / n) * (ad.scale * xd @ (b @ a).T)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)  # float32 round-off
    model.eval()
    torch.testing.assert_close(model(x).double(), _reference(model, x), rtol=1e-5, atol=1e-5)


def test_norm_caches_follow_changes():
    model = _randomize(lowrank.inject(_base("linear"), ["0"], r=4, alpha=8, dora=True)).eval()
    x = torch.randn(3, 24)
    with torch.no_grad():
        first = model(x)
        assert torch.equal(model(x), first)  # cached norm: the same numbers
        model[0].adapters["default"].lora_B.mul_(2.0)  # in place: the eval cache must notice
        torch.testing.assert_close(model(x).double(), _reference(model, x), rtol=1e-5, atol=1e-5)
        # A new base weight through load_state_dict: ||W0||^2 is recomputed.
        state = model.state_dict()
        state["0.weight"] = state["0.weight"] * 1.5
        model.load_state_dict(state)
        torch.testing.assert_close(model(x).double(), _reference(model, x), rtol=1e-5, atol=1e-5)


# ---- PEFT interop and merging --------------------------------------------------------------------------------


def _peft_dora(base, seed=3):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    peft = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return peft


def test_peft_reads_ours_and_we_read_peft(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    base = tiny_llama().eval()
    ids = torch.randint(0, 128, (2, 9))
    # ours -> PEFT
    ours = lowrank.inject(copy.deepcopy(base), ["q_proj", "v_proj", "down_proj"], r=4, alpha=8, dora=True)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in lowrank.lora_layers(ours):
            ad = layer.adapters["default"]
            ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * 0.2)
            ad.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(ad.lora_magnitude_vector.shape, generator=g))
    lowrank.save_adapter(ours, tmp_path / "ours")
    peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert peft.peft_config["default"].use_dora
    want = ours(ids).logits
    assert (want - base(ids).logits).abs().max() > 0.05  # the adapters matter at the tolerance below
    torch.testing.assert_close(peft(ids).logits, want, rtol=1e-5, atol=1e-5)  # float32, op order differs
    # PEFT -> ours
    peft2 = _peft_dora(copy.deepcopy(base)).eval()
    peft2.save_pretrained(tmp_path / "peft")
    loaded = lowrank.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert isinstance(dict(lowrank.lora_layers(loaded))["model.layers.0.self_attn.q_proj"].adapters["default"],
                      lowrank.DoRAAdapter)  # fmt: skip
    torch.testing.assert_close(loaded(ids).logits, peft2(ids).logits, rtol=1e-5, atol=1e-5)


def test_merge_and_save_merged_equal_peft_merged_weights(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base = tiny_llama().eval()
    peft = _peft_dora(copy.deepcopy(base))
    peft.save_pretrained(tmp_path / "a")
    ours = lowrank.load_adapter(copy.deepcopy(base), tmp_path / "a")
    merged_peft = peft.merge_and_unload().state_dict()
    written = load_file(str(lowrank.save_merged(ours, tmp_path / "merged.safetensors")))
    ids = torch.randint(0, 128, (2, 7))
    before = ours(ids).logits
    lowrank.merge(ours)
    torch.testing.assert_close(ours(ids).logits, before, rtol=1e-5, atol=1e-5)  # merged forward == unmerged
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(written[name], merged_peft[name], rtol=1e-6, atol=1e-6)  # float32 products
        torch.testing.assert_close(ours.get_submodule(name.removesuffix(".weight")).base.weight, merged_peft[name],
                                   rtol=1e-6, atol=1e-6)  # fmt: skip
    lowrank.unmerge(ours)
    assert torch.equal(ours(ids).logits, before)


# ---- bad input ---------------------------------------------------------------------------------------------


def test_dora_must_be_a_bool():
    model = _base("linear")
    snap = snapshot(model)
    with pytest.raises(TypeError, match="dora must be True or False"):
        lowrank.inject(model, ["0"], r=4, dora="yes")
    assert_unchanged(model, snap)


def test_dora_on_a_layer_kind_without_a_linear_weight(monkeypatch):
    """A target kind other than linear (e.g. an embedding kind registered in LAYER_KINDS) is refused for DoRA."""
    import lowrank._match as match
    from lowrank.lora import LoRALayer, LoRALinear

    class EmbeddingKind(LoRALayer):  # only its registration matters: inject refuses before building any layer
        @staticmethod
        def accepts(module):
            return isinstance(module, nn.Embedding)

    monkeypatch.setattr(match, "LAYER_KINDS", [LoRALinear, EmbeddingKind])
    model = nn.ModuleDict({"emb": nn.Embedding(10, 6), "proj": nn.Linear(6, 6)})
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"dora=True needs linear layers .*not: \['emb'\]"):
        lowrank.inject(model, ["emb", "proj"], r=2, dora=True)
    assert_unchanged(model, snap)
