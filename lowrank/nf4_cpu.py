"""The CPU path of the NF4 matmul: the reference math of ``lowrank.nf4.dequantize`` without its fresh memory.

    W = to_dtype(fp32(NF4_CODE[code] * absmax[block]))      (bit for bit ``lowrank.nf4.dequantize``)
    x @ W^T (forward) and grad_y @ W (backward) with that W, by ``torch.nn.functional.linear``

Where the time of the reference goes (2-core AMD EPYC, torch 2.13, one thread, a 1536x576 bf16 weight; see
``benchmarks/results/cpu_nf4.md``): the arithmetic is 0.37 ms when its buffers are warm, but a decode step
(one row of x) makes a fresh 1.7 MB index, a 3.5 MB float32 pair buffer and a 1.7 MB bf16 weight for every
layer; glibc hands buffers that large back to the kernel on free, so each call page-faults them in again:
3.0 ms per call, 8x the arithmetic. This module keeps one set of scratch buffers per thread, sized to the largest
weight seen (about 8 bytes per weight of that one weight: 7 MB for SmolLM2-135M's MLP), and decodes into them.
The dequantized W lives in the scratch only for the duration of one matmul, and the next layer overwrites it:
nothing is kept between forward and backward (the backward decodes again), so QLoRA's memory is unchanged.

The decoded block scales (float32, one per 64 weights: 1/16 of a byte per weight) are cached on the weight's
``absmax`` tensor, keyed on the version counters of the stored tensors, so ``load_state_dict`` or any in-place
write invalidates them. That skips five small ops per call (about 30 us each call; 210 NF4 layers per token).

Numerics: identical to the reference (same float32 multiply, same round-to-nearest-even cast, same matmul
call); ``tests/test_nf4_cpu.py`` checks it bit for bit.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from . import nf4 as _nf4
from .nf4 import NF4Tensor

_SCRATCH = threading.local()
_CACHE_ATTR = "_lowrank_absmax_cache"


def supports(weight: NF4Tensor, dtype: torch.dtype) -> bool:
    """Whether this path serves ``weight`` in compute dtype ``dtype``: a CPU weight of whole blocks (every
    SmolLM2 / Llama width is), 2-D, computing in a float dtype. Anything else takes the reference."""
    return (
        weight.packed.device.type == "cpu"
        and len(weight.shape) == 2
        and weight.numel % weight.block_size == 0
        and dtype in (torch.bfloat16, torch.float16, torch.float32)
    )


def _scratch(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A thread's reusable 1-D buffer ``name`` of at least ``numel`` elements (grown, never shrunk)."""
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = torch.empty(numel, dtype=dtype)
        setattr(_SCRATCH, name, buf)
    return buf[:numel]


def release_scratch() -> None:
    """Free this thread's scratch buffers (they are re-made on the next call)."""
    _SCRATCH.__dict__.clear()


def _versions(weight: NF4Tensor) -> tuple:
    tensors = (weight.absmax_q, weight.absmax2, weight.offset) if weight.double_quant else (weight.absmax,)
    return tuple((t.data_ptr(), t._version) for t in tensors)


def block_scales(weight: NF4Tensor) -> torch.Tensor:
    """float32 [n_blocks] ``lowrank.nf4.dequantize_absmax(weight)``, cached while the stored tensors are unchanged.

    The cache lives on the stored absmax tensor (a plain Python attribute), so it dies with the weight. Tensors
    without a version counter (made under ``torch.inference_mode``) are decoded every call.
    """
    if not weight.double_quant:
        return weight.absmax
    holder = weight.absmax_q
    try:
        key = _versions(weight)
    except RuntimeError:  # inference tensors have no version counter
        return _nf4.dequantize_absmax(weight)
    cached = getattr(holder, _CACHE_ATTR, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    scales = _nf4.dequantize_absmax(weight)
    try:
        setattr(holder, _CACHE_ATTR, (key, scales))
    except (AttributeError, RuntimeError):  # a tensor subclass without __dict__: no cache
        pass
    return scales


def _decode_into(weight: NF4Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write W (out, in) in ``out.dtype`` into ``out`` (a 1-D buffer of numel elements); returns it as (out, in).

    The steps of ``lowrank.nf4.dequantize`` (byte -> float32 pair gather, one float32 multiply by the block
    scale, one cast), each into a scratch buffer instead of fresh memory.
    """
    n, block = weight.numel, weight.block_size
    n_bytes = n // 2
    scales = block_scales(weight)
    index = _scratch("index", n_bytes, torch.int32)
    index.copy_(weight.packed)  # uint8 -> int32: index_select takes int32 or int64 indices
    pairs = _scratch("pairs", n_bytes, torch.int64)
    torch.index_select(_nf4._BYTE_TO_PAIR_BITS, 0, index, out=pairs)  # (bytes,) int64 = two float32 each
    values = pairs.view(torch.float32).view(n // block, block)
    values.mul_(scales.unsqueeze(1))  # one float32 multiply, as the reference
    out.copy_(values.view(-1))  # to out.dtype: round to nearest even, once (a plain copy for float32)
    return out.view(weight.shape)


def dequantize(weight: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W (out, in) in ``dtype`` in new memory (the caller keeps it): ``lowrank.nf4.dequantize(weight, dtype)``."""
    out = torch.empty(weight.numel, dtype=dtype)
    return _decode_into(weight, out)


def matmul(x: torch.Tensor, weight: NF4Tensor, transpose: bool) -> torch.Tensor:
    """``x @ W^T`` (transpose; x (M, in) -> (M, out)) or ``x @ W`` (x (M, out) -> (M, in)), W in x.dtype.

    W is rounded to the weight's 16-bit original dtype first when it has one (``lowrank.nf4.rounding_dtype``),
    then cast to x.dtype, exactly as the reference. W lives in this thread's scratch only during the call.
    """
    rounding = _nf4.rounding_dtype(weight, x.dtype)
    w = _decode_into(weight, _scratch("weight_" + str(rounding), weight.numel, rounding))
    if rounding != x.dtype:
        w = w.to(x.dtype)
    # F.linear for both directions: (M, in) @ (in, out) and (M, out) @ (out, in) as linear(g, W^T), the same
    # oneDNN / BLAS call the reference's x @ W^T and g @ W make (measured equal to within 2 %, 1 thread).
    return F.linear(x, w) if transpose else F.linear(x, w.t())
