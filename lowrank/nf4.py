"""The NF4 format (4-bit NormalFloat, QLoRA) laid out byte for byte as bitsandbytes stores it, and its torch math.

Format (the source of truth is ``docs/NF4_FORMAT.md``; summary):

* a weight is flattened row-major into blocks of ``block_size`` consecutive elements (the last may be partial);
* each block keeps ``absmax = max |x|`` (float32) and one 4-bit code per element: the index of the code-book
  value nearest to ``x / absmax`` (``NF4_CODE``, 16 float32 quantiles of N(0, 1) scaled to [-1, 1]);
* two codes per byte, the lower flat index in the HIGH nibble; an odd count pads the last nibble with code 7 (0.0);
* double quantization (default) stores ``absmax - mean(absmax)`` in 8 bits per block with bitsandbytes'
  signed dynamic map, in nested blocks of 256 with one float32 scale each, plus the float32 mean (``offset``):
  4 + 8/64 + 32/(64*256) = 4.127 bits per weight at block 64 (4.5 without double quantization).

Everything here is plain vectorized torch; it is the reference the Triton kernels in ``lowrank.kernels`` are
tested against, and the CPU path of ``NF4Linear``.
"""

from __future__ import annotations

import math

import torch

# The code book, as float32 literals (the definition; a 4-decimal table would be a different format). Derivation:
# N(0, 1) quantiles at float32 probabilities linspace(0.9677083, 0.5, 9)[:-1] (positive) and
# linspace(0.9677083, 0.5, 8)[:-1] (negated), plus 0, divided by the largest in float32. tests/test_nf4.py
# re-derives it.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
ZERO_CODE = 7  # NF4_CODE[7] == 0.0: the code of padding nibbles and of all-zero blocks
NESTED_BLOCK_SIZE = 256  # elements of absmax per float32 scale under double quantization
_MIN_BLOCK, _MAX_BLOCK = 32, 4096
# Smallest absmax divided by (as bitsandbytes does): keeps 1/absmax finite, so an all-zero block scales to 0
# (code 7) instead of 0 * inf = NaN. Blocks whose absmax is below it (subnormal) quantize to ~0.
_TINY = 1e-38


def _dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map: 256 sorted float32 values in [-0.99296875, 1.0].

    For exponent i = 0..6: ``±10^(i-6) * m`` for the 2^i midpoints m of ``linspace(0.1, 1, 2^i + 1)``
    (float32), plus 0 and 1.0. The products are float32 (a float32 tensor times a Python scalar).
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2
        scale = 10.0 ** (i - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_MAP = _dynamic_map()
# Decision boundaries: a scaled value goes to the number of midpoints it is strictly greater than, so a value
# exactly on a midpoint takes the lower code (torch.bucketize with right=False). Midpoints in float32.
_DYNAMIC_ZERO_CODE = int((DYNAMIC_MAP == 0).nonzero()[0])  # 127: where an all-zero block's scale lands
_NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
_DYNAMIC_MIDPOINTS = (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) / 2
# byte -> its two values (high nibble first): one gather decodes a byte, no shifts or masks on the hot path. The
# pair is stored as one int64 (the two float32 bit patterns): a 1-D gather of 8-byte integers takes 1.5 ms for a
# 1536x576 weight on one CPU thread, a (256, 2) float32 row gather 5.1 ms. Integers, so no bit pattern is ever
# interpreted as a float64 (a NaN payload could be altered).
_BYTE_TO_PAIR = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)  # (256, 2) float32
_BYTE_TO_PAIR_BITS = _BYTE_TO_PAIR.contiguous().view(torch.int64).view(256)

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_block_size(block_size) -> int:
    """Return ``block_size`` if it is an int power of two in 32..4096, else raise TypeError / ValueError."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int power of two in {_MIN_BLOCK}..{_MAX_BLOCK}, got {block_size!r}")
    if not _MIN_BLOCK <= block_size <= _MAX_BLOCK or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in {_MIN_BLOCK}..{_MAX_BLOCK}, got {block_size}")
    return block_size


def check_weight(weight: torch.Tensor, name: str = "weight", finite: bool = True) -> None:
    """Raise if ``weight`` cannot be quantized: not a floating tensor, empty, or (``finite``) holding NaN/inf."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(weight.shape)}): nothing to quantize")
    # max |x| is NaN or inf exactly when some element is (amax propagates NaN): one reduction, no bool copy.
    if finite and weight.device.type != "meta" and not bool(torch.isfinite(weight.detach().abs().amax())):
        _raise_non_finite(weight, name)


