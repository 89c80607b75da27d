"""The NF4 dequantize kernel against the torch reference (``lowrank.nf4.dequantize``) and the format spec.

Runs on CPU in Triton's interpreter (in a subprocess: see ``_interpreter.py`` for why) and on CUDA when present
(``gpu`` marker). Dequantization must be bit-exact, so every comparison here is ``torch.equal``. On CPU the
interpreter truncates fp32 -> bf16 instead of rounding; the kernel rounds explicitly under the interpreter
(``nf4_dequant._cast``), so bf16 is compared exactly too, and on CUDA the hardware cast is checked the same way.
"""

from __future__ import annotations

import pytest
import torch
from _interpreter import INTERPRETER_CHILD, devices, run_module_in_interpreter

from lowrank import nf4

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


if not INTERPRETER_CHILD:

    def test_cpu_interpreter():
        """Every device-parametrized test below, on CPU, under TRITON_INTERPRET=1 (fresh process)."""
        print(run_module_in_interpreter(__file__))


def _weight(shape, device, zero_block=False):
    # Non-zero mean, a few large values: absmax varies between blocks, so the scale decode matters.
    w = torch.randn(shape, dtype=torch.float64) * 0.05 + 0.01
    w.view(-1)[::37] *= 8
    if zero_block:
        w.view(-1)[:64] = 0.0  # the first 64-element run (a whole block at sizes 32/64): exact zeros expected
    return w.to(torch.float32).to(device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize(
    ("shape", "block_size"),
    [
        ((7, 13), 32),  # odd element count: the last byte has a padding nibble
        ((300, 33), 32),  # 310 blocks crossing rows, > 256 blocks so the nested index b // 256 reaches 1
        ((3,), 64),  # fewer elements than one block
        ((40, 70), 64),  # rows of 70: blocks start mid-row, last block partial
        ((5, 50), 4096),  # the largest block size: one partial block
    ],
)
def test_dequantize_bit_exact(kernels, device, shape, block_size, double_quant):
    q = nf4.quantize(_weight(shape, device, zero_block=True), block_size, double_quant)
    for dtype in DTYPES:
        out = kernels.dequant.dequantize(q, dtype, bytes_per_program=64)  # small programs: many of them
        ref = nf4.dequantize(q, dtype)
        assert out.shape == ref.shape and out.dtype == dtype
        assert torch.equal(out, ref), f"{dtype}: max diff {(out.float() - ref.float()).abs().max().item()}"
    # The default dtype is the weight's original dtype (float32 here) and the default program size works too.
    assert torch.equal(kernels.dequant.dequantize(q), nf4.dequantize(q))


@pytest.mark.parametrize("device", devices())
def test_dequantize_bf16_rounds_to_nearest_even(kernels, device):
    # Values whose float32 product lies just above half a bf16 ulp: truncation would give the lower bf16,
    # round-to-nearest the upper. absmax 1 + 2^-8 + 2^-20 times code 15 (1.0) -> rounds up to 1 + 2^-7.
    absmax = torch.tensor([1 + 2**-8 + 2**-20, 1 + 2**-8], dtype=torch.float32, device=device)  # 2nd: a tie
    packed = torch.full((32,), 0xFF, dtype=torch.uint8, device=device)  # 64 elements, all code 15
    q = nf4.NF4Tensor((64,), torch.float32, 32, packed, absmax=absmax)
    out = kernels.dequant.dequantize(q, torch.bfloat16).float()
    assert torch.all(out[:32] == 1 + 2**-7)  # above the midpoint: up
    assert torch.all(out[32:] == 1.0)  # exactly on the midpoint: ties to even (1.0, mantissa even)


@pytest.mark.parametrize("device", devices())
def test_spec_worked_example(kernels, device):
    # NF4_FORMAT.md: x = [1, -1, 0, 0.5] -> bytes 0xF0, 0x7C (codes 15, 0, 7, 12), absmax 1. Built by hand,
    # independent of nf4.quantize; the values are the code book's float32 literals.
    packed = torch.tensor([0xF0, 0x7C], dtype=torch.uint8, device=device)
    q = nf4.NF4Tensor((4,), torch.float32, 64, packed, absmax=torch.tensor([2.0], device=device))
    out = kernels.dequant.dequantize(q, torch.float32).cpu()
    assert out.tolist() == [2.0, -2.0, 0.0, 2 * 0.44070982933044434]


@pytest.mark.parametrize("device", devices())
def test_double_quant_decode_is_two_roundings(kernels, device):
    # absmax = fp32(fp32(map[q] * absmax2) + offset): choose values where a fused multiply-add (one rounding)
    # gives a different float32 than two roundings, and check the kernel matches the two-rounding value.
    dmap = nf4.DYNAMIC_MAP
    qcode, scale2 = 200, torch.tensor([1.0 + 2**-20], dtype=torch.float32)
    offset = torch.tensor(-float(dmap[qcode]), dtype=torch.float32)
    two = (dmap[qcode] * scale2).to(torch.float32) + offset  # separate roundings (torch CPU never fuses)
    fused = (dmap[qcode].double() * scale2.double() + offset.double()).float()
    assert two.item() != fused.item()  # the case discriminates
    packed = torch.full((16,), 0xFF, dtype=torch.uint8, device=device)  # code 15 = 1.0: out = absmax
    q = nf4.NF4Tensor((32,), torch.float32, 32, packed, absmax_q=torch.tensor([qcode], dtype=torch.uint8,
                      device=device), absmax2=scale2.to(device), offset=offset.to(device))  # fmt: skip
    out = kernels.dequant.dequantize(q, torch.float32).cpu()
    assert torch.equal(out, two.expand(32))


@pytest.mark.parametrize("device", devices())
def test_dequantize_rejects_bad_input(kernels, device):
    q = nf4.quantize(_weight((8, 64), device), 64, True)
    with pytest.raises(ValueError, match="supports"):
        kernels.dequant.dequantize(q, torch.int8)
    with pytest.raises(ValueError, match="power of two"):
        kernels.dequant.dequantize(q, torch.float32, bytes_per_program=96)
    short = nf4.NF4Tensor(q.shape, q.dtype, 64, q.packed[:-1], None, q.absmax_q, q.absmax2, q.offset)
    with pytest.raises(ValueError, match="packed data must be contiguous uint8 of 256 bytes"):
        kernels.dequant.dequantize(short)
    wrong = nf4.NF4Tensor(q.shape, q.dtype, 64, q.packed, None, q.absmax_q.float(), q.absmax2, q.offset)
    with pytest.raises(ValueError, match="absmax_q must be contiguous torch.uint8"):
        kernels.dequant.dequantize(wrong)
    assert torch.equal(kernels.dequant.dequantize(q), nf4.dequantize(q))  # the weight is unchanged
