"""NF4Linear (storage, forward/backward, memory, bitsandbytes state-dict keys) and quantize(model)."""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _helpers import assert_unchanged, randomize_adapters, snapshot

import lowrank
from lowrank.nf4 import quantize as quantize_tensor
from lowrank.nf4_linear import NF4Linear, quantize


def _layer(in_f=96, out_f=40, bias=True, dtype=torch.float32, **kw):
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.add_(0.01)  # non-zero mean
    return lin, NF4Linear.from_linear(lin, **kw)


def test_storage_is_frozen_integer_parameters():
    lin, layer = _layer(block_size=64)
    params = dict(layer.named_parameters())
    assert {k: p.dtype for k, p in params.items()} == {
        "weight": torch.uint8, "weight_absmax": torch.uint8, "weight_absmax2": torch.int32,
        "weight_offset": torch.int32, "bias": torch.float32}  # fmt: skip
    assert not any(p.requires_grad for p in params.values())
    assert params["weight"].shape == (96 * 40 // 2, 1)  # bitsandbytes' layout, shardable along dim 0
    assert torch.equal(layer.nf4_weight().packed, quantize_tensor(lin.weight).packed)
    ints = {k: p.clone() for k, p in params.items() if k != "bias"}
    layer.to(torch.bfloat16)  # a dtype cast must not touch the quantized data (a cast absmax would corrupt W)
    assert all(torch.equal(getattr(layer, k), v) for k, v in ints.items())
    assert layer.bias.dtype == torch.bfloat16 and layer.dtype == torch.float32
    assert torch.equal(layer.dequantize_weight(), quantize_tensor(lin.weight).dequantize())
    _, plain = _layer(double_quant=False)
    assert plain.weight_absmax.dtype == torch.int32 and plain.weight_absmax2 is None  # float32 bits


def test_stored_bits_per_weight():
    layer = NF4Linear(1024, 1024, bias=False)
    stored = sum(p.numel() * p.element_size() for p in layer.parameters())
    assert stored * 8 / 1024**2 == pytest.approx(4.127, abs=5e-4)  # 4 + 8/64 + 32/16384 + (4-byte offset)
    assert stored == layer.nf4_weight().nbytes


@pytest.mark.parametrize("shape", [(7,), (2, 5), (1, 1, 3)])
def test_forward_and_backward_equal_the_dense_float64_layer(shape):
    _, layer = _layer()
    w = layer.dequantize_weight(torch.float64)  # float32 W is exact in float64
    layer.bias.requires_grad_(True)  # a user may train the bias
    x = torch.randn(*shape, 96, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref_b = layer.bias.detach().double().requires_grad_(True)
    ref = ref_x @ w.T + ref_b
    torch.testing.assert_close(y, ref, rtol=1e-13, atol=1e-13)  # float64 matmul, different summation order
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-13, atol=1e-13)  # same
    torch.testing.assert_close(layer.bias.grad.double(), ref_b.grad, rtol=1e-6, atol=1e-6)  # bias grad in float32


def test_bf16_weight_float32_input_uses_the_bf16_dequantized_weight():
    _, layer = _layer(dtype=torch.bfloat16)
    x = torch.randn(3, 96)
    w = layer.dequantize_weight()
    assert w.dtype == torch.bfloat16
    assert torch.equal(layer(x), F.linear(x, w.float(), layer.bias.float()))


def test_compute_dtype():
    _, layer = _layer(compute_dtype=torch.bfloat16)
    x = torch.randn(4, 96)
    y = layer(x)
    assert y.dtype == torch.float32  # cast back to the input's dtype
    assert torch.equal(y.bfloat16().float(), y)  # computed in bf16
    expected = F.linear(x.double(), layer.dequantize_weight(torch.float64), layer.bias.double())
    # bf16 inputs (rel. 2^-9 each), bf16 weight and output roundings, 96-term sums: a few bf16 ulps.
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)
    assert (y.double() - expected).abs().max() > 1e-4  # and it really is bf16, not float32
    with pytest.raises(TypeError, match="compute_dtype"):
        NF4Linear(8, 8, compute_dtype=torch.int8)


def test_wrong_input_width_is_refused():
    # (Which path serves a call, Triton or the torch reference, is tested in tests/kernels/test_compile.py.)
    _, layer = _layer()
    with pytest.raises(ValueError, match="expects inputs"):
        layer(torch.randn(2, 95))


