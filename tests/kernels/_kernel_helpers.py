"""Helpers shared by the NF4 matmul kernel tests (test_nf4_matmul.py, test_nf4_lora.py).

Imported as ``_kernel_helpers`` (this folder is on sys.path under pytest's "prepend" mode, as for
``_interpreter``); not ``_helpers``, which names ``tests/_helpers.py``.

``assert_within_bound`` is the float64 reference with its error bound: ``out ~= a @ b`` where only float32
accumulation order and the final rounding to the output dtype may differ,
``|out - ref| <= 2 eps32 R (|a| @ |b|) + 2 eps_out |ref|`` element-wise (a standard summation error bound, doubled
for the split-K partial sums: one more float32 add per split and one final cast).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from lowrank import nf4

EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff
# Tiny tiles so the interpreter is fast and every shape in the tests spans several tiles and a partial last tile.
TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}


def nf4_weight(n, k, block_size, double_quant, device, dtype=torch.float32) -> nf4.NF4Tensor:
    w = torch.randn(n, k, dtype=torch.float64) * 0.05 + 0.01  # non-zero mean
    return nf4.quantize(w.to(dtype).to(device), block_size, double_quant)


def assert_within_bound(out, a, b, dtype) -> None:
    """out ~= a @ b (float64), a (M, R), b (R, C): accumulation bound plus one rounding to ``dtype``."""
    a64, b64 = a.double().cpu(), b.double().cpu()
    ref = a64 @ b64
    bound = 2 * EPS[torch.float32] * a.shape[1] * (a64.abs() @ b64.abs()) + 2 * EPS[dtype] * ref.abs() + 1e-30
    err = (out.double().cpu() - ref).abs()
    assert out.dtype == dtype
    assert torch.all(err <= bound), f"max err/bound {(err / bound).max().item():.3g}"
    # And the bound is not vacuous: it stays far below the values themselves.
    assert (bound.norm() / ref.norm()).item() < 0.05


@contextlib.contextmanager
def nan_filled_empty():
    """Within the block, ``torch.empty`` returns floating tensors filled with NaN (other dtypes as usual).

    The launchers allocate their outputs and split-K partial buffers with ``torch.empty``, whose memory is often
    already zero on CPU: an element the kernel never writes (an empty split that skips its store) would then
    pass as a correct zero. NaN makes it poison every sum it enters.
    """
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with pytest.MonkeyPatch.context() as m:  # undone when the block ends
        m.setattr(torch, "empty", empty)
        yield
