"""The CPU NF4 path (``lowrank.nf4_cpu``, chosen by ``lowrank.dispatch`` for CPU tensors) and the settings module.

The claim is bit-for-bit equality with the torch reference ``x @ lowrank.nf4.dequantize(W, rounding dtype)^T``
(the reference itself is checked against a scalar reading of the format spec in tests/test_nf4.py), so every
comparison here is ``torch.equal``. Then what the scratch memory and the scale cache must never do: hand a caller
a buffer a later call overwrites, or serve stale scales after the weight changed.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn

from lowrank import dispatch, nf4, nf4_cpu
from lowrank.nf4_linear import NF4Linear

# (w dtype, x dtype): bf16 model (the demo and benchmarks), a float32 weight used in bf16, a bf16 weight fed
# float32 (rounded to bf16 first, then widened), fp16.
DTYPE_PAIRS = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
               (torch.float16, torch.float16), (torch.float32, torch.float32)]  # fmt: skip


def _weight(n, k, dtype=torch.float32, block=64, double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * 0.05 + 0.01  # non-zero mean
    return nf4.quantize(w.to(dtype), block, double_quant)


def _reference(x, q, transpose=True):
    w = nf4.dequantize(q, nf4.rounding_dtype(q, x.dtype)).to(x.dtype)
    return x @ w.t() if transpose else x @ w


@pytest.mark.parametrize(("w_dtype", "x_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize(("n", "k", "block", "double_quant"), [(48, 96, 64, True), (40, 64, 32, False),
                                                                (7, 320, 64, True)])  # fmt: skip
@pytest.mark.parametrize("m", [1, 7])
def test_matmul_equals_the_reference_bit_for_bit(w_dtype, x_dtype, n, k, block, double_quant, m):
    # k = 96 with block 64: blocks cross rows; n = 7: 35 blocks, not a multiple of the 256 nested block.
    q = _weight(n, k, w_dtype, block, double_quant)
    assert nf4_cpu.supports(q, x_dtype)
    x = torch.randn(m, k).to(x_dtype)
    g = torch.randn(m, n).to(x_dtype)
    assert torch.equal(nf4_cpu.matmul(x, q, True), _reference(x, q, True))
    assert torch.equal(nf4_cpu.matmul(g, q, False), _reference(g, q, False))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(nf4_cpu.dequantize(q, dtype), nf4.dequantize(q, dtype))


def test_layer_forward_and_backward_take_the_cpu_path_and_equal_the_reference(monkeypatch, lowrank_env):
    layer = NF4Linear.from_linear(nn.Linear(96, 40).to(torch.bfloat16))
    calls = []
    real = nf4_cpu.matmul
    monkeypatch.setattr(nf4_cpu, "matmul", lambda *a: calls.append(a[2]) or real(*a))
    x = torch.randn(3, 5, 96, dtype=torch.bfloat16, requires_grad=True)
    results = {}
    for forced in ("0", "1"):
        lowrank_env("LOWRANK_REFERENCE", forced)
        calls.clear()
        x.grad = None
        y = layer(x)
        y.float().square().sum().backward()
        results[forced] = (y.detach(), x.grad.clone())
        assert calls == ([True, False] if forced == "0" else [])  # forward x W^T, backward g W; none when forced
    assert torch.equal(results["0"][0], results["1"][0]) and torch.equal(results["0"][1], results["1"][1])


def test_calls_that_need_no_gradient_skip_the_op_dispatch_and_give_the_same_bits(monkeypatch):
    # nf4_linear calls the op's body directly when autograd will not need the backward (and no compile traces);
    # the registered op must still serve calls that need a gradient.
    q = _weight(40, 96, torch.bfloat16)
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    via_op = dispatch._nf4_matmul(x, *dispatch._op_args(x, q, "t")[1], True)
    calls = []
    real = dispatch._nf4_matmul
    monkeypatch.setattr(dispatch, "_nf4_matmul", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        assert torch.equal(dispatch.nf4_linear(x, q), via_op)
    assert torch.equal(dispatch.nf4_linear(x, q), via_op)  # grad mode on, but x needs no gradient
    assert calls == []
    xg = x.clone().requires_grad_()
    y = dispatch.nf4_linear(xg, q)
    assert calls == [1] and torch.equal(y.detach(), via_op)
    y.float().sum().backward()
    assert torch.equal(xg.grad, _reference(torch.ones(3, 40, dtype=torch.bfloat16), q, False))


def test_the_reference_serves_what_the_cpu_path_does_not():
    odd = _weight(5, 13, block=32)  # 65 elements: a partial last block and a padding nibble
    assert not nf4_cpu.supports(odd, torch.float32)
    assert not nf4_cpu.supports(_weight(8, 64), torch.float64)  # no float64 scratch path: the reference
    for q, dtype in ((odd, torch.float32), (_weight(8, 64), torch.float64)):
        x = torch.randn(2, q.shape[1], dtype=dtype)
        assert torch.equal(dispatch.nf4_linear(x, q), _reference(x, q))


def test_results_never_alias_the_scratch():
    # Every later call overwrites the scratch weight; outputs, dequantized weights handed to callers and the
    # saved-for-backward tensors must be separate memory.
    q1, q2 = _weight(64, 128, torch.bfloat16, seed=1), _weight(64, 128, torch.bfloat16, seed=2)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    y1 = dispatch.nf4_linear(x, q1)
    w1 = dispatch.dequantize(q1, torch.bfloat16)
    y1_copy, w1_copy = y1.clone(), w1.clone()
    dispatch.nf4_linear(x, q2)
    dispatch.dequantize(q2, torch.bfloat16)
    assert torch.equal(y1, y1_copy) and torch.equal(w1, w1_copy)
    assert torch.equal(w1, nf4.dequantize(q1, torch.bfloat16))


def test_scale_cache_follows_the_stored_tensors(monkeypatch):
    torch.manual_seed(3)
    layer = NF4Linear.from_linear(nn.Linear(64, 32, bias=False))
    x = torch.randn(2, 64)
    decodes = []
    real = nf4.dequantize_absmax
    monkeypatch.setattr(nf4, "dequantize_absmax", lambda q: decodes.append(1) or real(q))
    before = layer(x)
    assert layer(x).equal(before) and len(decodes) == 1  # the second forward uses the cached scales
    monkeypatch.undo()
    assert torch.equal(before, _reference(x, layer.nf4_weight()))
    # load_state_dict writes in place (copy_): the cached scales of the old weight must not be used.
    new = nn.Linear(64, 32, bias=False)
    layer.load_state_dict({"weight": new.weight.detach() * 10})
    after = layer(x)
    assert torch.equal(after, _reference(x, layer.nf4_weight()))
    assert not torch.equal(after, before)
    # An in-place write to one stored tensor (the nested scales) invalidates too.
    with torch.no_grad():
        layer.weight_absmax2.copy_((layer.weight_absmax2.view(torch.float32) * 2).view(torch.int32))
    assert torch.equal(layer(x), _reference(x, layer.nf4_weight()))


def test_inference_mode_tensors_without_version_counters():
    with torch.inference_mode():
        q = _weight(32, 64, torch.bfloat16)
        x = torch.randn(3, 64, dtype=torch.bfloat16)
        assert torch.equal(nf4_cpu.matmul(x, q, True), _reference(x, q))
        assert torch.equal(nf4_cpu.block_scales(q), nf4.dequantize_absmax(q))


def test_scratch_is_per_thread():
    q = _weight(64, 128, torch.bfloat16)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    expect = _reference(x, q)
    out = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, nf4_cpu.matmul(x, q, True))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(out[i], expect) for i in range(3))


def test_settings_are_read_once_and_reloaded_on_request(monkeypatch, lowrank_env):
    lowrank_env("LOWRANK_FUSED_LORA", None)
    assert dispatch.fused_lora_enabled() is False
    monkeypatch.setenv("LOWRANK_FUSED_LORA", "1")
    assert dispatch.fused_lora_enabled() is False  # not read per call
    assert dispatch.reload_settings().fused_lora and dispatch.fused_lora_enabled()
    lowrank_env("LOWRANK_NF4_LARGE_M", "fused")
    lowrank_env("LOWRANK_NF4_LOOKUP", "load")
    assert dispatch.settings() == dispatch.Settings(fused_lora=True, nf4_lookup="load", nf4_large_m="fused")
    with dispatch.override_settings(reference=True) as inside:
        assert inside.reference and dispatch.settings().reference
    assert not dispatch.settings().reference


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("LOWRANK_REFERENCE", "true"),
        ("LOWRANK_FUSED_LORA", "yes"),
        ("LOWRANK_NF4_LOOKUP", "table"),
        ("LOWRANK_NF4_LARGE_M", "auto"),
    ],
)
def test_a_bad_switch_value_names_the_variable_and_changes_nothing(monkeypatch, lowrank_env, var, value):
    lowrank_env(var, None)
    before = dispatch.settings()
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=f"{var}='{value}': expected one of"):
        dispatch.reload_settings()
    assert dispatch.settings() is before