def test_autograd_graph_saves_no_dequantized_weight():
    _, layer = _layer(in_f=256, out_f=128)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    # Exactly the packed codes and scales (0.52 bytes per weight), nothing (128, 256)-sized in floating point.
    assert sum(t.numel() * t.element_size() for t in saved) == layer.nf4_weight().nbytes
    assert not any(t.is_floating_point() and t.numel() >= 128 * 256 for t in saved)
    y.sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantize_weight().sum(0).expand(4, -1))  # float32, order only


# ---- state dict (bitsandbytes Linear4bit keys) ---------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_round_trip_with_bitsandbytes_keys(double_quant):
    _, layer = _layer(in_f=70, out_f=9, dtype=torch.bfloat16, double_quant=double_quant, block_size=32)
    sd = layer.state_dict()
    keys = {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"}
    if double_quant:
        keys |= {"weight.nested_absmax", "weight.nested_quant_map"}
    assert set(sd) == keys
    state = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()).decode())
    assert state["quant_type"] == "nf4" and state["blocksize"] == 32 and state["dtype"] == "bfloat16"
    assert state["shape"] == [9, 70] and sd["weight"].shape == (315, 1) and sd["weight"].dtype == torch.uint8
    if double_quant:
        assert state["nested_blocksize"] == 256 and state["nested_offset"] == layer.nf4_weight().offset.item()
        assert sd["weight.absmax"].dtype == torch.uint8 and sd["weight.nested_absmax"].dtype == torch.float32
    else:
        assert sd["weight.absmax"].dtype == torch.float32 and "nested_offset" not in state
    fresh = NF4Linear(70, 9, block_size=32, double_quant=double_quant)
    fresh.load_state_dict(sd)
    assert fresh.dtype == torch.bfloat16  # taken from the quant_state
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), layer.parameters(), strict=False))
    x = torch.randn(2, 70, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), layer(x))


def test_meta_construction_then_materialize_and_load():
    lin, layer = _layer()
    lazy = NF4Linear(96, 40, device="meta")  # no memory until materialized (large-model and FSDP2 init)
    assert lazy.weight.is_meta and lazy.weight.dtype == torch.uint8
    lazy = lazy.to_empty(device="cpu")
    lazy.load_state_dict(layer.state_dict())
    assert torch.equal(lazy.dequantize_weight(), layer.dequantize_weight())


def test_load_dense_weight_quantizes_it():
    lin, layer = _layer()
    fresh = NF4Linear(96, 40)
    fresh.load_state_dict(lin.state_dict())
    assert torch.equal(fresh.dequantize_weight(), layer.dequantize_weight())


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__nf4", _json(sd, blocksize=128)), "blocksize"),
        (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__nf4", _json(sd, quant_type="fp4")), "quant_type"),
        (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__nf4", _json(sd, shape=[96, 40])), "shape"),
        (lambda sd: sd.__setitem__("weight.quant_map", torch.linspace(-1, 1, 16)), "code book"),
        (lambda sd: sd.__setitem__("weight", sd["weight"][:-1]), "packed"),
        (lambda sd: sd.__setitem__("bias", torch.zeros(3)), "bias"),
        (lambda sd: sd.__setitem__("weight", torch.zeros(3, 3)), "without a quant_state"),
    ],
)
def test_load_rejects_mismatches_and_leaves_the_layer_unchanged(change, match):
    _, layer = _layer()
    sd = layer.state_dict()
    sd.pop("weight.quant_state.bitsandbytes__nf4") if match == "without a quant_state" else None
    change(sd)
    target = NF4Linear(96, 40)
    before = [p.clone() for p in target.parameters()]
    with pytest.raises(RuntimeError, match=match):
        target.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters(), strict=False))


def test_load_rejects_other_double_quant_setting():
    _, layer = _layer(double_quant=False)
    with pytest.raises(RuntimeError, match="double_quant=False, this layer True"):
        NF4Linear(96, 40).load_state_dict(layer.state_dict())


def _json(sd, **changes):
    state = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()).decode())
    state.update(changes)
    return torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


# ---- quantize(model) -------------------------------------------------------------------------------------------


