"""LoRALinear on its own: forward and gradients against the dense layer W0 + scale * B @ A, merge, state dict."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _helpers import randomize_adapters
from transformers.pytorch_utils import Conv1D

import lowrank
from lowrank import LoRALinear

# (in_features, out_features, rows): M = 1, sizes that are not powers of two, one wider layer.
SHAPES = [(37, 23, 1), (64, 96, 17), (130, 50, 6)]
KINDS = ["linear", "linear_nobias", "conv1d"]


def make_base(kind: str, n_in: int, n_out: int, dtype=torch.float64) -> nn.Module:
    if kind == "conv1d":
        base = Conv1D(n_out, n_in)
        nn.init.normal_(base.bias)  # HF initialises it to zero, which would hide a bias bug
    else:
        base = nn.Linear(n_in, n_out, bias=kind == "linear")
    return base.to(dtype)


def dense_weight(layer: LoRALinear) -> torch.Tensor:
    """W0 as (out, in) in float64, read straight from the base (independent of LoRALinear's helpers)."""
    w = layer.base.weight.detach().double()
    return w.T if isinstance(layer.base, Conv1D) else w


def scale_of(layer: LoRALinear) -> float:
    """The documented multiplier alpha / r (rsLoRA: alpha / sqrt(r)), computed here, not read from ``layer.scale``."""
    return layer.alpha / (math.sqrt(layer.r) if layer.rslora else layer.r)


def delta(layer: LoRALinear) -> torch.Tensor:
    """scale * B @ A in float64 from the adapter tensors (the reference for ``delta_weight`` and merges)."""
    return scale_of(layer) * layer.lora_B.detach().double() @ layer.lora_A.detach().double()


def reference(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """y = x (W0 + scale * B @ A)^T + b in float64."""
    w = dense_weight(layer) + delta(layer)
    b = layer.base.bias
    return F.linear(x.double(), w, None if b is None else b.detach().double())


def normwise(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def adapted(kind, n_in, n_out, dtype=torch.float64, **kw) -> LoRALinear:
    # B = 0 at init would make every check below trivial
    return randomize_adapters(LoRALinear(make_base(kind, n_in, n_out, dtype), **kw), std_b=0.3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_in,n_out,rows", SHAPES)
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_float64_equals_dense(kind, n_in, n_out, rows, rslora):
    layer = adapted(kind, n_in, n_out, r=5, alpha=12.0, rslora=rslora, adapter_dtype=torch.float64)
    x = torch.randn(2, rows, n_in, dtype=torch.float64) + 0.7  # leading batch dims, non-zero mean
    # Two small matmuls vs one dense one: rounding differs by ~K * 2^-53 ~ 1e-14 relative for K <= 130.
    assert normwise(layer(x), reference(layer, x)) < 1e-13
    assert layer(x).shape == (2, rows, n_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_in,n_out,rows", SHAPES)
def test_forward_per_dtype(dtype, kind, n_in, n_out, rows):
    layer = adapted(kind, n_in, n_out, dtype, r=4, alpha=16.0)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32  # adapter stays float32 on a low-precision base
    x = (torch.randn(rows, n_in) + 0.5).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    eps = torch.finfo(dtype).eps
    # About six roundings of u = eps/2 (A, B, x A^T, * scale, output, sum) plus fp32 accumulation over
    # K <= 130; measured worst 3 eps over 90 random cases, so 8 eps normwise is a bound with margin.
    assert normwise(y, reference(layer, x)) < 8 * eps


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_dense_autograd_float64(kind):
    layer = adapted(kind, 45, 31, r=3, alpha=6.0, adapter_dtype=torch.float64)
    x = torch.randn(7, 45, dtype=torch.float64) + 0.3
    g_out = torch.randn(7, 31, dtype=torch.float64)

    (layer(x) * g_out).sum().backward()

    # Independent reference: autograd through the dense re-parametrisation W0 + scale * B @ A.
    a = layer.lora_A.detach().clone().requires_grad_()
    b = layer.lora_B.detach().clone().requires_grad_()
    bias = None if layer.base.bias is None else layer.base.bias.detach()
    y = F.linear(x, dense_weight(layer) + scale_of(layer) * b @ a, bias)
    (y * g_out).sum().backward()

    # Same math, different association order: a few ulps of float64 relative to the gradient's size.
    assert normwise(layer.lora_A.grad, a.grad) < 1e-13
    assert normwise(layer.lora_B.grad, b.grad) < 1e-13
    assert all(p.grad is None and not p.requires_grad for p in layer.base.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_in,n_out,rows", SHAPES)
def test_gradients_per_dtype(dtype, kind, n_in, n_out, rows):
    layer = adapted(kind, n_in, n_out, dtype, r=4, alpha=8.0)
    x = (torch.randn(rows, n_in) + 0.5).to(dtype)
    g_out = torch.randn(rows, n_out).to(dtype)
    (layer(x).float() * g_out.float()).sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32  # gradients land in the adapter's dtype

    a = layer.lora_A.detach().double().requires_grad_()
    b = layer.lora_B.detach().double().requires_grad_()
    bias = None if layer.base.bias is None else layer.base.bias.detach().double()
    (F.linear(x.double(), dense_weight(layer) + scale_of(layer) * (b @ a), bias) * g_out.double()).sum().backward()
    eps = torch.finfo(dtype).eps
    # Backward rounds like the forward (casts of A, B, the (M, r) intermediates, the products) plus accumulation
    # over K <= 130 rows/features; measured worst 3.6 eps over 540 random cases, so 8 eps normwise has margin.
    assert normwise(layer.lora_A.grad, a.grad) < 8 * eps
    assert normwise(layer.lora_B.grad, b.grad) < 8 * eps


def test_base_gets_no_gradient_and_no_optimizer_state():
    layer = adapted("linear", 20, 12, torch.float32)
    w0 = layer.base.weight.detach().clone()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)  # all parameters: frozen ones must be skipped
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(5, 20)).pow(2).sum().backward()
        opt.step()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert set(opt.state) == {layer.lora_A, layer.lora_B}
    assert torch.equal(layer.base.weight, w0)


def test_init_starts_at_the_base_output():
    base = nn.Linear(300, 40)
    layer = LoRALinear(base, r=16, alpha=32.0)
    assert torch.equal(layer.lora_B, torch.zeros(40, 16))
    bound = 1 / math.sqrt(300)  # kaiming_uniform(a=sqrt 5) on fan_in=300 is U(-1/sqrt(300), 1/sqrt(300))
    assert layer.lora_A.abs().max() <= bound
    # std of U(-c, c) is c / sqrt(3); 4800 samples put the estimate within ~2% (5% is > 2 sigma of slack).
    assert layer.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    x = torch.randn(3, 300)
    assert torch.equal(layer(x), base(x))  # B = 0: the update is exactly zero
    assert layer.scale == 2.0 and LoRALinear(nn.Linear(4, 4), r=16, alpha=32.0, rslora=True).scale == 8.0


def test_attributes_and_weight_delegation():
    conv = make_base("conv1d", 10, 6, torch.float32)
    layer = LoRALinear(conv, r=2, alpha=4.0, dropout=0.25)
    assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (10, 6, True)
    assert layer.lora_A.shape == (2, 10) and layer.lora_B.shape == (6, 2)
    assert layer.weight is conv.weight and layer.bias is conv.bias  # HF code reads `proj.weight.dtype`
    assert isinstance(layer.dropout, nn.Dropout) and layer.dropout.p == layer.dropout_p == 0.25
    assert isinstance(LoRALinear(nn.Linear(3, 3)).dropout, nn.Identity)
    randomize_adapters(layer, std_b=1.0)
    assert layer.delta_weight().dtype == torch.float32 and layer.delta_weight().shape == (6, 10)
    assert normwise(layer.delta_weight(), delta(layer)) < 1e-6  # float32 product of K = 2 terms: ~2 ulps
    assert torch.equal(layer.dense_base_weight(), conv.weight.T)


def test_dropout_applies_to_the_adapter_input_only():
    layer = adapted("linear", 16, 8, torch.float32, r=2, alpha=2.0, dropout=0.5)
    x = torch.randn(4, 16)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    dropped = F.dropout(x, 0.5, training=True)
    expected = layer.base(x) + scale_of(layer) * dropped @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)  # same mask; float32 reassociation only
    assert not torch.allclose(y, reference(layer, x).float(), atol=1e-3)  # the mask really changed the output
    layer.eval()
    # eval: no dropout, so LoRA equals the dense layer (float32 base: a few ulps).
    assert normwise(layer(x), reference(layer, x)) < 1e-5


def test_injecting_into_eval_base_keeps_eval_mode():
    base = nn.Linear(4, 4).eval()
    assert not LoRALinear(base, dropout=0.5).training


@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_float64_and_exact_restore(kind):
    layer = adapted(kind, 33, 19, r=4, alpha=8.0, adapter_dtype=torch.float64).eval()
    original = layer.base.weight
    w0 = original.detach().clone()
    x = torch.randn(5, 33, dtype=torch.float64)
    y = layer(x)
    assert normwise(y, reference(layer, x)) < 1e-13  # float64: a few ulps (see the forward test)
    layer.merge()
    layer.merge()  # idempotent: no second delta
    assert layer.merged
    merged_weight = layer.base.weight.detach().clone()
    # One dense matmul vs two small ones: float64 rounding at ~1e-15 relative.
    assert normwise(layer(x), y) < 1e-13
    assert torch.equal(original, w0)  # the original object is never written to (safe for tied weights)
    layer.unmerge()
    layer.unmerge()
    assert not layer.merged and layer.base.weight is original and torch.equal(layer.base.weight, w0)
    layer.merge()
    assert torch.equal(layer.base.weight, merged_weight)  # merge after unmerge reproduces the same weight


@pytest.mark.parametrize("dtype,u", [(torch.bfloat16, 2**-8), (torch.float16, 2**-11), (torch.float32, 2**-24)])
def test_merge_rounding_bound_per_dtype(dtype, u):
    layer = adapted("linear", 48, 40, dtype, r=4, alpha=8.0).eval()
    w0 = dense_weight(layer)
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    exact = w0 + scale_of(layer) * b @ a
    layer.merge()
    err = (layer.base.weight.double() - exact).abs()
    # One rounding to the base dtype (half an ulp: u |w|), after W0 + scale * B @ A computed in float32, whose
    # error is at most a few float32 ulps of the magnitudes summed (K = 4 products + 1 add: 2^-22 covers them).
    float32_work = 2**-22 * (w0.abs() + scale_of(layer) * b.abs() @ a.abs())
    assert (err <= u * exact.abs() + float32_work).all()
    if dtype != torch.float32:
        assert err.max() > 0  # the rounding is real for a low-precision base (what the docstring warns about)
    layer.unmerge()


def test_merged_forward_refuses_training_but_allows_inference():
    layer = adapted("linear", 8, 8, torch.float32)
    layer.merge()
    with pytest.raises(RuntimeError, match="merged.*unmerge"):
        layer(torch.randn(2, 8))  # train mode + grad enabled: A and B would silently get no gradient
    with torch.no_grad():
        layer(torch.randn(2, 8))
    layer.eval()
    layer(torch.randn(2, 8))


@pytest.mark.parametrize("kind", KINDS)
def test_disabled_computes_the_base_exactly_also_when_merged(kind):
    layer = adapted(kind, 12, 9, torch.float32).eval()
    x = torch.randn(3, 12)
    base_out = layer.base(x)
    layer.enabled = False
    assert torch.equal(layer(x), base_out)
    layer.merge()
    assert torch.equal(layer(x), base_out)  # merged + disabled uses the set-aside original weight
    layer.enabled = True
    assert not torch.equal(layer(x), base_out)


def test_state_dict_keys_are_the_base_names_plus_adapter():
    base = nn.Linear(6, 4)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    layer = LoRALinear(base, r=2)
    sd = layer.state_dict()
    assert list(sd) == ["weight", "bias", "lora_A", "lora_B"]
    assert torch.equal(sd["weight"], before["weight"])
    assert not sd["weight"].requires_grad  # detached, as state_dict() always gives
    assert isinstance(layer.state_dict(keep_vars=True)["weight"], nn.Parameter)


def test_merged_state_dict_holds_the_original_weight():
    layer = adapted("linear", 6, 4, torch.float32)
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.state_dict()["weight"], w0)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.load_state_dict(layer.state_dict())


def test_load_base_checkpoint_strict_and_reject_half_adapter():
    source = nn.Linear(6, 4)
    layer = LoRALinear(nn.Linear(6, 4), r=2)
    a0 = layer.lora_A.detach().clone()
    result = layer.load_state_dict(source.state_dict())  # strict: no lora keys is a base checkpoint
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(layer.base.weight, source.weight) and torch.equal(layer.lora_A, a0)

    full = LoRALinear(nn.Linear(6, 4), r=2)
    randomize_adapters(full, std_b=1.0)
    layer.load_state_dict(full.state_dict())
    assert torch.equal(layer.lora_B, full.lora_B) and torch.equal(layer.base.weight, full.base.weight)

    partial = full.state_dict()
    del partial["lora_B"]
    with pytest.raises(RuntimeError, match='Missing key.*"lora_B"'):
        layer.load_state_dict(partial)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"r": 0}, "r must be an int >= 1"),
        ({"r": 2.0}, "r must be an int >= 1"),
        ({"r": True}, "r must be an int >= 1"),
        ({"alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"alpha": float("nan")}, "alpha must be a finite number > 0"),
        ({"dropout": 1.0}, r"dropout must be a probability in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be a probability in \[0, 1\)"),
    ],
)
def test_bad_hyperparameters_leave_the_base_untouched(kwargs, match):
    base = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=match):
        LoRALinear(base, **kwargs)
    assert all(p.requires_grad for p in base.parameters())  # validated before freezing