def _raise_non_finite(weight: torch.Tensor, name: str, as_float32: torch.Tensor | None = None):
    """Name the bad values: NaN/inf in ``weight``, or (``as_float32``: its float32 copy) finite float64 values
    beyond the float32 range, which overflow when the quantizer converts them."""
    bad = int((~torch.isfinite(weight)).sum())
    if bad == 0 and as_float32 is not None:
        over = int((~torch.isfinite(as_float32)).sum())
        raise ValueError(
            f"{name} holds {over} value(s) beyond the float32 range (|x| > 3.4e38): NF4 scales are float32"
        )
    raise ValueError(f"{name} holds {bad} NaN/inf value(s): NF4 blocks containing them would be meaningless")


class NF4Tensor:
    """A weight quantized to NF4: packed 4-bit codes plus per-block absmax (plain or double-quantized).

    Attributes:
        shape: the original shape (torch.Size). dtype: the original dtype (what ``dequantize()`` returns).
        block_size: elements per absmax block. double_quant: whether absmax is stored in 8 bits.
        packed: uint8 [(n + 1) // 2], two codes per byte, lower flat index in the high nibble.
        absmax: float32 [n_blocks] without double quantization, else None.
        absmax_q: uint8 [n_blocks] dynamic-map codes of ``absmax - offset`` (double quantization), else None.
        absmax2: float32 [ceil(n_blocks / 256)] nested scales (double quantization), else None.
        offset: float32 scalar tensor, the mean of absmax (double quantization), else None.
    """

    def __init__(self, shape, dtype, block_size, packed, absmax=None, absmax_q=None, absmax2=None, offset=None):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.block_size = check_block_size(int(block_size))  # every consumer (torch and Triton) relies on it
        self.double_quant = absmax_q is not None
        self.packed = packed
        self.absmax = absmax
        self.absmax_q = absmax_q
        self.absmax2 = absmax2
        self.offset = offset

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.block_size)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by field name (only those present)."""
        names = ("packed", "absmax_q", "absmax2", "offset") if self.double_quant else ("packed", "absmax")
        return {k: getattr(self, k) for k in names}

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors: n/2 + 4 * n_blocks (plain) or n/2 + n_blocks + 4 * n_nested + 4."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device) -> NF4Tensor:
        """A copy on ``device`` (only moves; the stored dtypes never change)."""
        moved = {k: t.to(device) for k, t in self.tensors().items()}
        return NF4Tensor(self.shape, self.dtype, self.block_size, **moved)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight, shape ``self.shape``, in ``dtype`` (default: the original dtype). See ``dequantize``."""
        return dequantize(self, dtype)

    def __repr__(self) -> str:
        dq = f", double_quant (offset={float(self.offset):.6g})" if self.double_quant else ""
        return (
            f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, block_size={self.block_size}{dq}, "
            f"nbytes={self.nbytes}, device={self.device})"
        )