class Conv1D(nn.Module):  # Hugging Face's GPT-2 layout, recognised by class name: weight (in, out)
    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32, bias=False)
        self.conv = Conv1D(32, 32)
        self.lm_head = nn.Linear(32, 50, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.down(F.gelu(self.up(h)))
        return self.lm_head(self.conv(h))


def _dequantized_twin(model, original):
    """The dense model holding exactly the weights the quantized one computes with."""
    twin = copy.deepcopy(original)
    with torch.no_grad():
        for name in ("up", "down"):
            getattr(twin, name).weight.copy_(getattr(model, name).dequantize_weight())
        twin.conv.weight.copy_(model.conv.dequantize_weight().T)
    return twin


def test_quantize_model_replaces_all_linear_but_the_head():
    model = Tiny()
    original = copy.deepcopy(model)
    assert quantize(model, block_size=32) is model
    assert isinstance(model.up, NF4Linear) and isinstance(model.down, NF4Linear) and isinstance(model.conv, NF4Linear)
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, original.lm_head.weight)
    assert model.conv.in_features == 32 and torch.equal(
        model.conv.dequantize_weight(), quantize_tensor(original.conv.weight.T, 32).dequantize()
    )  # Conv1D's (in, out) weight is stored as the usual (out, in)
    assert model.up.block_size == 32 and torch.equal(model.up.bias, original.up.bias)
    ids = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(model(ids), _dequantized_twin(model, original)(ids))  # float32 matmuls, same operands
    rel = ((model(ids) - original(ids)).norm() / original(ids).norm()).item()
    assert 0 < rel < 0.2  # 4-bit weights (~9% error each, three layers in series): close to, not equal to


def test_quantize_targets_exclude_and_head_when_named():
    model = quantize(Tiny(), targets=["up", "lm_head"], compute_dtype=torch.bfloat16)
    assert isinstance(model.lm_head, NF4Linear) and isinstance(model.up, NF4Linear)
    assert type(model.down) is nn.Linear and model.up.compute_dtype == torch.bfloat16
    model = quantize(Tiny(), exclude=["down"])
    assert type(model.down) is nn.Linear and isinstance(model.up, NF4Linear)


def test_quantize_replaces_a_shared_module_everywhere():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
    model.add_module("again", model[0])
    quantize(model)
    assert isinstance(model[0], NF4Linear) and model.again is model[0]


def _int_weight(model):
    model.down.weight = nn.Parameter(torch.ones(32, 64, dtype=torch.int32), requires_grad=False)


@pytest.mark.parametrize(
    "setup,kwargs,error,match",
    [
        (lambda m: None, {"block_size": 48}, ValueError, "block_size must be"),
        (lambda m: m.down.weight.data.__setitem__((3, 4), float("nan")), {}, ValueError, "down.weight holds 1 NaN"),
        (lambda m: m.up.weight.data.__setitem__((0, 0), float("inf")), {}, ValueError, "up.weight holds 1 NaN/inf"),
        (_int_weight, {}, TypeError, "down.weight must be a floating tensor"),
        (lambda m: None, {"targets": ["nope"]}, ValueError, "matched no module"),
        (lambda m: None, {"compute_dtype": torch.int8}, TypeError, "compute_dtype must be a floating"),
        (lambda m: None, {"targets": ["embed"]}, ValueError, "embed is a Embedding, not an nn.Linear"),
        (lambda m: lowrank.inject(m, ["up"], r=2), {}, ValueError, "quantize before inject"),
    ],
)
def test_quantize_errors_leave_the_model_unchanged(setup, kwargs, error, match):
    model = Tiny()
    setup(model)
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        quantize(model, **kwargs)
    assert_unchanged(model, snap)


def test_quantize_twice_and_nothing_to_quantize():
    model = quantize(Tiny())
    snap = snapshot(model)
    with pytest.raises(ValueError, match="nothing to quantize: every layer matched .* is already an NF4Linear"):
        quantize(model)
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="matched no module"):
        quantize(nn.Sequential(nn.ReLU()))


# ---- QLoRA: NF4Linear + LoRA is LoRA over the dequantized weight ------------------------------------------------


