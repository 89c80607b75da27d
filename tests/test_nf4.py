"""The NF4 format of lowrank.nf4 against NF4_FORMAT.md: code book, codes, packing, double quantization, errors.

The independent reference here is a scalar numpy float32 implementation written straight from the spec (one
element at a time, no torch), so a bug in the vectorized code cannot hide in its own reference.
"""

import math
import statistics

import numpy as np
import pytest
import torch

from lowrank import nf4
from lowrank.nf4 import DYNAMIC_MAP, NF4_CODE, NF4Tensor, dequantize, dequantize_absmax, quantize, unpack_codes

F32 = np.float32
CODE = NF4_CODE.numpy()
MIDS = [F32((CODE[i] + CODE[i + 1]) / F32(2)) for i in range(15)]


def spec_quantize(x: torch.Tensor, block: int) -> tuple[list[int], list[float]]:
    """Codes and absmax, element by element in numpy float32, exactly as NF4_FORMAT.md words it."""
    flat = x.reshape(-1).float().numpy()
    codes, absmax = [], []
    for start in range(0, flat.size, block):
        chunk = flat[start : start + block]
        am = F32(np.max(np.abs(chunk)))
        absmax.append(am)
        inv = F32(1) / max(am, F32(1e-38))
        for v in chunk:
            s = F32(v * inv)
            codes.append(sum(1 for m in MIDS if s > m))
    return codes, absmax


def spec_pack(codes: list[int]) -> list[int]:
    if len(codes) % 2:
        codes = codes + [7]
    return [(codes[2 * j] << 4) | codes[2 * j + 1] for j in range(len(codes) // 2)]


def test_code_book_is_the_float32_table_and_its_derivation():
    nd = statistics.NormalDist()
    # Probabilities in float32 (torch.linspace), quantiles in float64, then float32: the spec's recipe.
    pos = [nd.inv_cdf(p) for p in torch.linspace(0.9677083, 0.5, 9)[:-1].tolist()]
    neg = [-nd.inv_cdf(p) for p in torch.linspace(0.9677083, 0.5, 8)[:-1].tolist()]
    values = torch.tensor(sorted(pos + neg + [0.0]), dtype=torch.float64).float()
    assert torch.equal(values / values.max(), NF4_CODE)
    assert NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[15] == 1.0
    assert NF4_CODE[8].item() == 0.07958029955625534 and NF4_CODE[1].item() == -0.6961928009986877
    # A 4-decimal table is a different format: it would change codes.
    assert not torch.equal(NF4_CODE, NF4_CODE.double().round(decimals=4).float())


def test_dynamic_map_structure():
    m = DYNAMIC_MAP
    assert m.shape == (256,) and m.dtype == torch.float32
    assert bool((m[1:] > m[:-1]).all())  # sorted, distinct
    assert m[0].item() == np.float32(-0.99296875) and m[-1].item() == 1.0 and -1.0 not in m.tolist()
    assert (m < 0).sum() == 127 and (m == 0).sum() == 1 and (m > 0).sum() == 128
    # i = 0 gives ±1e-6 * 0.55 (the one midpoint of linspace(0.1, 1, 2)), the smallest magnitudes.
    assert m[128].item() == (torch.tensor(0.55, dtype=torch.float32) * 1e-6).item()
    # i = 6: 64 midpoints of linspace(0.1, 1, 65) times 1; the largest below 1.0 is (0.98594 + 1) / 2.
    assert m[-2].item() == pytest.approx(0.99296875, abs=1e-7)


@pytest.mark.parametrize("i", range(15))
def test_codes_on_and_around_every_midpoint(i):
    mid = torch.tensor(MIDS[i])
    up, down = torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0))
    # absmax 1.0 (first element) makes the scaled value the value itself: x * (1/1) is exact.
    x = torch.stack([torch.tensor(1.0), mid, up, down, NF4_CODE[i], NF4_CODE[i + 1]])
    codes = unpack_codes(quantize(x, 32, double_quant=False).packed, 6).tolist()
    assert codes == [15, i, i + 1, i, i, i + 1]  # exactly on a midpoint: the lower code


