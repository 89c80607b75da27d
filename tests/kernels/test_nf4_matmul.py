"""NF4 matmul kernels (forward ``x @ W^T``, backward ``grad_y @ W``) against a float64 reference.

Runs on CPU in Triton's interpreter (in a subprocess: see ``_interpreter.py``) and on CUDA when present (``gpu``).
The reference is ``x @ dequantize(W, x.dtype)^T`` computed in float64 from the same rounded operands, so the only
differences allowed are float32 accumulation order and the final rounding to the output dtype:
``|y - ref| <= 2 eps32 K (|x| @ |W|^T) + 2 eps_out |ref|`` element-wise (``_kernel_helpers.assert_within_bound``).
Under the interpreter the kernel's 16-bit dot runs as float32 on the same rounded operands and bf16 results are
rounded explicitly (the interpreter's own cast truncates), so the bound is the same on both devices.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _interpreter import INTERPRETER_CHILD, devices, run_module_in_interpreter
from _kernel_helpers import TILES, assert_within_bound, nan_filled_empty, nf4_weight

from lowrank import dispatch, nf4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


if not INTERPRETER_CHILD:

    def test_cpu_interpreter():
        """Every device-parametrized test below, on CPU, under TRITON_INTERPRET=1 (fresh process)."""
        print(run_module_in_interpreter(__file__))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("m", "n", "k", "block_size", "double_quant", "split", "block_k"),
    [
        (1, 40, 70, 32, True, 1, 32),  # M = 1; K = 70: blocks cross rows (one absmax per byte), partial K tile
        (3, 33, 130, 64, False, 3, 32),  # M = 3, N not a tile multiple, split-K with a short last split
        (17, 24, 96, 32, True, 2, 32),  # M = 17: two row tiles; K % block == 0: one absmax per (row, block)
        (3, 17, 64, 64, True, 8, 32),  # more splits than K tiles: empty splits must write zeros
        (2, 20, 192, 32, True, 2, 128),  # a K tile spans 4 blocks: per-block absmax broadcast within the tile
    ],
)
def test_forward_and_grad_x(kernels, device, dtype, m, n, k, block_size, double_quant, split, block_k):
    q = nf4_weight(n, k, block_size, double_quant, device)
    w = nf4.dequantize(q, dtype)  # the operand the kernel must use: W rounded once to x's dtype
    x = torch.randn(m, k, device=device).to(dtype)
    tiles = {**TILES, "BLOCK_K": block_k, "split": split}
    g = torch.randn(m, n, device=device).to(dtype)
    with nan_filled_empty():  # outputs and split-K partials start as NaN: an element never written shows
        y = kernels.matmul.matmul(x, q, method="fused", config=tiles)
        gx = kernels.matmul.matmul_grad_x(g, q, method="fused", config=tiles)
    assert_within_bound(y, x, w.T, dtype)
    assert_within_bound(gx, g, w, dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    ("w_dtype", "dtype"),
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16), (torch.float16, torch.float32),
     (torch.bfloat16, torch.bfloat16)],
)  # fmt: skip
@pytest.mark.parametrize("lookup", ["gather", "load"])
def test_identity_input_gives_the_exact_weight(kernels, device, w_dtype, dtype, lookup, monkeypatch):
    # x = I: every output is one exact product (value * 1) plus exact zeros, so y = W^T bit for bit. This pins
    # the decoded tile itself: nibble order, block index across rows, absmax decode, and the rounding of W
    # (to its original 16-bit dtype first, then to x's dtype, as lowrank.dispatch's reference does), for both
    # code-book lookups of nf4_dequant._decode.
    monkeypatch.setattr(dispatch, "_settings", dataclasses.replace(dispatch.settings(), nf4_lookup=lookup))
    assert kernels.dequant.lookup() == lookup
    # K = 40: rows start mid-block (one absmax per byte); K = 64 with 64-wide K tiles: two blocks per tile row.
    for n, k, block_k in ((24, 40, 32), (20, 64, 64)):
        q = nf4_weight(n, k, 32, True, device, w_dtype)
        expect = nf4.dequantize(q, w_dtype if w_dtype != torch.float32 else dtype).to(dtype)  # (N, K)
        tiles = {**TILES, "BLOCK_K": block_k}
        for method in ("fused", "dequant"):
            y = kernels.matmul.matmul(torch.eye(k, device=device, dtype=dtype), q, method=method, config=tiles)
            assert torch.equal(y, expect.T), (method, k)
            gx = kernels.matmul.matmul_grad_x(torch.eye(n, device=device, dtype=dtype), q, method=method, config=tiles)
            assert torch.equal(gx, expect), (method, k)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("method", ["auto", "dequant"])
def test_methods_agree_and_batched_input(kernels, device, method):
    # "auto" at M = 2 * 3 = 6 takes the fused split-K kernel with its default tiles; "dequant" is the
    # dequantize-then-torch.matmul route. A 3-D input keeps its leading dimensions.
    q = nf4_weight(48, 80, 64, True, device)
    x = torch.randn(2, 3, 80, device=device)
    y = kernels.matmul.matmul(x, q, method=method)
    assert y.shape == (2, 3, 48)
    assert_within_bound(y.reshape(6, 48), x.reshape(6, 80), nf4.dequantize(q, torch.float32).T, torch.float32)
    gx = kernels.matmul.matmul_grad_x(torch.ones(2, 3, 48, device=device), q, method=method)
    assert gx.shape == (2, 3, 80)
    assert_within_bound(gx.reshape(6, 80), torch.ones(6, 48), nf4.dequantize(q, torch.float32), torch.float32)


@pytest.mark.parametrize("device", devices())
def test_odd_k_takes_the_dequant_route(kernels, device):
    # K = 13: rows do not start on byte boundaries, the fused kernels cannot decode whole bytes per row.
    q = nf4_weight(5, 13, 32, True, device)  # 65 elements: odd count, padding nibble
    x = torch.randn(3, 13, device=device)
    y = kernels.matmul.matmul(x, q, method="fused", config={**TILES, "split": 2})
    assert_within_bound(y, x, nf4.dequantize(q, torch.float32).T, torch.float32)


@pytest.mark.parametrize("device", devices())
def test_matmul_rejects_bad_input(kernels, device):
    q = nf4_weight(8, 64, 64, True, device)
    before = q.packed.clone()
    with pytest.raises(ValueError, match="x has 32 features, the NF4 weight \\(8, 64\\) needs 64"):
        kernels.matmul.matmul(torch.randn(2, 32, device=device), q)
    with pytest.raises(ValueError, match="supports"):
        kernels.matmul.matmul(torch.randn(2, 64, device=device).double(), q)
    with pytest.raises(ValueError, match="method must be one of"):
        kernels.matmul.matmul(torch.randn(2, 64, device=device), q, method="fast")
    with pytest.raises(ValueError, match="grad_y has 64 features"):
        kernels.matmul.matmul_grad_x(torch.randn(2, 64, device=device), q)
    flat = nf4.quantize(torch.randn(64, device=device), 64, True)
    with pytest.raises(ValueError, match="2-D weight"):
        kernels.matmul.matmul(torch.randn(2, 64, device=device), flat)
    assert torch.equal(q.packed, before)
