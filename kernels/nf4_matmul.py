"""Triton kernels: ``y = x @ W^T`` and ``grad_x = grad_y @ W`` with W (N, K) stored in NF4.

Two routes, chosen per call by ``method`` (and the number of rows M of x):

* ``"fused"``: a tiled matmul that reads the packed weight tile, decodes it in registers (the same math as
  ``nf4_dequant``) and feeds ``tl.dot``; the dequantized weight never exists in memory. With split-K (small M,
  decode and small batches) the weight streams once across many programs, each reducing one K (or N) range
  into a float32 partial sum; a ``torch.sum`` over the splits finishes (deterministic, no atomics).
* ``"dequant"``: dequantize the whole weight (``nf4_dequant``) and call ``torch.matmul`` (cuBLAS).

``"auto"`` takes the fused split-K kernel for M <= 16 and ``large_m_method()`` above: "dequant" until
benchmarks/bench_nf4.py measures both on a GPU (issue 4: whichever is faster at M = 8192);
``LOWRANK_NF4_LARGE_M=fused|dequant`` overrides it (read by ``lowrank.dispatch.settings()``).

Layout limits: the fused kernels decode whole bytes along a row, so they need an even K (every row then starts
on a byte boundary); blocks may still cross rows (the block comes from the flat index). An odd K (an odd
element count is only possible then) takes the "dequant" route, which works for any shape.

The forward kernel also has a ``HAS_LORA`` switch that computes a LoRA down-projection ``x @ A^T`` in the same
pass over x (inference only; its launcher is ``nf4_lora.matmul_lora``). Off, it compiles to the same code.

Numerics: the weight tile is rounded to x's dtype exactly as the reference ``x @ dequantize(W, x.dtype).T``
rounds it; products accumulate in float32 (``tl.dot``; float32 inputs use IEEE float32, not tf32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank import dispatch as _dispatch
from lowrank import nf4 as _nf4

from . import nf4_dequant as _dequant
from .nf4_dequant import LAUNCH_OPTIONS, _block_absmax, _cast, _decode, _weight_args, dequantize, interpreting

# The reference is ``x @ lowrank.nf4.dequantize(W, lowrank.nf4.rounding_dtype(W, x.dtype)).to(x.dtype).T``.

# ------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _weight_tile(
    packed_ptr, absmax_ptr, absmax2_ptr, dmap_ptr, offset_ptr, code_ptr,
    offs_n, kb0, n_limit, kb_limit, KB,
    BLOCK_KB: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, GROUPED: tl.constexpr,
    DTYPE: tl.constexpr, W_DTYPE: tl.constexpr, LOOKUP: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Decoded weight tile W[offs_n, 2 * kb0 : 2 * (kb0 + BLOCK_KB)] -> (len(offs_n), 2 * BLOCK_KB) in DTYPE.

    Byte columns kb0.. of each row (KB = K / 2 bytes per row). Out-of-range elements (n >= n_limit or
    kb >= kb_limit) are exact zeros, so they add nothing to a dot product. GROUPED (K a multiple of the block
    size: rows start on block boundaries) loads one absmax per (row, block) and broadcasts it; otherwise one per
    byte. Values are rounded to W_DTYPE (the weight's original 16-bit dtype) first when it differs from DTYPE,
    as the reference does.
    """
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    offs_kb = kb0 + tl.arange(0, BLOCK_KB)
    row = offs_n[:, None].to(tl.int64) * KB  # (BN, 1) first byte of each row
    mask = (offs_n[:, None] < n_limit) & (offs_kb[None, :] < kb_limit)
    byte = tl.load(packed_ptr + row + offs_kb[None, :], mask=mask, other=0x77).to(tl.int32)  # (BN, BKB)
    values = _decode(byte, code_ptr, LOOKUP)  # (BN, 2 * BKB) float32
    if GROUPED:
        GROUP: tl.constexpr = min(BLOCK_KB, BLOCK_SIZE // 2)  # bytes per (row, block) piece of the tile
        GROUPS: tl.constexpr = BLOCK_KB // GROUP
        first = kb0 + tl.arange(0, GROUPS) * GROUP  # (GROUPS,)
        g_mask = (offs_n[:, None] < n_limit) & (first[None, :] < kb_limit)
        block = (row + first[None, :]) // (BLOCK_SIZE // 2)  # (BN, GROUPS)
        absmax = _block_absmax(block, g_mask, absmax_ptr, absmax2_ptr, dmap_ptr, offset_ptr, DOUBLE_QUANT)
        absmax = tl.reshape(tl.broadcast_to(absmax[:, :, None], (BLOCK_N, GROUPS, 2 * GROUP)), (BLOCK_N, 2 * BLOCK_KB))
    else:
        block = (row + offs_kb[None, :]) // (BLOCK_SIZE // 2)  # (BN, BKB): one absmax per byte
        absmax = _block_absmax(block, mask, absmax_ptr, absmax2_ptr, dmap_ptr, offset_ptr, DOUBLE_QUANT)
        absmax = tl.reshape(tl.join(absmax, absmax), (BLOCK_N, 2 * BLOCK_KB))
    values = values * absmax
    if W_DTYPE != DTYPE:
        values = _cast(values, W_DTYPE, INTERPRET).to(tl.float32)
    return _cast(values, DTYPE, INTERPRET)


@triton.jit
def _grouped_tile(pid, tiles_m, tiles_other, GROUP_M: tl.constexpr):
    """(pid_m, pid_other) of program ``pid`` in grouped order: GROUP_M row tiles share each column tile of the
    weight while it is in L2 (Triton tutorial 03's swizzle)."""
    group = pid // (GROUP_M * tiles_other)
    first_m = group * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_other)) % group_m
    pid_other = (pid % (GROUP_M * tiles_other)) // group_m
    return pid_m, pid_other