def _qlora_pair(r=4, alpha=8.0):
    _, layer = _layer(in_f=48, out_f=20)
    dense = nn.Linear(48, 20, dtype=torch.float64)
    dense.weight.data = layer.dequantize_weight(torch.float64)
    dense.bias.data = layer.bias.data.double()
    q = lowrank.LoRALinear(layer, r=r, alpha=alpha, adapter_dtype=torch.float64)
    d = lowrank.LoRALinear(dense, r=r, alpha=alpha, adapter_dtype=torch.float64)
    randomize_adapters(q, std_b=1.0)
    with torch.no_grad():
        d.lora_A.copy_(q.lora_A)
        d.lora_B.copy_(q.lora_B)
    return q, d


def test_qlora_outputs_and_adapter_gradients_match_dense_lora_float64():
    q, d = _qlora_pair()
    x = torch.randn(3, 5, 48, dtype=torch.float64)
    yq, yd = q(x), d(x)
    torch.testing.assert_close(yq, yd, rtol=1e-13, atol=1e-13)  # same float64 operands, summation order only
    g = torch.randn_like(yq)
    yq.backward(g)
    yd.backward(g)
    for a, b in ((q.lora_A, d.lora_A), (q.lora_B, d.lora_B)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)  # same


def test_qlora_training_steps_match_dense_lora():
    q, d = _qlora_pair()
    opts = [torch.optim.AdamW([m.lora_A, m.lora_B], lr=1e-2) for m in (q, d)]
    for _ in range(5):
        x = torch.randn(8, 48, dtype=torch.float64)
        target = torch.randn(8, 20, dtype=torch.float64)
        for model, opt in zip((q, d), opts, strict=False):
            opt.zero_grad()
            F.mse_loss(model(x), target).backward()
            opt.step()
    torch.testing.assert_close(q.lora_A, d.lora_A, rtol=1e-10, atol=1e-12)  # 5 Adam steps of float64 rounding
    torch.testing.assert_close(q.lora_B, d.lora_B, rtol=1e-10, atol=1e-12)  # same


def test_qlora_model_saves_no_dequantized_weight():
    model = quantize(Tiny())
    lowrank.inject(model, "all-linear", r=4)
    shapes = {(64, 32), (32, 64), (32, 32)}  # the quantized weights (out, in), and transposes
    shapes |= {s[::-1] for s in shapes}
    saved = []
    ids = torch.randint(0, 50, (3, 5))  # 15 tokens: no activation is (32, 32) or (64, 32)-shaped
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(ids).sum()
    assert saved and not any(t.is_floating_point() and tuple(t.shape) in shapes for t in saved)
    loss.backward()
    assert all(p.grad is not None for p in lowrank.adapter_parameters(model))


def test_merge_on_nf4_base_and_exact_unmerge():
    model = quantize(Tiny())
    randomize_adapters(lowrank.inject(model, ["up", "down"], r=4), std_b=0.1)  # r = 4, default alpha 8: scale 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 50, (2, 6))
    model.eval()
    y = model(ids)
    lowrank.merge(model)
    # Merged: dense dequantize(W) + delta in float32; only float32 rounding separates the two forms.
    torch.testing.assert_close(model(ids), y, rtol=1e-5, atol=1e-5)
    up = model.up
    w0, b, a = up.base.dequantize_weight(torch.float64), up.lora_B.double(), up.lora_A.double()
    exact = w0 + 2.0 * b @ a
    # W0 is exact in float32; float32 B @ A over K = 4 terms errs by at most 4 ulps of sum |b||a| (scale 2 is
    # exact), the sum with W0 by half an ulp of the result: doubled for second-order terms and summation order.
    bound = 2**-21 * 2.0 * (b.abs() @ a.abs()) + 2**-23 * exact.abs()
    assert up._merged_weight.dtype == torch.float32 and ((up._merged_weight.double() - exact).abs() <= bound).all()
    assert bound.max() < 1e-5 * (exact - w0).abs().max()  # far below the update it checks
    lowrank.unmerge(model)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # the NF4 base is untouched
    assert torch.equal(model(ids), y)


def test_qlora_model_state_dict_round_trip():
    model = randomize_adapters(lowrank.inject(quantize(Tiny()), "all-linear", r=4), std_b=1.0)
    sd = model.state_dict()
    assert {"up.weight", "up.weight.absmax", "up.weight.quant_state.bitsandbytes__nf4", "up.lora_A"} <= set(sd)
    fresh = lowrank.inject(quantize(Tiny()), "all-linear", r=4)
    fresh.load_state_dict(sd)  # strict
    ids = torch.randint(0, 50, (2, 6))
    assert torch.equal(fresh(ids), model(ids))