def test_worked_example_nibble_order():
    q = quantize(torch.tensor([1.0, -1.0, 0.0, 0.5]), 32, double_quant=False)
    assert q.packed.tolist() == [0xF0, 0x7C]
    assert q.absmax.tolist() == [1.0]


@pytest.mark.parametrize("shape", [(5,), (3, 7), (7, 33), (2, 3, 50)])
@pytest.mark.parametrize("block", [32, 64])
def test_bytes_equal_the_scalar_spec(shape, block):
    x = torch.randn(shape) * 0.3 + 0.05  # non-zero mean
    q = quantize(x, block, double_quant=False)
    codes, absmax = spec_quantize(x, block)
    n = math.prod(shape)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == ((n + 1) // 2,)
    assert q.packed.tolist() == spec_pack(codes)
    assert q.absmax.tolist() == [float(a) for a in absmax]
    if n % 2:
        assert q.packed[-1].item() & 0xF == 7  # odd count: the missing nibble is code 7


def test_partial_last_block_uses_only_its_real_elements():
    x = torch.full((100,), 0.25)
    x[0] = -8.0  # in block 0 only
    x[99] = 0.5
    q = quantize(x, 64, double_quant=False)
    assert q.absmax.tolist() == [8.0, 0.5]
    assert torch.equal(q.dequantize()[64:99], torch.full((35,), 0.25 * 2 * NF4_CODE[12].item()))  # 0.25/0.5 -> 12


@pytest.mark.parametrize("double_quant", [False, True])
def test_all_zero_block_is_code_7_and_dequantizes_to_exact_zeros(double_quant):
    x = torch.randn(4, 64)
    x[1] = 0.0
    q = quantize(x, 64, double_quant)
    assert q.packed.view(4, 32)[1].tolist() == [0x77] * 32
    if not double_quant:
        assert q.absmax[1].item() == 0.0  # (double quant reconstructs it only approximately: code 7 still gives 0)
    assert torch.equal(q.dequantize()[1], torch.zeros(64))
    assert torch.equal(quantize(torch.zeros(10)).dequantize(), torch.zeros(10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dtypes_quantize_exactly_and_dequantize_with_one_rounding(dtype, double_quant):
    x = (torch.randn(24, 40) * 0.02).to(dtype)
    q = quantize(x, 64, double_quant)
    same = quantize(x.float(), 64, double_quant)  # bf16/fp16 -> float32 is exact: identical bytes
    assert torch.equal(q.packed, same.packed)
    assert all(torch.equal(a, b) for a, b in zip(q.tensors().values(), same.tensors().values(), strict=False))
    out = q.dequantize()
    assert out.dtype == dtype and out.shape == x.shape
    codes = unpack_codes(q.packed, x.numel()).long()
    scales = dequantize_absmax(q).repeat_interleave(64)[: x.numel()]
    expected = (NF4_CODE[codes] * scales).to(dtype).view(x.shape)  # one float32 multiply, one cast
    assert torch.equal(out, expected)
    assert torch.equal(q.dequantize(torch.float64), (NF4_CODE[codes] * scales).double().view(x.shape))


def test_double_quantization_offset_nested_blocks_and_two_roundings():
    torch.manual_seed(1)
    x = torch.randn(600 * 64) * torch.rand(600).repeat_interleave(64)  # 600 blocks: nested blocks 256, 256, 88
    plain = quantize(x, 64, double_quant=False)
    q = quantize(x, 64, double_quant=True)
    assert torch.equal(q.packed, plain.packed)  # double quantization never changes the 4-bit codes
    absmax = plain.absmax
    assert q.offset.dtype == torch.float32 and q.offset.dim() == 0
    assert q.offset.item() == absmax.mean().item()
    assert q.offset.item() == pytest.approx(absmax.double().mean().item(), rel=1e-6)  # float32 sum of 600 terms
    assert q.absmax_q.dtype == torch.uint8 and q.absmax_q.shape == (600,) and q.absmax2.shape == (3,)
    centred = (absmax - q.offset).numpy()
    for j in range(3):
        chunk = centred[256 * j : 256 * (j + 1)]
        a2 = F32(np.abs(chunk).max())
        assert q.absmax2[j].item() == a2
        scaled = chunk * (F32(1) / a2)
        dist = np.abs(DYNAMIC_MAP.numpy()[None, :] - scaled[:, None])  # (blocks, 256)
        chosen = dist[np.arange(chunk.size), q.absmax_q[256 * j : 256 * (j + 1)].long().numpy()]
        assert bool((chosen <= dist.min(axis=1)).all())  # the nearest map entry
    # Reconstruction with two float32 roundings, step by step in numpy.
    mapped = DYNAMIC_MAP.numpy()[q.absmax_q.long().numpy()]
    a2 = q.absmax2.numpy().repeat(256)[:600]
    expected = (mapped * a2).astype(F32) + q.offset.numpy()
    assert np.array_equal(dequantize_absmax(q).numpy(), expected)
    fused = (mapped.astype(np.float64) * a2 + np.float64(q.offset.item())).astype(F32)
    assert not np.array_equal(expected, fused)  # the test can tell: one rounding gives other bits here


def test_dynamic_map_ties_go_to_the_lower_entry():
    # Values with max |v| = 1 scale to themselves; the third sits exactly on the midpoint of entries 200 and 201,
    # the fourth one float32 step above it.
    m = DYNAMIC_MAP
    mid = (m[200] + m[201]) / 2
    values = torch.stack([torch.tensor(1.0), torch.tensor(-1.0), mid, torch.nextafter(mid, torch.tensor(2.0))])
    codes, absmax2 = nf4.quantize_blockwise(values, (m[:-1] + m[1:]) / 2, 256)
    assert codes[:4].tolist() == [255, 0, 200, 201] and absmax2.tolist() == [1.0]


def test_reconstruction_error_on_gaussian_weights():
    torch.manual_seed(2)
    w = torch.randn(512, 1024)
    for double_quant in (False, True):
        err = (quantize(w, 64, double_quant).dequantize() - w).norm() / w.norm()
        assert err.item() == pytest.approx(0.092, abs=0.002)  # spec's 0.092; 512K samples vary by ~1e-4


@pytest.mark.parametrize("double_quant", [False, True])
def test_elementwise_error_is_at_most_half_a_code_gap(double_quant):
    w = torch.randn(64, 96) * 0.1 + 0.02
    q = quantize(w, 64, double_quant)
    codes = unpack_codes(q.packed, w.numel()).long()
    gaps = torch.diff(NF4_CODE)
    half = torch.maximum(torch.cat([gaps[:1], gaps]), torch.cat([gaps, gaps[-1:]]))[codes] / 2
    true_absmax = w.reshape(-1, 64).abs().amax(1).repeat_interleave(64)
    used_absmax = dequantize_absmax(q).repeat_interleave(64)
    err = (q.dequantize().reshape(-1) - w.reshape(-1)).abs()
    # |x - v a'| <= |x - v a| + |v| |a - a'|, with |x - v a| <= half gap * a; 1e-6 * a covers float32 rounding.
    bound = half * true_absmax + NF4_CODE[codes].abs() * (true_absmax - used_absmax).abs() + 1e-6 * true_absmax
    assert bool((err <= bound).all())


def test_bits_per_weight_and_nbytes():
    n = 1024 * 1024
    q = quantize(torch.randn(1024, 1024), 64, True)
    assert q.nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert q.nbytes * 8 / n == pytest.approx(4.127, abs=5e-4)  # 4 + 8/64 + 32/16384 = 4.127
    assert quantize(torch.randn(1024, 1024), 64, False).nbytes * 8 / n == 4.5


def test_nf4tensor_metadata_and_move():
    q = quantize(torch.randn(3, 70, dtype=torch.bfloat16), 32)
    assert (q.shape, q.dtype, q.block_size, q.double_quant, q.numel, q.n_blocks) == (
        torch.Size([3, 70]), torch.bfloat16, 32, True, 210, 7)  # fmt: skip
    moved = q.to("meta")
    assert moved.device.type == "meta" and moved.shape == q.shape and moved.nbytes == q.nbytes
    assert {k: t.dtype for k, t in moved.tensors().items()} == {k: t.dtype for k, t in q.tensors().items()}
    assert isinstance(q.to("cpu"), NF4Tensor) and "NF4Tensor(shape=(3, 70)" in repr(q)
    assert torch.equal(dequantize(q), q.dequantize())


@pytest.mark.parametrize("block", [16, 8192, 48, 100, 0, -64])
def test_bad_block_sizes(block):
    with pytest.raises(ValueError, match="block_size must be a power of two in 32..4096"):
        quantize(torch.randn(64), block)


@pytest.mark.parametrize("block", [64.0, True, "64", None])
def test_block_size_must_be_an_int(block):
    with pytest.raises(TypeError, match="block_size must be an int"):
        quantize(torch.randn(64), block)


def test_bad_weights():
    with pytest.raises(TypeError, match="floating tensor"):
        quantize(torch.arange(64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize([1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        quantize(torch.empty(0, 5))
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.randn(4, 64)
        w[2, 5] = bad
        with pytest.raises(ValueError, match="1 NaN/inf"):
            quantize(w)

    w = torch.randn(4, 64, dtype=torch.float64)
    w[1, 3], w[3, 0] = 1e39, -2e39  # finite in float64, infinite once converted to float32
    with pytest.raises(ValueError, match=r"2 value\(s\) beyond the float32 range"):
        quantize(w)


@pytest.mark.parametrize("block", [96, 16])
def test_nf4tensor_rejects_a_block_size_the_format_does_not_allow(block):
    """Checked where an NF4Tensor is made, so a hand-built tensor cannot reach a kernel that needs powers of two."""
    q = quantize(torch.randn(2, 96), 32, double_quant=False)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        NF4Tensor(q.shape, q.dtype, block, q.packed, absmax=q.absmax)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize(("shape", "block"), [((5, 70), 64), ((3, 600), 32), ((1,), 64), ((257 * 64 + 1,), 64)])
def test_zeros_are_the_bytes_of_quantizing_zeros(shape, block, double_quant):
    """nf4.zeros builds the all-zero weight directly; it must equal quantize(torch.zeros(shape)) field by field
    (the spec: code 7 = 0.0, padding nibble 7, absmax 0; double quant: offset 0, the dynamic map's 0.0, scale 0).
    (257 * 64 + 1,) spans two nested blocks of 256 scales plus a partial block."""
    got = nf4.zeros(shape, torch.bfloat16, block, double_quant)
    want = quantize(torch.zeros(shape, dtype=torch.bfloat16), block, double_quant)
    assert (got.shape, got.dtype, got.block_size, got.double_quant) == (want.shape, want.dtype, block, double_quant)
    for name in ("packed", "absmax", "absmax_q", "absmax2", "offset"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None and b is None) or (a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)), name
    assert DYNAMIC_MAP[int(got.absmax_q[0])] == 0.0 if double_quant else got.absmax_q is None


def test_rounding_dtype_rounds_16_bit_originals_first():
    """A bf16/fp16 original is rounded to itself before any cast (the layer computes with its 16-bit weight);
    float32/float64 originals go straight to the requested dtype."""
    for original in (torch.bfloat16, torch.float16):
        q = quantize(torch.randn(64).to(original))
        assert all(nf4.rounding_dtype(q, d) == original for d in (torch.float32, torch.float64, torch.float16))
    for original in (torch.float32, torch.float64):
        q = quantize(torch.randn(64, dtype=original))
        assert all(nf4.rounding_dtype(q, d) == d for d in (torch.bfloat16, torch.float32, torch.float64))


def test_code_lookup_equals_bucketize_everywhere():
    # The table lookup must be exact: dense grid, random values, every midpoint and table-bin edge +- 2 ulps.
    mids, edges = nf4._NF4_MIDPOINTS, torch.linspace(-1, 1, 257)
    special = torch.cat([mids, edges])
    near = [special]
    for direction in (2.0, -2.0):
        step = special
        for _ in range(2):
            step = torch.nextafter(step, torch.tensor(direction))
            near.append(step)
    values = torch.cat([torch.linspace(-1.001, 1.001, 200_001), torch.randn(100_000).clamp(-1, 1), *near])
    assert torch.equal(nf4._count_below(values, mids).int(), torch.bucketize(values, mids, out_int32=True))
