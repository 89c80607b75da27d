"""Triton kernel: dequantize a packed NF4 weight (plain or double-quantized absmax) to bf16 / fp16 / fp32.

    out[i] = to_dtype(fp32(NF4_CODE[code[i]] * absmax[i // block_size]))
    absmax[b] = fp32(fp32(DYNAMIC_MAP[absmax_q[b]] * absmax2[b // 256]) + offset)   (double quantization)

Bit-exact with ``lowrank.nf4.dequantize`` (the reference): one float32 multiply per element and one
round-to-nearest-even cast, and the absmax decode is two separate float32 roundings. Triton fuses a multiply
followed by an add into one FMA (a single rounding) unless told not to, so every launch here passes
``enable_fp_fusion=False``.

Byte layout (``docs/NF4_FORMAT.md``): blocks run over the flat row-major tensor, byte j holds codes
2j (high nibble) and 2j + 1 (low nibble). Block sizes are even, so both codes of a byte share one block: the
kernel works per byte and computes the block from the byte index, whatever the tensor's shape.

This module also holds the pieces the matmul kernels share: ``_block_absmax`` (jit) and ``_weight_args``.
Importing it imports triton; ``lowrank`` only imports it for CUDA tensors (see ``lowrank/dispatch.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank import dispatch as _dispatch
from lowrank import nf4 as _nf4

# The reference is ``lowrank.nf4.dequantize``: the one definition of the math, tested against bit for bit.

# ------------------------------------------------------------------------------------------------- kernels

_NESTED = tl.constexpr(_nf4.NESTED_BLOCK_SIZE)  # absmax entries per nested float32 scale (256)


@triton.jit
def _block_absmax(block, mask, absmax_ptr, absmax2_ptr, dmap_ptr, offset_ptr, DOUBLE_QUANT: tl.constexpr):
    """float32 absmax of the blocks ``block`` (any shape of int64 block indices).

    Plain: ``absmax_ptr`` is float32 [n_blocks]. Double quantization: ``absmax_ptr`` is the uint8 codes and the
    scale is ``map[q] * absmax2[b // 256] + offset``, two roundings (the launch disables fp fusion). Masked-off
    entries read 0, so a masked weight element decodes to code 7 * 0 = 0.0, never NaN.
    """
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + block // _NESTED, mask=mask, other=0.0)
        offset = tl.load(offset_ptr)
        absmax = tl.load(dmap_ptr + q) * scale2 + offset
        return tl.where(mask, absmax, 0.0)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def _cast(values, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 -> DTYPE with round-to-nearest-even. Triton's CPU interpreter truncates fp32 -> bf16 instead of
    rounding, so under TRITON_INTERPRET=1 bf16 is rounded explicitly (add half an ulp, ties to even, then the
    truncating cast is exact); compiled kernels use the hardware cast, which rounds. Finite inputs only."""
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = values.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        values = bits.to(tl.float32, bitcast=True)
    return values.to(DTYPE)


@triton.jit
def _decode(byte, code_ptr, LOOKUP: tl.constexpr):
    """uint8 codes (R, C) as int32 -> float32 code-book values (R, 2C), high nibble first: [h0, l0, h1, l1, ...].

    LOOKUP "gather": the 16-entry code book is loaded once into registers and indexed with ``tl.gather``
    (shuffles / shared memory, no global traffic per element). "load": one cached global load per element (the
    simple version; Triton's pipeliner stages such loads through shared memory as whole tiles).
    """
    rows: tl.constexpr = byte.shape[0]
    cols: tl.constexpr = 2 * byte.shape[1]
    nibbles = tl.reshape(tl.join(byte >> 4, byte & 15), (rows, cols))
    if LOOKUP == "gather":
        book = tl.load(code_ptr + tl.arange(0, 16))
        values = tl.gather(book, tl.reshape(nibbles, (rows * cols,)), 0)
        return tl.reshape(values, (rows, cols))
    else:
        return tl.load(code_ptr + nibbles)


@triton.jit
def _dequant_kernel(
    packed_ptr,  # uint8 [n_bytes]
    absmax_ptr,  # float32 [n_blocks] or uint8 [n_blocks] (double quantization)
    absmax2_ptr,  # float32 [ceil(n_blocks / 256)] (double quantization; else unused)
    dmap_ptr,  # float32 [256] dynamic map (double quantization; else unused)
    offset_ptr,  # float32 [1] (double quantization; else unused)
    code_ptr,  # float32 [16] NF4 code book
    out_ptr,  # [n] in the output dtype
    n,
    BLOCK_SIZE: tl.constexpr,  # quantization block (elements)
    BYTES: tl.constexpr,  # bytes per program (2 * BYTES elements), a power of two
    DOUBLE_QUANT: tl.constexpr,
    LOOKUP: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # The program's bytes as (groups, bytes per group): a group lies in one quantization block (blocks are
    # aligned runs of BLOCK_SIZE / 2 bytes of the flat tensor), so absmax is loaded once per group.
    GROUP: tl.constexpr = min(BYTES, BLOCK_SIZE // 2)
    GROUPS: tl.constexpr = BYTES // GROUP
    pid = tl.program_id(0).to(tl.int64)
    first = pid * BYTES + tl.arange(0, GROUPS) * GROUP  # (GROUPS,) first byte of each group
    offs = first[:, None] + tl.arange(0, GROUP)[None, :]  # (GROUPS, GROUP) byte indices
    n_bytes = (n + 1) // 2
    byte = tl.load(packed_ptr + offs, mask=offs < n_bytes, other=0x77).to(tl.int32)
    absmax = _block_absmax(first // (BLOCK_SIZE // 2), first < n_bytes, absmax_ptr, absmax2_ptr, dmap_ptr,
                           offset_ptr, DOUBLE_QUANT)  # fmt: skip
    values = _decode(byte, code_ptr, LOOKUP) * absmax[:, None]  # (GROUPS, 2 * GROUP), one float32 multiply
    values = tl.reshape(values, (2 * BYTES,))
    out_offs = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + out_offs, _cast(values, out_ptr.dtype.element_ty, INTERPRET), mask=out_offs < n)


# ------------------------------------------------------------------------------------------------- launcher

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
# Launch options for every kernel that decodes a double-quantized absmax: see the module docstring.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}
# 2048 bytes (4096 elements) per program with 4 warps: 16 bytes per thread per load. A deterministic rule, not
# autotuned (element-wise kernel); to be confirmed by benchmarks/bench_nf4.py on a GPU.
_DEQUANT_BYTES, _DEQUANT_WARPS = 2048, 4


def lookup() -> str:
    """The code-book lookup of every kernel (see _decode): ``lowrank.dispatch.settings().nf4_lookup``, set by
    LOWRANK_NF4_LOOKUP (default "gather" until a GPU measurement says otherwise). benchmarks/compile_nf4.py,
    sm_90: the first matmul version (global-load lookup, one absmax per byte) needed 303 KB of shared memory for
    a 16x64x256 tile (over the 227 KB limit); with "gather" and one absmax per block it needs 45 KB, no spills."""
    return _dispatch.settings().nf4_lookup


def interpreting() -> bool:
    """True when this module's kernels were built for Triton's CPU interpreter: ``@triton.jit`` reads
    TRITON_INTERPRET=1 when it decorates (at import), and triton must already have been imported with it."""
    return not isinstance(_dequant_kernel, triton.runtime.JITFunction)


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(NF4 code book, dynamic map) on ``device``, copied once per device."""
    if device not in _TABLES:
        _TABLES[device] = (_nf4.NF4_CODE.to(device), _nf4.DYNAMIC_MAP.to(device))
    return _TABLES[device]


def _weight_args(w: _nf4.NF4Tensor) -> tuple[torch.Tensor, ...]:
    """The kernel pointer arguments ``(packed, absmax, absmax2, dmap, offset, code)`` of an NF4 weight.

    Checks that every stored tensor is contiguous, on one device and of the format's dtype; unused pointers
    (plain absmax) are filled with the code book so that every argument is a real tensor.
    """
    device = w.packed.device
    code, dmap = _tables(device)
    if w.packed.dtype != torch.uint8 or not w.packed.is_contiguous() or w.packed.numel() != (w.numel + 1) // 2:
        raise ValueError(
            f"NF4 packed data must be contiguous uint8 of {(w.numel + 1) // 2} bytes for shape {tuple(w.shape)}, "
            f"got {w.packed.dtype} {tuple(w.packed.shape)}"
        )
    if w.double_quant:
        stored = {"absmax_q": (w.absmax_q, torch.uint8), "absmax2": (w.absmax2, torch.float32)}
        stored["offset"] = (w.offset, torch.float32)
    else:
        stored = {"absmax": (w.absmax, torch.float32)}
    for name, (t, dtype) in stored.items():
        if t is None or t.dtype != dtype or t.device != device or not t.is_contiguous():
            got = None if t is None else f"{t.dtype} on {t.device}"
            raise ValueError(f"NF4 field {name} must be contiguous {dtype} on {device}, got {got}")
    if w.double_quant:
        return w.packed, w.absmax_q, w.absmax2, dmap, w.offset.reshape(1), code
    return w.packed, w.absmax, code, code, code, code


def dequantize(w: _nf4.NF4Tensor, dtype: torch.dtype | None = None, *, bytes_per_program: int | None = None):
    """Dequantize an NF4 weight on its device with the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1).

    ``out[i] = to_dtype(fp32(NF4_CODE[code[i]] * absmax[i // block_size]))``, bit-exact with
    ``lowrank.nf4.dequantize``, also under the CPU interpreter (``_cast`` rounds there explicitly).

    Args:
        w: the NF4 weight (any shape, any element count).
        dtype: bfloat16, float16 or float32 (default: the weight's original dtype).
        bytes_per_program: packed bytes per program, a power of two (tests use small values).

    Returns:
        Tensor of shape ``w.shape`` and dtype ``dtype`` on ``w``'s device.

    Raises:
        ValueError: an unsupported dtype, or stored tensors of the wrong dtype, size or device.
    """
    dtype = w.dtype if dtype is None else dtype
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"NF4 dequantize supports {_OUT_DTYPES}, got {dtype}")
    args = _weight_args(w)
    n = w.numel
    out = torch.empty(w.shape, dtype=dtype, device=w.packed.device)
    nbytes = bytes_per_program or _DEQUANT_BYTES
    if nbytes & (nbytes - 1):
        raise ValueError(f"bytes_per_program must be a power of two, got {nbytes}")
    grid = (triton.cdiv((n + 1) // 2, nbytes),)
    _dequant_kernel[grid](
        *args, out, n, BLOCK_SIZE=w.block_size, BYTES=nbytes, DOUBLE_QUANT=w.double_quant, LOOKUP=lookup(),
        INTERPRET=interpreting(), num_warps=_DEQUANT_WARPS, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return out
