"""NF4 matmul with the LoRA down-projection in the same pass (``nf4_lora.matmul_lora``) against float64 references.

Runs on CPU in Triton's interpreter (in a subprocess: see ``_interpreter.py``) and on CUDA when present (``gpu``).
y is checked twice: bit for bit against ``nf4_matmul.matmul`` with the same tiles and splits (the LoRA switch must
not change it) and against the float64 product within the bound of ``_kernel_helpers.assert_within_bound``.
xa = x @ A^T is float32 for every x dtype, computed from x and A rounded to x's dtype; the reference is the float64
product of those same rounded operands, so only float32 accumulation error is allowed:
``|xa - ref| <= 2 eps32 K (|x| @ |A|^T) + 2 eps32 |ref|`` (the helper's bound with float32 as the output dtype).
"""

from __future__ import annotations

import pytest
import torch
from _interpreter import INTERPRETER_CHILD, devices, run_module_in_interpreter
from _kernel_helpers import TILES, assert_within_bound, nan_filled_empty, nf4_weight

from lowrank import nf4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


if not INTERPRETER_CHILD:

    def test_cpu_interpreter():
        """Every device-parametrized test below, on CPU, under TRITON_INTERPRET=1 (fresh process)."""
        print(run_module_in_interpreter(__file__))


@pytest.fixture
def lora(kernels):
    from lowrank.kernels import nf4_lora

    return nf4_lora


def _adapter(r, k, device, dtype=torch.float32):
    return (torch.randn(r, k, dtype=torch.float64) / k**0.5 + 0.02).to(dtype).to(device)  # non-zero mean


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("m", "n", "k", "block_size", "double_quant", "split", "r"),
    [
        (1, 40, 70, 32, True, 1, 8),  # M = 1; K = 70: partial K tile, blocks cross rows; N not a tile multiple
        (3, 33, 130, 64, False, 3, 20),  # r = 20 (BLOCK_R 32: masked A rows), split-K with a short last split
        (17, 24, 96, 32, True, 2, 8),  # M = 17: two row tiles, each with its own pid_n == 0 program
        (3, 17, 64, 64, True, 8, 20),  # more splits than K tiles: the empty splits' partials must be zeros
    ],
)
def test_matches_float64_and_leaves_y_unchanged(kernels, lora, device, dtype, m, n, k, block_size, double_quant,
                                                  split, r):  # fmt: skip
    q = nf4_weight(n, k, block_size, double_quant, device)
    x = (torch.randn(m, k, device=device) + 0.3).to(dtype)
    a = _adapter(r, k, device)  # float32, as LoRALinear stores it; the launcher rounds it to x's dtype
    tiles = {**TILES, "split": split}
    with nan_filled_empty():  # outputs and split-K partials (y's and xa's) start as NaN: an unwritten one shows
        y, xa = lora.matmul_lora(x, q, a, method="fused", config=tiles)
    assert torch.equal(y, kernels.matmul.matmul(x, q, method="fused", config=tiles))
    assert_within_bound(y, x, nf4.dequantize(q, dtype).T, dtype)
    assert xa.shape == (m, r)
    assert_within_bound(xa, x, a.to(dtype).T, torch.float32)  # xa is float32 whatever x's dtype: no rounding


@pytest.mark.parametrize("device", devices())
def test_strided_and_batched_inputs_with_default_tiles(kernels, lora, device):
    # No config: the launcher's own tiles and split rule. x is 3-D and a non-contiguous view; A is a transposed
    # (K, r) buffer in bf16 (an adapter dtype other than x's), so the launcher must cast and compact it.
    q = nf4_weight(48, 80, 64, True, device)
    x = torch.randn(2, 3, 160, device=device)[..., ::2]
    a = _adapter(16, 80, device, torch.bfloat16).T.contiguous().T
    assert a.stride(-1) != 1
    y, xa = lora.matmul_lora(x, q, a)
    assert (y.shape, xa.shape, xa.dtype) == ((2, 3, 48), (2, 3, 16), torch.float32)
    assert torch.equal(y, kernels.matmul.matmul(x, q))
    assert_within_bound(xa.reshape(6, 16), x.reshape(6, 80), a.float().T, torch.float32)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    ("m", "k", "r", "method"),
    [
        (3, 64, 8, "dequant"),  # asked for the dequantize-then-matmul route
        (3, 13, 8, "fused"),  # odd K: rows do not start on byte boundaries
        (0, 64, 8, "fused"),  # no rows
        (3, 64, 40, "fused"),  # r > MAX_R: the A tile would spill registers
    ],
)
def test_fallbacks_give_the_same_results(kernels, lora, device, m, k, r, method):
    assert r <= lora.MAX_R or r == 40
    q = nf4_weight(24, k, 32, True, device)
    x = torch.randn(m, k, device=device)
    a = _adapter(r, k, device)
    tiles = {**TILES, "split": 2}
    y, xa = lora.matmul_lora(x, q, a, method=method, config=tiles)
    assert torch.equal(y, kernels.matmul.matmul(x, q, method=method, config=tiles))
    assert xa.shape == (m, r) and xa.dtype == torch.float32
    if m:
        assert_within_bound(xa, x, a.T, torch.float32)
        assert_within_bound(y, x, nf4.dequantize(q, torch.float32).T, torch.float32)


@pytest.mark.parametrize("device", devices())
def test_rejects_bad_adapter(lora, device):
    q = nf4_weight(8, 64, 64, True, device)
    x = torch.randn(2, 64, device=device)
    with pytest.raises(ValueError, match=r"LoRA A must have shape \(r, 64\), got \(4, 32\)"):
        lora.matmul_lora(x, q, torch.randn(4, 32, device=device))
    with pytest.raises(ValueError, match="LoRA A must be a floating tensor"):
        lora.matmul_lora(x, q, torch.ones(4, 64, device=device, dtype=torch.int32))
    with pytest.raises(ValueError, match="x has 32 features"):  # x is checked as by matmul
        lora.matmul_lora(torch.randn(2, 32, device=device), q, torch.randn(4, 64, device=device))
