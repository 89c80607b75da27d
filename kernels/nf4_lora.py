"""Triton: the NF4 matmul ``y = x @ W^T`` and the LoRA down-projection ``xa = x @ A^T`` in one pass over x.

A LoRA layer over an NF4 base computes ``x W^T + b + scale * (x A^T) B^T``: the base matmul and ``x A^T`` both
read all of x. ``matmul_lora`` computes the two in one launch of ``nf4_matmul._forward_kernel`` with its
``HAS_LORA`` switch on: the programs of the first output-column tile also multiply the x tiles they load anyway
by the matching columns of A (r, K). That saves the separate ``x A^T`` launch and its read of x, which matters at
decode (M = 1..16), where each launch costs a few microseconds and the NF4 matmul itself is not much longer.
The rest of the adapter (the (M, r) @ (r, N) up-projection, the scale, the add) stays in torch.

Inference only (decode / generation): there is no autograd Function and no backward kernel.
``lowrank.dispatch.nf4_lora_linear`` refuses inputs that need a gradient; training takes ``nf4_matmul`` and
separate adapter matmuls.

Numerics: y is bit-identical to ``nf4_matmul.matmul`` with the same tiles and splits (the LoRA lines never touch
it). xa is the float32 sum of exact products of x and A, with A rounded to x's dtype first (the launcher casts
it; the unfused layer does the same ``A.to(x.dtype)``), returned in float32, unrounded: the caller rounds it
once to x's dtype, as its unfused ``F.linear(x, A)`` would (cuBLAS also accumulates in float32 and rounds once).

Limits: r <= ``MAX_R``; larger adapters, the "dequant" route (asked for, or "auto" above ``SMALL_M`` rows while
``large_m_method()`` is "dequant"), an odd K and M = 0 fall back to ``matmul`` plus a torch float32 ``x @ A^T``.
"""

from __future__ import annotations

import torch
import triton

from lowrank import nf4 as _nf4

from . import nf4_matmul as _mm

# The A tile (BLOCK_R, BLOCK_K) sits in registers beside the weight tile. ptxas, sm_90, bf16, the six small-M
# autotune configs (compiled as benchmarks/compile_nf4.py does, triton 3.9): BLOCK_R 16 spills in one config
# (16x32x512: 32 B), 32 in three (60-276 B), 64 in five (152-812 B). So r <= 32 fuses; larger r falls back.
# Speed not measured on a GPU yet (benchmarks/bench_nf4.py, entry lora_decode).
MAX_R = 32

# ------------------------------------------------------------------------------------------------- reference
# (for the weight: ``lowrank.nf4.dequantize``; the fallback's x A^T below)


def _xa_float32(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``x @ A^T`` in float32 from x and A rounded to x's dtype: (..., K) @ (K, r) -> (..., r)."""
    return x.float() @ a.to(x.dtype).float().T


# ------------------------------------------------------------------------------------------------- launcher


def _check_adapter(x: torch.Tensor, a: torch.Tensor, k: int) -> None:
    if a.dim() != 2 or a.shape[1] != k:
        raise ValueError(f"LoRA A must have shape (r, {k}), got {tuple(a.shape)}")
    if not a.is_floating_point() or a.device != x.device:
        raise ValueError(f"LoRA A must be a floating tensor on {x.device}, got {a.dtype} on {a.device}")


def matmul_lora(
    x: torch.Tensor, w: _nf4.NF4Tensor, a: torch.Tensor, *, method: str = "auto", config: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = x @ W^T`` (W (N, K) in NF4) and ``xa = x @ A^T`` (A (r, K)) in one pass over x. Inference only.

    Args:
        x: input (..., K) in bf16 / fp16 / fp32 on W's device (CUDA, or CPU under TRITON_INTERPRET=1).
        w: NF4 weight of shape (N, K).
        a: LoRA down-projection (r, K), any floating dtype; cast to x's dtype for the kernel.
        method, config: as in ``nf4_matmul.matmul`` (``config`` tiles: BLOCK_M, BLOCK_N, BLOCK_K, split, ...).

    Returns:
        ``(y, xa)``: y (..., N) in x's dtype, equal bit for bit to ``matmul(x, w, method, config)`` on the fused
        route; xa (..., r) in float32, not rounded to x's dtype (the caller does that, as its unfused path would).

    Raises:
        ValueError: as ``matmul``, or A of the wrong shape, dtype or device.
    """
    n, k = w.shape if len(w.shape) == 2 else (None, None)
    route = _mm._route(x, w, k, n, "x", method, config)
    _check_adapter(x, a, k)
    r = a.shape[0]
    if route is None or not 1 <= r <= MAX_R:
        return _mm.matmul(x, w, method=method, config=config), _xa_float32(x, a)
    x2, split, config = route
    a2 = a.to(x.dtype)  # the kernel multiplies x by A in x's dtype (tl.dot needs one operand dtype)
    if a2.stride(-1) != 1:
        a2 = a2.contiguous()
    m = x2.shape[0]
    xa = torch.empty((split, m, r), device=x.device, dtype=torch.float32)  # one float32 partial per K split
    lora = {"a_ptr": a2, "xa_ptr": xa, "R": r, "stride_am": a2.stride(0), "HAS_LORA": True,
            "BLOCK_R": max(16, triton.next_power_of_2(r))}  # fmt: skip
    y = _mm._launch((_mm._forward_small, _mm._forward_large), "BLOCK_N", x2, w, n, split, config, lora)
    # The same deterministic float32 reduction over splits as y's (no atomics); one split needs none.
    xa = xa.view(m, r) if split == 1 else xa.sum(0)
    return y.reshape(*x.shape[:-1], n), xa.reshape(*x.shape[:-1], r)