def _codes_to_bytes(codes: torch.Tensor, n: int) -> torch.Tensor:
    """Pack an even-length flat code tensor into bytes ``code[2j] << 4 | code[2j + 1]``, keeping (n + 1) // 2."""
    codes = codes.to(torch.uint8)
    return ((codes[0::2] << 4) | codes[1::2])[: (n + 1) // 2]


def quantize_blockwise(values: torch.Tensor, boundaries: torch.Tensor, block_size: int):
    """Block-wise absmax quantization of a flat float32 tensor against sorted decision ``boundaries``.

    Args:
        values: float32 [n]. boundaries: float32 [k - 1], the midpoints of a sorted k-entry code (any device).
        block_size: elements per block.

    Returns:
        ``(codes, absmax)``: uint8 (<= 16 boundaries) or int32 [n_blocks * block_size] (the padding of the last
        block scales to 0), and float32 [n_blocks] with ``absmax[b] = max |x|`` over block b.
        ``code = #{boundaries < x * (1/absmax)}``.
    """
    n = values.numel()
    n_blocks = -(-n // block_size)
    # Zero padding cannot raise a block's max |x|, and scales to exactly 0 (the zero code of both maps).
    pad = n_blocks * block_size - n
    blocks = (torch.nn.functional.pad(values, (0, pad)) if pad else values).view(n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)
    # Multiply by the float32 reciprocal (not a division): that is the rounding bitsandbytes' bytes come from.
    scaled = blocks * (1.0 / absmax.clamp(min=_TINY)).unsqueeze(1)
    return _count_below(scaled, boundaries).view(-1), absmax


def _nf4_code_table(bins: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables for an exact NF4 code lookup: split [-1, 1] into ``bins`` equal bins (edges exact in float32).

    ``base[b]`` = midpoints below bin b's lower edge; ``inside[b]`` = the one midpoint inside bin b, else 2.0.
    Then ``code(s) = base[b] + (s > inside[b])`` with ``b = int(s * bins/2 + bins/2)``. Exact as long as every
    bin holds at most one midpoint and no midpoint lies within float32 rounding of an edge (a value computed
    into the neighbouring bin then still counts the same midpoints): both are checked here, not assumed.
    """
    mids = _NF4_MIDPOINTS.tolist()
    position = [(m + 1) * bins / 2 for m in mids]  # in bins; float64, exact enough for the margin check
    index = [int(p) for p in position]
    assert len(set(index)) == len(index), "two NF4 midpoints in one bin"
    # The nearest edge is 0.0297 bins away (at 256 bins); float32 bin arithmetic errs by < 1e-4 bins.
    assert min(abs(p - round(p)) for p in position) > 1e-3, "an NF4 midpoint sits on a bin edge"
    edges = [2 * i / bins - 1 for i in range(bins)]
    base = torch.tensor([sum(m < e for m in mids) for e in edges], dtype=torch.uint8)
    inside = torch.full((bins,), 2.0)
    inside[index] = _NF4_MIDPOINTS
    return base, inside


_CODE_BASE, _CODE_INSIDE = _nf4_code_table()


def _count_below(scaled: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """``#{boundaries < scaled}`` per element: uint8 for the NF4 midpoints, int32 otherwise.

    For NF4 a table lookup (``_nf4_code_table``) replaces torch.bucketize's per-element binary search: 28 vs
    161 ms for a 1536x576 weight on one thread of the 2-core CPU, and about 8 tensor ops, not 15 compares +
    15 adds (47 ms; on a busy machine every multi-threaded op also pays a thread-barrier wait, so fewer ops
    matter). Ties (value == midpoint) go to the lower code, as with bucketize(right=False).
    """
    if boundaries is not _NF4_MIDPOINTS:
        return torch.bucketize(scaled, boundaries.to(scaled.device), out_int32=True, right=False)
    half = _CODE_BASE.numel() / 2
    base, inside = _CODE_BASE.to(scaled.device), _CODE_INSIDE.to(scaled.device)
    flat = scaled.reshape(-1)
    bins = flat.mul(half).add_(half).to(torch.int32).clamp_(0, base.numel() - 1)  # |s| may exceed 1 by an ulp
    codes = base.index_select(0, bins)
    codes += torch.gt(flat, inside.index_select(0, bins)).view(torch.uint8)
    return codes.view(scaled.shape)


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: float32 absmax [n_blocks] -> (uint8 codes [n_blocks], float32 absmax2, float32 offset).

    ``offset = mean(absmax)``; ``absmax - offset`` is quantized to the nearest dynamic-map entry (ties to the
    lower one) in nested blocks of 256, each with scale ``absmax2 = max |absmax - offset|``.
    """
    offset = absmax.mean()
    codes, absmax2 = quantize_blockwise(absmax - offset, _DYNAMIC_MIDPOINTS, NESTED_BLOCK_SIZE)
    return codes[: absmax.numel()].to(torch.uint8), absmax2, offset


def quantize(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize a floating tensor of any shape to NF4 (bytes identical to bitsandbytes' ``quantize_4bit``).

    ``code[i] = #{midpoints of NF4_CODE < x[i] * (1 / absmax[block(i)])}`` with ``absmax[b] = max_{i in b} |x[i]|``
    (float32; bf16/fp16 inputs convert exactly, float64 inputs are rounded to float32 first).

    Args:
        weight: float16 / bfloat16 / float32 / float64 tensor, any shape, finite values only.
        block_size: elements per absmax block, a power of two in 32..4096.
        double_quant: store absmax in 8 bits (4.127 bits per weight at block 64) instead of float32 (4.5).

    Returns:
        The NF4Tensor, on ``weight``'s device.

    Raises:
        TypeError: ``weight`` is not a floating tensor. ValueError: empty, NaN/inf values, bad block size.
    """
    check_block_size(block_size)
    check_weight(weight, finite=False)  # finiteness is checked on absmax below, saving a pass over the weight
    with torch.no_grad():
        flat = weight.detach().reshape(-1).to(torch.float32)
        n = flat.numel()
        codes, absmax = quantize_blockwise(flat, _NF4_MIDPOINTS, block_size)
        if flat.device.type != "meta" and not bool(torch.isfinite(absmax).all()):
            _raise_non_finite(weight, "weight", flat)
        packed = _codes_to_bytes(codes, n)
        if not double_quant:
            return NF4Tensor(weight.shape, weight.dtype, block_size, packed, absmax=absmax)
        absmax_q, absmax2, offset = quantize_absmax(absmax)
        return NF4Tensor(weight.shape, weight.dtype, block_size, packed, None, absmax_q, absmax2, offset)


def zeros(shape, dtype: torch.dtype, block_size: int = 64, double_quant: bool = True, device=None) -> NF4Tensor:
    """The NF4Tensor of an all-zero weight, built directly (the bytes ``quantize(torch.zeros(shape))`` gives:
    packed 0x77, absmax 0; double quantization: codes of 0.0 in the dynamic map, absmax2 0, offset 0)."""
    check_block_size(block_size)
    shape = torch.Size(shape)
    n = shape.numel()
    n_blocks = -(-n // block_size)
    packed = torch.full(((n + 1) // 2,), 0x77, dtype=torch.uint8, device=device)
    absmax = torch.zeros(n_blocks, dtype=torch.float32, device=device)
    if not double_quant:
        return NF4Tensor(shape, dtype, block_size, packed, absmax=absmax)
    absmax_q = torch.full((n_blocks,), _DYNAMIC_ZERO_CODE, dtype=torch.uint8, device=device)
    absmax2 = torch.zeros(-(-n_blocks // NESTED_BLOCK_SIZE), dtype=torch.float32, device=device)
    offset = torch.zeros((), dtype=torch.float32, device=device)
    return NF4Tensor(shape, dtype, block_size, packed, None, absmax_q, absmax2, offset)


def rounding_dtype(nf4: NF4Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype W is rounded to before it is used in ``dtype``: its original dtype when that is 16-bit (the layer
    computes with its bf16/fp16 weight, as bitsandbytes does), else ``dtype`` directly (a float32/float64
    original: one rounding, the same result). Every NF4 matmul path (torch and Triton) follows this rule."""
    return nf4.dtype if nf4.dtype in (torch.float16, torch.bfloat16) else dtype


def dequantize_absmax(nf4: NF4Tensor) -> torch.Tensor:
    """float32 [n_blocks] block scales: stored absmax, or ``fp32(fp32(map[q] * absmax2[i // 256]) + offset)``.

    The two float32 roundings are separate (no fused multiply-add): that is what bitsandbytes computes.
    """
    if not nf4.double_quant:
        return nf4.absmax
    n_blocks, n_nested = nf4.absmax_q.numel(), nf4.absmax2.numel()
    values = DYNAMIC_MAP.to(nf4.absmax_q.device)[nf4.absmax_q.long()]
    values = torch.nn.functional.pad(values, (0, n_nested * NESTED_BLOCK_SIZE - n_blocks))
    scaled = (values.view(n_nested, NESTED_BLOCK_SIZE) * nf4.absmax2.unsqueeze(1)).view(-1)[:n_blocks]
    return scaled + nf4.offset


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [(n + 1) // 2] -> uint8 codes [n] (high nibble first)."""
    return torch.stack([packed >> 4, packed & 15], dim=1).view(-1)[:n]


def dequantize(nf4: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reconstruct the weight: ``out[i] = to_dtype(fp32(NF4_CODE[code[i]] * absmax[block(i)]))``.

    Args:
        nf4: the quantized tensor. dtype: output dtype (default ``nf4.dtype``); the product is computed in
            float32 and rounded once (round to nearest even) to ``dtype``.

    Returns:
        Tensor of shape ``nf4.shape`` on ``nf4.device``.
    """
    dtype = nf4.dtype if dtype is None else dtype
    n, block = nf4.numel, nf4.block_size
    absmax = dequantize_absmax(nf4)
    n_blocks = absmax.numel()
    # Pad the bytes to whole blocks (block sizes are even, so a block is block/2 whole bytes): one reshape then
    # scales every block, with no per-block Python loop. 0x77 decodes to zeros; the padding is cut off below.
    packed = nf4.packed
    pad = n_blocks * block // 2 - packed.numel()
    if pad:
        packed = torch.nn.functional.pad(packed, (0, pad), value=0x77)
    pairs = _BYTE_TO_PAIR_BITS.to(packed.device).index_select(0, packed.int())  # (bytes,) int64 = 2 float32
    out = pairs.view(torch.float32).view(n_blocks, block).mul_(absmax.unsqueeze(1))  # one float32 multiply each
    out = out.view(-1)
    if pad:
        out = out[:n]
    return out.view(nf4.shape).to(dtype)
