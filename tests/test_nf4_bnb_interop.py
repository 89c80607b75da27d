"""Our NF4 bytes against bitsandbytes' (CPU), both ways through the Linear4bit state dict.

bitsandbytes on CPU has two quantizers for the nested (8-bit) absmax: its reference torch path (nearest map
entry, ties low: what NF4_FORMAT.md specifies) and a native C routine that `quantize_4bit(...,
compress_statistics=True)` calls on CPU, which picks the other neighbour for some values near a midpoint of the
map. Exact byte equality is therefore checked against the reference path; the native path is checked for
agreement of everything else and for codes off by at most one step.
"""

import bitsandbytes as bnb  # a `test` extra (pyproject.toml): missing it is an error, not a skip
import bitsandbytes.functional as F
import pytest
import torch

from lowrank import nf4
from lowrank.nf4 import quantize
from lowrank.nf4_linear import NF4Linear

CASES = [
    ((6, 40), torch.float32, 64),
    ((7, 33), torch.bfloat16, 32),
    ((128, 256), torch.float16, 64),
    ((1000, 333), torch.float32, 128),
    ((3, 5), torch.float32, 4096),
    ((257, 64), torch.bfloat16, 64),
    ((5, 3, 70), torch.float32, 256),
]


def _bnb_reference_blockwise(values: torch.Tensor, blocksize: int):
    """bitsandbytes' reference (torch) blockwise quantizer, bypassing the native CPU kernel."""
    name = "bitsandbytes::quantize_blockwise"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd"), (
        f"bitsandbytes {bnb.__version__} has no reference (torch) quantize_blockwise kernel to compare bytes with"
    )
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
        keys, values, F.create_dynamic_map(signed=True), blocksize
    )


def test_maps_equal_bitsandbytes():
    assert torch.equal(nf4.NF4_CODE, F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.DYNAMIC_MAP, F.create_dynamic_map(signed=True))


@pytest.mark.parametrize("shape,dtype,block", CASES)
def test_plain_absmax_bytes_equal(shape, dtype, block):
    w = (torch.randn(shape) * 0.05 + 0.01).to(dtype)
    if w.numel() >= block:
        w.view(-1)[:block] = 0.0  # an all-zero (full) block
    ours = quantize(w, block, double_quant=False)
    packed, state = F.quantize_4bit(w, blocksize=block, quant_type="nf4", compress_statistics=False)
    assert packed.shape == ((w.numel() + 1) // 2, 1) and packed.dtype == torch.uint8
    assert torch.equal(packed.view(-1), ours.packed)
    assert torch.equal(state.absmax, ours.absmax)


def test_all_zero_partial_last_block():
    # bitsandbytes' CPU reference clamps the absmax of a partial last block to 1e-38 (full blocks keep 0); we
    # store the true max, 0, as its native kernels do. Same bytes, and both decode to exact zeros.
    w = torch.cat([torch.randn(64), torch.zeros(10)])
    ours = quantize(w, 64, double_quant=False)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(packed.view(-1), ours.packed) and ours.packed[32:].tolist() == [0x77] * 5
    assert ours.absmax[1].item() == 0.0 and state.absmax[1].item() == pytest.approx(1e-38, rel=1e-6)
    assert torch.equal(F.dequantize_4bit(packed, state).view(-1), ours.dequantize())  # bnb gives (1, n) for 1-D


@pytest.mark.parametrize("shape,dtype,block", CASES)
def test_double_quant_bytes_equal_the_reference_path(shape, dtype, block):
    w = (torch.randn(shape) * torch.rand(shape[0], *[1] * (len(shape) - 1)) * 0.05).to(dtype)
    ours = quantize(w, block, double_quant=True)
    _, state = F.quantize_4bit(w, blocksize=block, quant_type="nf4", compress_statistics=False)
    offset = state.absmax.mean()
    codes, absmax2 = _bnb_reference_blockwise(state.absmax - offset, 256)
    assert torch.equal(ours.offset, offset)
    # A nested block whose absmax all equal the mean (one block in all) has max |absmax - offset| = 0; the
    # reference path clamps a partial one to 1e-38, we keep 0 (as the native path does). It decodes to offset.
    zero = ours.absmax2 == 0
    assert torch.equal(ours.absmax2[~zero], absmax2[~zero]) and bool((absmax2[zero] <= 1e-38).all())
    if absmax2.min() > 0:  # a nested block of equal absmax (absmax2 = 0) has arbitrary codes: all decode to 0
        assert torch.equal(ours.absmax_q, codes)


@pytest.mark.parametrize("shape,dtype,block", CASES)
def test_double_quant_against_the_public_cpu_api(shape, dtype, block):
    w = (torch.randn(shape) * 0.05).to(dtype)
    ours = quantize(w, block, double_quant=True)
    packed, state = F.quantize_4bit(w, blocksize=block, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed.view(-1), ours.packed)
    assert torch.equal(state.offset, ours.offset) and torch.equal(state.state2.absmax, ours.absmax2)
    live = ours.absmax2.repeat_interleave(256)[: ours.n_blocks] > 0
    step = (state.absmax.int() - ours.absmax_q.int())[live].abs()
    if step.numel():  # (none when every nested block is degenerate)
        assert int(step.max()) <= 1  # the native C quantizer's near-midpoint picks: one map step
        assert step.float().mean() < 0.01  # ... and rare (12 of 5,204 blocks in a measured case)
    # Dequantization of *their* codes with our math gives their float values bit for bit (two roundings).
    theirs = nf4.NF4Tensor(shape, dtype, block, packed.view(-1), None, state.absmax, state.state2.absmax, state.offset)
    assert torch.equal(theirs.dequantize(), F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("double_quant", [True, False])
def test_linear4bit_state_dict_loads_into_nf4linear(double_quant):
    lin = torch.nn.Linear(72, 10, dtype=torch.bfloat16)
    l4 = bnb.nn.Linear4bit(72, 10, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=double_quant)
    l4.load_state_dict(lin.state_dict())
    l4 = l4.to("cpu")  # bitsandbytes quantizes when the layer is moved to a device
    l4(torch.randn(1, 72, dtype=torch.bfloat16))
    sd = l4.state_dict()
    assert "weight.quant_state.bitsandbytes__nf4" in sd
    ours = NF4Linear(72, 10, block_size=64, double_quant=double_quant, dtype=torch.bfloat16)
    ours.load_state_dict(sd)
    assert torch.equal(ours.dequantize_weight(), F.dequantize_4bit(l4.weight.data, l4.weight.quant_state))
    assert torch.equal(ours.bias, lin.bias)
    assert set(ours.state_dict()) == set(sd)
    if not double_quant:  # (with double quant bnb's native nested codes may differ by a step, see module doc)
        assert all(torch.equal(v, sd[k]) for k, v in ours.state_dict().items() if "quant_state" not in k)


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4linear_state_dict_loads_into_bitsandbytes(double_quant):
    ours = NF4Linear.from_linear(torch.nn.Linear(40, 6), double_quant=double_quant)
    sd = ours.state_dict()
    stats = {k[len("weight.") :]: v for k, v in sd.items() if k.startswith("weight.")}
    param = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, requires_grad=False, device="cpu")
    assert torch.equal(F.dequantize_4bit(param.data, param.quant_state), ours.dequantize_weight())
    l4 = bnb.nn.Linear4bit(40, 6, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=double_quant)
    l4.weight, l4.bias = param, torch.nn.Parameter(sd["bias"])
    x = torch.randn(3, 40)
    torch.testing.assert_close(l4(x), ours(x), rtol=1e-6, atol=1e-6)  # same W; matmul kernels may differ in order