def test_bad_bases():
    with pytest.raises(TypeError, match="base must be nn.Linear, HF Conv1D or NF4Linear, got Conv2d"):
        LoRALinear(nn.Conv2d(2, 2, 1))
    with pytest.raises(TypeError, match="already a LoRALinear"):
        LoRALinear(LoRALinear(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="adapter_dtype must be a floating"):
        LoRALinear(nn.Linear(2, 2), adapter_dtype=torch.int32)


def test_nf4_base_state_dict_merge_and_disable():
    from lowrank import NF4Linear

    base = NF4Linear.from_linear(nn.Linear(64, 24))
    base_keys = list(base.state_dict())
    packed = {k: v.clone() for k, v in base.state_dict().items() if isinstance(v, torch.Tensor)}
    layer = randomize_adapters(LoRALinear(base, r=4, alpha=8.0).eval(), std_b=0.1)
    assert list(layer.state_dict()) == base_keys + ["lora_A", "lora_B"]  # 'weight.absmax' etc., no 'base.'
    assert "weight.absmax" in base_keys
    result = layer.load_state_dict(base.state_dict())  # a quantized base checkpoint loads with strict=True
    assert result.missing_keys == [] and result.unexpected_keys == []

    x = torch.randn(3, 64)
    y = layer(x)
    w0 = base.dequantize_weight(torch.float64)
    expected = F.linear(x.double(), w0 + delta(layer), base.bias.double())
    assert normwise(y, expected) < 1e-5  # float32 compute vs float64 on K = 64: a few ulps
    layer.merge()
    assert layer._merged_weight.shape == (24, 64)
    assert normwise(layer(x), y) < 1e-5  # one dense float32 matmul vs dequant + two small ones
    with torch.no_grad():
        layer.enabled = False
        assert torch.equal(layer(x), base(x))  # the NF4 base itself is untouched by merge
        layer.enabled = True
    now = base.state_dict()
    assert all(torch.equal(now[k], v) for k, v in packed.items())
    layer.unmerge()
    assert layer._merged_weight is None and torch.equal(layer(x), y)


@pytest.mark.parametrize("kind", KINDS)
def test_cast_while_merged_carries_the_original_weight_along(kind):
    """model.to(dtype) while merged: the set-aside original follows (LoRALinear._apply), so disabling, the state
    dict and unmerge all give the base cast to the new dtype, exactly as if the unmerged model had been cast."""
    reference = adapted(kind, 12, 9, torch.float32).eval()
    layer = adapted(kind, 12, 9, torch.float32).eval()
    layer.load_state_dict(reference.state_dict())
    reference.to(torch.float64)
    layer.merge()
    layer.to(torch.float64)
    x = torch.randn(3, 12, dtype=torch.float64)
    assert layer.weight.dtype == torch.float64
    layer.enabled = False
    assert torch.equal(layer(x), reference.base(x))  # merged + disabled: the original, cast once
    layer.enabled = True
    sd, ref_sd = layer.state_dict(), reference.state_dict()
    assert all(sd[k].dtype == torch.float64 and torch.equal(sd[k], ref_sd[k]) for k in ref_sd)
    layer.unmerge()
    assert torch.equal(layer(x), reference(x))
    assert torch.equal(layer.base.weight, reference.base.weight)


def test_state_dict_of_many_layers_keeps_per_layer_key_order():
    """The state-dict hook only touches each layer's own trailing keys: with many adapted layers the keys are
    the plain model's, in the plain model's order, each followed by that layer's lora_A, lora_B."""
    plain = nn.Sequential(*[nn.Linear(4, 4, bias=i % 2 == 0) for i in range(30)])
    expected = []
    for i, layer in enumerate(plain):
        expected += [f"{i}.weight"] + ([f"{i}.bias"] if layer.bias is not None else []) + [f"{i}.lora_A", f"{i}.lora_B"]
    lowrank.inject(plain, "all-linear", r=2)
    assert list(plain.state_dict()) == expected


def test_nf4_merge_sums_in_the_compute_dtype_when_it_is_wider():
    """An NF4 layer computing in float64 merges in float64 (W0 and the delta summed wide, then rounded once to
    the compute dtype), the same rule as a dense base and as save_merged: within 1e-12 of the float64 sum."""
    from lowrank import NF4Linear

    base = NF4Linear.from_linear(nn.Linear(64, 24), compute_dtype=torch.float64)
    layer = randomize_adapters(LoRALinear(base, r=4, alpha=8.0).eval(), std_b=0.1)
    expected = base.dequantize_weight(torch.float64) + delta(layer)
    layer.merge()
    assert layer._merged_weight.dtype == torch.float64
    torch.testing.assert_close(layer._merged_weight, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,wide", [(1, True), (32, True), (33, False), (300, False)])
def test_small_row_update_is_float32_rounded_once(dtype, rows, wide):
    # At most SMALL_ROWS rows of a 16-bit CPU input: the update is computed in float32 from the exact x, A, B and
    # rounded once, so nearly every element equals the float64 update rounded to the dtype (float32 sums over
    # K = 200 can flip a rounding tie rarely: at most 1 % of elements, each by one ulp). The 16-bit route rounds
    # A, B and x A^T first; the test checks both the route choice and, on the wide route, the accuracy.
    from lowrank.adapter import SMALL_ROWS, LoRAAdapter

    assert (rows <= SMALL_ROWS) == wide
    torch.manual_seed(rows)
    adapter = LoRAAdapter(200, 150, r=8, alpha=16.0)
    nn.init.normal_(adapter.lora_B, std=0.5)
    x = (torch.randn(rows, 200) + 0.3).to(dtype)
    assert adapter.wide_update(x) == wide
    got = adapter.update(x)
    assert got.dtype == dtype and got.shape == (rows, 150)
    exact = adapter.scale * (x.double() @ adapter.lora_A.double().T) @ adapter.lora_B.double().T
    rounded = exact.to(dtype)
    if wide:
        # one ulp, plus float32 summation slack where cancellation makes an element tiny
        bound = torch.finfo(dtype).eps * exact.abs() + 1e-6 * exact.abs().max()
        assert ((got.double() - exact).abs() <= bound).all()
        assert (got != rounded).float().mean().item() <= 0.01
    else:  # the 16-bit route: within its own bound (test_forward_per_dtype), not correctly rounded
        assert normwise(got.double(), exact) < 8 * torch.finfo(dtype).eps