@triton.jit
def _split_range(split, total, BLOCK: tl.constexpr, SPLITS):
    """[start, end) of split ``split`` of a reduction of length ``total``: whole BLOCK steps, the last split
    possibly shorter (or empty: its program then writes zeros)."""
    chunk = tl.cdiv(tl.cdiv(total, BLOCK), SPLITS) * BLOCK
    start = split * chunk
    return start, min(start + chunk, total)


@triton.jit
def _store_tile(ptr, acc, offs_m, offs_c, M, C, split, PARTIAL: tl.constexpr, INTERPRET: tl.constexpr):
    """Store a float32 (BM, BC) tile of an (M, C) result: PARTIAL as is into ptr[split, M, C] (one partial sum per
    split, reduced by the launcher), else rounded to ptr's dtype into ptr[M, C]."""
    mask = (offs_m[:, None] < M) & (offs_c[None, :] < C)
    offs = offs_m[:, None].to(tl.int64) * C + offs_c[None, :]
    if PARTIAL:
        tl.store(ptr + split.to(tl.int64) * M * C + offs, acc, mask=mask)
    else:
        tl.store(ptr + offs, _cast(acc, ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _forward_kernel(
    x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, dmap_ptr, offset_ptr, code_ptr, y_ptr,
    M, N, K, stride_xm, SPLIT_K,
    BLOCK_SIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, PRECISION: tl.constexpr, PARTIAL: tl.constexpr,
    W_DTYPE: tl.constexpr, GROUPED: tl.constexpr, LOOKUP: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    a_ptr=None, xa_ptr=None, R=None, stride_am=None, HAS_LORA: tl.constexpr = False, BLOCK_R: tl.constexpr = 16,
):  # fmt: skip
    """y = x @ W^T over one (BLOCK_M, BLOCK_N) tile and one K split: (M, K) @ (K, N) -> (M, N).

    PARTIAL: write float32 into y[split, M, N] (split-K), else the tile in y's dtype.
    HAS_LORA: the programs of the first column tile (pid_n == 0) also compute the LoRA down-projection
    ``xa = x @ A^T``, (M, K) @ (K, R) -> (M, R), from the x tiles they load anyway; A (R, K) is in x's dtype,
    BLOCK_R a power of two >= R and >= 16 (the smallest tl.dot width). Their float32 sums are stored unrounded
    as xa[split, M, R] (one partial per split, also when SPLIT_K is 1). Without HAS_LORA the LoRA arguments
    default to None (constexpr: no kernel parameters) and every LoRA line is compiled out.
    """
    pid, split = tl.program_id(0), tl.program_id(1)
    pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start, k_end = _split_range(split, K, BLOCK_K, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        acc_xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < k_end)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
        w = _weight_tile(packed_ptr, absmax_ptr, absmax2_ptr, dmap_ptr, offset_ptr, code_ptr, offs_n, k0 // 2, N,
                         k_end // 2, K // 2, BLOCK_K // 2, BLOCK_SIZE, DOUBLE_QUANT, GROUPED, x.dtype, W_DTYPE, LOOKUP,
                         INTERPRET)  # fmt: skip
        if INTERPRET:  # the interpreter's 16-bit dot is wrong for bf16: exact products in float32 instead
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)  # (BM, BK) @ (BK, BN)
        if HAS_LORA:
            if pid_n == 0:  # one column of programs reads A (R * K elements once per row tile); the rest skip it
                a_mask = (offs_r[:, None] < R) & (offs_k[None, :] < k_end)
                a = tl.load(a_ptr + offs_r[:, None] * stride_am + offs_k[None, :], mask=a_mask, other=0.0)
                # A comes in x's dtype (the launcher casts it): .to is a no-op, except under the interpreter,
                # where x was widened to float32 above.
                acc_xa += tl.dot(x, tl.trans(a.to(x.dtype)), input_precision=PRECISION)  # (BM, BK) @ (BK, BR)
    _store_tile(y_ptr, acc, offs_m, offs_n, M, N, split, PARTIAL, INTERPRET)
    if HAS_LORA:
        if pid_n == 0:  # xa is always one float32 partial per split
            _store_tile(xa_ptr, acc_xa, offs_m, offs_r, M, R, split, True, INTERPRET)


@triton.jit
def _grad_x_kernel(
    g_ptr, packed_ptr, absmax_ptr, absmax2_ptr, dmap_ptr, offset_ptr, code_ptr, out_ptr,
    M, N, K, stride_gm, SPLIT_N,
    BLOCK_SIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, PRECISION: tl.constexpr, PARTIAL: tl.constexpr,
    W_DTYPE: tl.constexpr, GROUPED: tl.constexpr, LOOKUP: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """grad_x = grad_y @ W over one (BLOCK_M, BLOCK_K) tile and one N split: (M, N) @ (N, K) -> (M, K)."""
    pid, split = tl.program_id(0), tl.program_id(1)
    pid_m, pid_k = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_start, n_end = _split_range(split, N, BLOCK_N, SPLIT_N)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        g_mask = (offs_m[:, None] < M) & (offs_n[None, :] < n_end)
        g = tl.load(g_ptr + offs_m[:, None].to(tl.int64) * stride_gm + offs_n[None, :], mask=g_mask, other=0.0)
        w = _weight_tile(packed_ptr, absmax_ptr, absmax2_ptr, dmap_ptr, offset_ptr, code_ptr, offs_n,
                         pid_k * (BLOCK_K // 2), n_end, K // 2, K // 2, BLOCK_K // 2, BLOCK_SIZE, DOUBLE_QUANT, GROUPED,
                         g.dtype, W_DTYPE, LOOKUP, INTERPRET)  # fmt: skip
        if INTERPRET:  # as in _forward_kernel
            g, w = g.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(g, w, input_precision=PRECISION)  # (BM, BN) @ (BN, BK)
    _store_tile(out_ptr, acc, offs_m, offs_k, M, K, split, PARTIAL, INTERPRET)


# ------------------------------------------------------------------------------------------------- launchers

SMALL_M = 16  # M <= SMALL_M: split-K kernel (one 16-row tile: the smallest tl.dot tile on NVIDIA tensor cores)


def large_m_method() -> str:
    """The route for M > SMALL_M under "auto": ``lowrank.dispatch.settings().nf4_large_m`` (LOWRANK_NF4_LARGE_M)."""
    return _dispatch.settings().nf4_large_m


_METHODS = ("auto", "fused", "dequant")
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
_DTYPES = tuple(_TL_DTYPES)


def _config(block_m, block_n, block_k, warps, stages, group_m=8):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


# Candidates for the autotuner (GPU only), keyed on the shape. Pruned with benchmarks/compile_nf4.py (sm_90, bf16,
# triton 3.9): configs that spilled registers or needed > 100 KB of shared memory are out (e.g. 16x64x256 with
# 4 warps: 255 registers + 196 B spills; 128x256x64: 764 B spills). Small M: one 16-row tile, long K steps so
# each program streams long runs of packed bytes. Large M: tiles whose decoded weight fits in registers.
_SMALL_CONFIGS = [
    _config(16, bn, bk, w, s) for bn, bk, w, s in
    [(32, 256, 4, 3), (64, 128, 4, 4), (64, 256, 8, 3), (128, 128, 8, 3), (32, 512, 8, 3), (64, 64, 4, 4)]
]  # fmt: skip
_LARGE_CONFIGS = [
    _config(bm, bn, bk, w, s) for bm, bn, bk, w, s in
    [(128, 128, 64, 8, 3), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 4), (128, 128, 32, 8, 4),
     (64, 256, 64, 8, 3)]
]  # fmt: skip
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}  # small tiles: fast in numpy
# HAS_LORA / R (absent from plain calls) give the LoRA variant (nf4_lora.py) its own tuning.
_TUNE_KEY = ["M", "N", "K", "SPLIT_K", "DOUBLE_QUANT", "GROUPED", "LOOKUP", "HAS_LORA", "R"]
_forward_small = triton.autotune(_SMALL_CONFIGS, key=_TUNE_KEY)(_forward_kernel)
_forward_large = triton.autotune(_LARGE_CONFIGS, key=_TUNE_KEY)(_forward_kernel)
_grad_key = ["M", "N", "K", "SPLIT_N", "DOUBLE_QUANT", "GROUPED", "LOOKUP"]
# grad_x swaps the roles: BLOCK_N is the reduction step, BLOCK_K the output width.
_grad_x_small = triton.autotune(
    [_config(16, c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in _SMALL_CONFIGS],
    key=_grad_key,
)(_grad_x_kernel)
_grad_x_large = triton.autotune(_LARGE_CONFIGS, key=_grad_key)(_grad_x_kernel)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # TRITON_INTERPRET=1 on CPU: any small number exercises the split-K path
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split(m: int, out_cols: int, red: int, device: torch.device) -> int:
    """Splits of the reduction dimension ``red`` for small M: about 2 programs per SM with 64-wide output tiles
    and at least 512 reduction elements per split (fewer would spend more on the partial sums than they save)."""
    if m > SMALL_M:
        return 1
    tiles = triton.cdiv(out_cols, 64)
    return max(1, min(triton.cdiv(red, 512), triton.cdiv(2 * _sm_count(device), tiles)))


def _dequantize_as(w: _nf4.NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``reference_weight`` through the Triton dequantize kernel (the "dequant" route)."""
    return dequantize(w, _nf4.rounding_dtype(w, dtype)).to(dtype)


def _check(x: torch.Tensor, w: _nf4.NF4Tensor, red: int, name: str) -> None:
    if len(w.shape) != 2:
        raise ValueError(f"NF4 matmul needs a 2-D weight (N, K), got shape {tuple(w.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"NF4 matmul supports {_DTYPES}, got {name} of dtype {x.dtype}")
    if x.shape[-1] != red:
        raise ValueError(f"{name} has {x.shape[-1]} features, the NF4 weight {tuple(w.shape)} needs {red}")
    if x.device != w.packed.device:
        raise ValueError(f"{name} is on {x.device}, the NF4 weight on {w.packed.device}")


def _route(x, w, red, out_cols, name, method, config):
    """Checks one call and picks its route: None for "dequant" (asked for, chosen by "auto", odd K or M = 0),
    else ``(x2, split, config)``: x as (M, red) with unit stride, the reduction splits, the tiles without "split"."""
    _check(x, w, red, name)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    x2 = x.reshape(-1, red)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if method == "auto":
        method = "fused" if m <= SMALL_M else large_m_method()
    if method == "dequant" or w.shape[1] % 2 or m == 0:  # odd K: rows do not start on byte boundaries (docstring)
        return None
    config = dict(config) if config is not None else None
    split = config.pop("split", 1) if config is not None else _split(m, out_cols, red, x.device)
    return x2, split, config


def _launch(kernels, out_block, x2, w, out_cols, split, config, lora=None):
    """Run the forward or grad-x kernel on a 2-D input; returns (M, out_cols) in x2's dtype.

    ``lora``: the forward kernel's LoRA arguments (``a_ptr``, ``xa_ptr``, ``R``, ``stride_am``, ``HAS_LORA``,
    ``BLOCK_R``), passed through unchanged; the caller allocates and reduces ``xa``.
    """
    m = x2.shape[0]
    n, k = w.shape
    partial = split > 1
    out = torch.empty((split, m, out_cols) if partial else (m, out_cols), device=x2.device,
                      dtype=torch.float32 if partial else x2.dtype)  # fmt: skip
    meta = {
        "BLOCK_SIZE": w.block_size,
        "DOUBLE_QUANT": w.double_quant,
        "PARTIAL": partial,
        # float32 operands: IEEE float32 products (torch.matmul does not use tf32 by default either).
        "PRECISION": "ieee" if x2.dtype == torch.float32 or interpreting() else "tf32",
        "W_DTYPE": _TL_DTYPES[_nf4.rounding_dtype(w, x2.dtype)],
        "GROUPED": k % w.block_size == 0,  # rows start on block boundaries: one absmax per (row, block)
        "LOOKUP": _dequant.lookup(),
        "INTERPRET": interpreting(),
    }
    small, large = kernels

    def grid(c):
        return triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(out_cols, c[out_block]), split

    args = (x2, *_weight_args(w), out, m, n, k, x2.stride(0), split)
    if config is None and interpreting():  # the interpreter cannot autotune (it has no device timer)
        config = _INTERPRETER_CONFIG
    if config is not None:  # explicit tiles: tests and benchmarks
        conf = {"GROUP_M": 8, **config}
        warps, stages = conf.pop("num_warps", 4), conf.pop("num_stages", 3)
        small.fn[grid(conf)](*args, **meta, **conf, **(lora or {}), num_warps=warps, num_stages=stages,
                             **LAUNCH_OPTIONS)  # fmt: skip
    else:
        (small if m <= SMALL_M else large)[grid](*args, **meta, **(lora or {}), **LAUNCH_OPTIONS)
    return out.sum(0, dtype=torch.float32).to(x2.dtype) if partial else out


def matmul(x: torch.Tensor, w: _nf4.NF4Tensor, *, method: str = "auto", config: dict | None = None) -> torch.Tensor:
    """``y = x @ W^T`` with W (N, K) in NF4: (..., K) -> (..., N), in x's dtype (bf16 / fp16 / fp32).

    Args:
        x: input (..., K) on W's device (CUDA, or CPU under TRITON_INTERPRET=1).
        w: NF4 weight of shape (N, K).
        method: "auto" (split-K fused kernel for M <= 16, else ``large_m_method()``), "fused" or "dequant".
        config: explicit tiles ``{"BLOCK_M", "BLOCK_N", "BLOCK_K", "split", "num_warps", "num_stages"}``
            instead of the autotuner (required under the interpreter).

    Returns:
        (..., N) tensor equal to ``x @ dequantize(W, x.dtype).T`` up to float32 summation order.
    """
    n, k = w.shape if len(w.shape) == 2 else (None, None)
    route = _route(x, w, k, n, "x", method, config)
    if route is None:
        return x @ _dequantize_as(w, x.dtype).T
    x2, split, config = route
    y = _launch((_forward_small, _forward_large), "BLOCK_N", x2, w, n, split, config)
    return y.reshape(*x.shape[:-1], n)


def matmul_grad_x(
    grad_y: torch.Tensor, w: _nf4.NF4Tensor, *, method: str = "auto", config: dict | None = None
) -> torch.Tensor:
    """``grad_x = grad_y @ W`` with W (N, K) in NF4: (..., N) -> (..., K). Arguments as in ``matmul``
    (``config`` tiles: BLOCK_N is the reduction step, BLOCK_K the output width, ``split`` splits N)."""
    n, k = w.shape if len(w.shape) == 2 else (None, None)
    route = _route(grad_y, w, n, k, "grad_y", method, config)
    if route is None:
        return grad_y @ _dequantize_as(w, grad_y.dtype)
    g2, split, config = route
    out = _launch((_grad_x_small, _grad_x_large), "BLOCK_K", g2, w, k, split, config)
    return out.reshape(*grad_y.shape[:-1], k)
