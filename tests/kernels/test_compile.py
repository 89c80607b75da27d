"""``torch.compile(fullgraph=True)`` of a model with NF4 layers and LoRA adapters, and the dispatch rules.

The NF4 matmul is the custom op ``lowrank::nf4_matmul`` (``lowrank/dispatch.py``): compile sees one opaque node
per NF4 layer, with a fake implementation for shapes and a registered backward. On CPU the op runs the torch
reference; on CUDA the same op runs the Triton kernels. The compiled model must give the same outputs and adapter
gradients as the eager one, with no graph break (``fullgraph=True`` raises on one). The CPU tests run in-process
and never touch triton.

The Triton path (``TWINS``): on CUDA as ``gpu`` tests; on CPU in Triton's interpreter (a subprocess, see
``_interpreter.py``), where dispatch's routing predicate is told that CPU tensors are CUDA ones, so that the same
glue (custom op -> Triton launchers, forward and backward, and ``dispatch.dequantize``) runs in both.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import randomize_adapters
from _interpreter import INTERPRETER_CHILD, devices, run_module_in_interpreter
from torch import nn

import lowrank
from lowrank import dispatch, nf4

TWINS = ("test_kernel_path_matches_reference_path", "test_dequantize_routes_to_the_kernel_bit_exact")

if not INTERPRETER_CHILD:

    def test_cpu_interpreter():
        """The Triton-path tests (TWINS), on CPU, under TRITON_INTERPRET=1 (fresh process)."""
        print(run_module_in_interpreter(__file__, tests=TWINS))


# The compiled graph may reorder float32 additions (Inductor fuses the bias and LoRA adds): a few ulps of the
# activations' scale (~1), not a change of function.
RTOL, ATOL = 1e-5, 1e-5


def _model(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 48, bias=False), nn.GELU(), nn.Linear(48, 16))
    model = model.to(device=device, dtype=dtype)
    lowrank.quantize(model, targets=["0", "2"])  # two NF4 layers; the head "4" stays dense
    lowrank.inject(model, targets=["0", "2", "4"], r=4, alpha=8.0)
    return randomize_adapters(model, std_b=0.1)  # non-zero B: the adapter path contributes to outputs and grads


def _loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in lowrank.adapter_parameters(model)]


def test_compile_fullgraph_matches_eager_on_cpu():
    torch._dynamo.reset()
    model = _model()
    assert sum(isinstance(m, lowrank.NF4Linear) for m in model.modules()) == 2
    x = torch.randn(3, 5, 64)
    eager_out, eager_grads = _loss_and_grads(model, x)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    out, grads = _loss_and_grads(compiled, x)
    torch.testing.assert_close(out, eager_out, rtol=RTOL, atol=ATOL)
    assert len(grads) == len(eager_grads) == 6  # A and B of three adapted layers
    for g, ge in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, ge, rtol=RTOL, atol=ATOL)
    # The function itself, independently: the dense float64 equivalent of layer 0, dequantized W + scale B A with
    # scale = alpha / r = 8 / 4.
    layer = model[0]
    w = layer.base.dequantize_weight(torch.float64) + 8.0 / 4 * (layer.lora_B.double() @ layer.lora_A.double())
    expect = x.double() @ w.T + layer.base.bias.double()
    torch.testing.assert_close(layer(x).double(), expect, rtol=1e-5, atol=1e-5)  # float32 matmul in the op


def test_compiled_graph_holds_the_custom_op():
    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    model = _model()
    torch.compile(model, fullgraph=True, backend=backend)(torch.randn(2, 64))
    assert sum("lowrank.nf4_matmul" in t for t in seen) == 2  # one opaque node per NF4 layer, no graph break


def test_op_registration_passes_opcheck():
    # torch.library.opcheck: schema, fake (meta) implementation, autograd registration and AOT dispatch.
    q = nf4.quantize(torch.randn(40, 64), 32, True)
    x = torch.randn(3, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.lowrank.nf4_matmul.default,
                          (x, q.packed, q.absmax_q, q.absmax2, q.offset, 40, 64, 32, torch.float32, True))  # fmt: skip
    p = nf4.quantize(torch.randn(40, 64), 64, False)
    torch.library.opcheck(torch.ops.lowrank.nf4_matmul.default,
                          (torch.randn(3, 40), p.packed, p.absmax, None, None, 40, 64, 64, torch.float32,
                           False))  # fmt: skip


class _CudaLike:
    """Stands in for a CUDA tensor where dispatch only asks whether it is one, and of which dtype."""

    is_cuda = True

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def test_triton_serves_cuda_tensors_of_kernel_dtypes_unless_forced(monkeypatch, lowrank_env):
    lowrank_env("LOWRANK_REFERENCE", None)
    # Triton importable, without importing it here (this process never imports triton: see _interpreter.py).
    monkeypatch.setattr(dispatch, "_kernels", lambda: ("nf4_dequant", "nf4_matmul", "nf4_lora"))
    assert all(dispatch._use_triton(_CudaLike(d)) for d in (torch.float32, torch.bfloat16, torch.float16))
    assert not dispatch._use_triton(_CudaLike(torch.float64))  # no kernel computes in float64
    assert not dispatch._use_triton(torch.randn(2, 8))  # a CPU tensor: the torch reference
    # dequantize asks with the packed (uint8) storage and the dtype W is rounded to.
    assert dispatch._use_triton(_CudaLike(torch.uint8), torch.bfloat16)
    assert not dispatch._use_triton(_CudaLike(torch.uint8), torch.float64)
    lowrank_env("LOWRANK_REFERENCE", "0")  # "0" is the default: Triton
    assert dispatch._use_triton(_CudaLike(torch.float32))
    lowrank_env("LOWRANK_REFERENCE", "1")
    assert dispatch._reference_forced() and not dispatch._use_triton(_CudaLike(torch.float32))
    lowrank_env("LOWRANK_REFERENCE", None)
    monkeypatch.setattr(dispatch, "_kernels", lambda: None)  # no triton on this platform: the reference serves
    assert not dispatch._use_triton(_CudaLike(torch.float32))


def test_nf4_linear_matches_float64_and_rejects_mismatch():
    q = nf4.quantize(torch.randn(24, 40, dtype=torch.bfloat16), 32, True)
    x = torch.randn(5, 40, dtype=torch.float64, requires_grad=True)
    y = dispatch.nf4_linear(x, q)
    w = nf4.dequantize(q, torch.bfloat16).double()  # 16-bit original: W rounded to bf16 first (exact in float64)
    torch.testing.assert_close(y, x @ w.T, rtol=0, atol=0)  # same float64 product, same order: exact
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5, 24, dtype=torch.float64) @ w, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not match weight"):
        dispatch.nf4_linear(torch.randn(5, 41), q)


def test_backward_keeps_only_the_nf4_storage():
    # Saved for backward: the packed bytes and scales (the op's own inputs), never a dequantized (out, in) W.
    q = nf4.quantize(torch.randn(24, 40), 32, True)
    x = torch.randn(5, 40, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dispatch.nf4_linear(x, q, torch.zeros(24, requires_grad=True)).sum().backward()
    stored = {t.data_ptr() for t in (q.packed, q.absmax_q, q.absmax2, q.offset)}
    assert saved and all(t.data_ptr() in stored for t in saved)
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= 24 * 40]


# ---- the Triton path (TWINS): CUDA, and CPU in the interpreter child -------------------------------------------


def _route_cpu_to_triton(monkeypatch, device: str) -> None:
    """On CPU, dispatch's routing predicate sees CPU tensors as CUDA ones (dtype and LOWRANK_REFERENCE still
    decide), so the ops call the Triton launchers, interpreted, where on a GPU they would call them compiled."""
    if device == "cpu":
        real = dispatch._use_triton
        monkeypatch.setattr(dispatch, "_use_triton", lambda t, *args: real(_CudaLike(t.dtype), *args))


def _count_calls(monkeypatch, module, *names) -> list[str]:
    """Wraps ``module.<name>`` for each name; returns the list the calls' names are appended to, in order."""
    calls = []

    def counting(name, real):
        return lambda *args, **kwargs: calls.append(name) or real(*args, **kwargs)

    for name in names:
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    return calls


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_kernel_path_matches_reference_path(kernels, monkeypatch, lowrank_env, device, dtype, compiled):
    # The same model on the Triton path and on the forced reference path (LOWRANK_REFERENCE=1): outputs and
    # adapter gradients. M = 10 rows take the fused split-K kernels; M = 28 the dequantize kernel + torch.matmul
    # (eager only: each compile costs seconds in the interpreter).
    _route_cpu_to_triton(monkeypatch, device)
    launches = _count_calls(monkeypatch, kernels.matmul, "matmul", "matmul_grad_x")
    for shape in [(2, 5, 64)] if compiled else [(2, 5, 64), (4, 7, 64)]:
        x = torch.randn(*shape, device=device, dtype=dtype)
        results = {}
        for name, forced in (("triton", "0"), ("reference", "1")):
            lowrank_env("LOWRANK_REFERENCE", forced)
            torch._dynamo.reset()
            model = _model(device, dtype)
            assert dispatch._use_triton(x) == (forced == "0")
            launches.clear()
            results[name] = _loss_and_grads(torch.compile(model, fullgraph=True) if compiled else model, x)
            # Both NF4 layers forward; grad_x for layer 2 only (layer 0's input x needs no gradient).
            assert launches == (["matmul", "matmul", "matmul_grad_x"] if forced == "0" else []), shape
        # bf16: the paths sum in different orders (split-K vs torch.matmul) before rounding to bf16, through 3
        # layers; float32: the same sums in another order, a few ulps of activations of size ~1.
        tol = {"rtol": 2e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 2**-6, "atol": 2**-6}
        torch.testing.assert_close(results["triton"][0], results["reference"][0], **tol)
        for g, ge in zip(results["triton"][1], results["reference"][1], strict=True):
            torch.testing.assert_close(g, ge, **tol)


@pytest.mark.parametrize("device", devices())
def test_dequantize_routes_to_the_kernel_bit_exact(kernels, monkeypatch, lowrank_env, device):
    _route_cpu_to_triton(monkeypatch, device)
    launches = _count_calls(monkeypatch, kernels.dequant, "dequantize")
    q = nf4.quantize(torch.randn(300, 33, device=device), 64, True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(dispatch.dequantize(q, dtype), nf4.dequantize(q, dtype))
    # A bf16 weight to float64: the kernel rounds to bf16 (W's own dtype), the cast to float64 is exact.
    q16 = nf4.quantize(torch.randn(40, 64, device=device, dtype=torch.bfloat16), 64, True)
    assert torch.equal(dispatch.dequantize(q16, torch.float64), nf4.dequantize(q16, torch.bfloat16).double())
    assert launches == ["dequantize"] * 4  # every call above ran the kernel
    lowrank_env("LOWRANK_REFERENCE", "1")
    assert torch.equal(dispatch.dequantize(q), nf4.dequantize(q)) and len(launches) == 4  # forced: the reference
