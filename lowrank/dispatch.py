"""The one place that picks how NF4 math runs: Triton kernels for CUDA tensors, the torch reference otherwise.

``nf4_linear(x, weight, bias)`` is the NF4 linear layer's op: ``y = x W^T + b`` with ``W = dequantize(weight)``
(rounded to the weight's original dtype when that is 16-bit, then cast to ``x.dtype``, as bitsandbytes does).
Its backward saves only the packed weight and its scales (about 0.52 bytes per weight), never the dequantized W:
the backward pass decodes it again. W is frozen, so only x (and a trainable bias, if any) get gradients.

The matmul is one ``torch.library.custom_op``, ``lowrank::nf4_matmul`` (forward ``x @ W^T`` and, with
``transpose=False``, the backward ``grad_y @ W``), with a fake (shape-only) implementation and a registered
autograd formula. ``torch.compile(fullgraph=True)`` therefore sees one opaque node per NF4 layer on every
device; inside it, Python picks the Triton kernels (``lowrank.kernels.nf4_matmul``: CUDA tensors of
bf16/fp16/fp32) or the torch reference (everything else). A ``triton_op`` would let Inductor look inside the
kernel, but it cannot be traced on a CPU-only machine; the custom op can.

``nf4_lora_linear(x, weight, bias, a)`` is the inference-only variant for a LoRA layer over an NF4 base: the op
``lowrank::nf4_lora_matmul`` returns ``(x W^T, x A^T)`` from one pass over x (``lowrank.kernels.nf4_lora``). It
has a fake implementation (compile) but no autograd formula: it must not be used where a gradient is needed,
and ``nf4_lora_linear`` raises if asked to.

Routing: CUDA tensors of bf16/fp16/fp32 take the Triton kernels; CPU tensors take ``lowrank.nf4_cpu`` (the
reference math in reusable scratch memory, bit for bit equal to it); the rest take the reference
(``lowrank.nf4``). Triton is imported only when a CUDA tensor first needs it.

Settings. Every environment switch of the library is read here, once, when this module is imported, into
``settings()`` (a frozen ``Settings``); nothing reads the environment in a forward. Tests and benchmarks that
change a variable call ``reload_settings()`` afterwards. The switches:

* ``LOWRANK_REFERENCE=1``: the torch reference everywhere (no Triton, no CPU scratch path): debugging, comparisons.
* ``LOWRANK_FUSED_LORA=1``: inference forwards of a LoRA layer over an NF4 base take ``nf4_lora_linear``
  (``fused_lora_enabled()``; off by default until a GPU measures it).
* ``LOWRANK_NF4_LOOKUP=gather|load``: the code-book lookup of the Triton kernels (default gather).
* ``LOWRANK_NF4_LARGE_M=dequant|fused``: the Triton route for M > 16 rows (default dequant).

Any other value of a switch raises ValueError naming the variable (at import, or in ``reload_settings``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch
import torch.nn.functional as F

from . import nf4_cpu
from .nf4 import NF4Tensor, rounding_dtype
from .nf4 import dequantize as _reference_dequantize

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The library's environment switches (module docstring), as read by the last ``reload_settings()``."""

    reference: bool = False  # LOWRANK_REFERENCE
    fused_lora: bool = False  # LOWRANK_FUSED_LORA
    nf4_lookup: str = "gather"  # LOWRANK_NF4_LOOKUP
    nf4_large_m: str = "dequant"  # LOWRANK_NF4_LARGE_M


# variable -> (field, {accepted value: setting}); unset or empty means the field's default
_SWITCHES = {
    "LOWRANK_REFERENCE": ("reference", {"0": False, "1": True}),
    "LOWRANK_FUSED_LORA": ("fused_lora", {"0": False, "1": True}),
    "LOWRANK_NF4_LOOKUP": ("nf4_lookup", {"gather": "gather", "load": "load"}),
    "LOWRANK_NF4_LARGE_M": ("nf4_large_m", {"dequant": "dequant", "fused": "fused"}),
}


def _read_settings(environ) -> Settings:
    values = {}
    for var, (field, accepted) in _SWITCHES.items():
        raw = environ.get(var, "")
        if raw == "":
            continue
        if raw not in accepted:
            raise ValueError(f"environment variable {var}={raw!r}: expected one of {sorted(accepted)}")
        values[field] = accepted[raw]
    return Settings(**values)


_settings = _read_settings(os.environ)


def settings() -> Settings:
    """The switches in force (read from the environment at import or by the last ``reload_settings()``)."""
    return _settings


def reload_settings() -> Settings:
    """Read the ``LOWRANK_*`` environment variables again (after a test or benchmark changed one); returns them.

    Raises:
        ValueError: a variable holds a value it does not accept (the settings in force are then unchanged).
    """
    global _settings
    _settings = _read_settings(os.environ)
    return _settings


@contextlib.contextmanager
def override_settings(**changes):
    """Within the block, ``settings()`` has ``changes`` applied (fields of ``Settings``, e.g. ``reference=True``);
    restored on exit. For benchmarks that time two routes in one process; not thread-safe."""
    global _settings
    saved = _settings
    _settings = dataclasses.replace(saved, **changes)
    try:
        yield _settings
    finally:
        _settings = saved


def fused_lora_enabled() -> bool:
    """Whether inference forwards over an NF4 base may take ``nf4_lora_linear`` (``LOWRANK_FUSED_LORA=1``)."""
    return _settings.fused_lora


def _reference_forced() -> bool:
    return _settings.reference


@functools.cache
def _kernels():
    """``(nf4_dequant, nf4_matmul, nf4_lora)`` kernel modules, or None where triton cannot be imported."""
    try:
        from .kernels import nf4_dequant, nf4_lora, nf4_matmul
    except ImportError:  # no triton on this platform: the reference serves CUDA tensors too
        return None
    return nf4_dequant, nf4_matmul, nf4_lora


def _use_triton(x: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether the Triton kernels serve this call: a CUDA tensor computing in a kernel dtype (default its own),
    and not forced to the reference."""
    dtype = x.dtype if dtype is None else dtype
    return x.is_cuda and dtype in _KERNEL_DTYPES and not _reference_forced() and _kernels() is not None


def dequantize(weight: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W in ``dtype`` (default: its original dtype), by the Triton kernel for CUDA weights, else the reference.

    ``W = to(dtype)(to(rounding dtype)(NF4_CODE[code] * absmax))``; bit-identical on both paths.
    """
    dtype = weight.dtype if dtype is None else dtype
    rounding = rounding_dtype(weight, dtype)
    if _use_triton(weight.packed, rounding):
        return _kernels()[0].dequantize(weight, rounding).to(dtype)
    if _use_cpu_path(weight, rounding):
        return nf4_cpu.dequantize(weight, rounding).to(dtype)
    return _reference_dequantize(weight, rounding).to(dtype)


def _use_cpu_path(weight: NF4Tensor, dtype: torch.dtype) -> bool:
    """Whether ``lowrank.nf4_cpu`` serves this call (CPU weight it supports, reference not forced)."""
    return not _settings.reference and nf4_cpu.supports(weight, dtype)


def _matmul_dequant(x: torch.Tensor, weight: NF4Tensor, transpose: bool) -> torch.Tensor:
    """``x @ W^T`` (forward, x: (M, in)) or ``x @ W`` (backward, x: (M, out)), W dequantized in x.dtype.

    The dequantized W is a temporary: on the CPU path a per-thread scratch buffer the next layer overwrites,
    on the reference path a fresh tensor freed on return. Both give the same bits.
    """
    if _use_cpu_path(weight, x.dtype):
        return nf4_cpu.matmul(x, weight, transpose)
    w = dequantize(weight, x.dtype)  # (out, in)
    return x @ w.t() if transpose else x @ w


def _rebuild(packed, absmax, absmax2, offset, n, k, block_size, weight_dtype) -> NF4Tensor:
    if absmax2 is not None:  # double quantization: absmax holds the uint8 codes
        return NF4Tensor((n, k), weight_dtype, block_size, packed, None, absmax, absmax2, offset)
    return NF4Tensor((n, k), weight_dtype, block_size, packed, absmax=absmax)


@torch.library.custom_op("lowrank::nf4_matmul", mutates_args=())
def _nf4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax2: torch.Tensor | None,
    offset: torch.Tensor | None,
    n: int,
    k: int,
    block_size: int,
    weight_dtype: torch.dtype,
    transpose: bool,
) -> torch.Tensor:
    """``x @ W^T`` (transpose: x (M, k) -> (M, n)) or ``x @ W`` (x (M, n) -> (M, k)), W (n, k) in NF4."""
    return _matmul(x, _rebuild(packed, absmax, absmax2, offset, n, k, block_size, weight_dtype), transpose)


def _matmul(x: torch.Tensor, weight: NF4Tensor, transpose: bool) -> torch.Tensor:
    """The body of ``lowrank::nf4_matmul``: the Triton kernels for CUDA tensors, else ``_matmul_dequant``."""
    if _use_triton(x):
        matmul = _kernels()[1]
        return matmul.matmul(x, weight) if transpose else matmul.matmul_grad_x(x, weight)
    return _matmul_dequant(x, weight, transpose)


@_nf4_matmul.register_fake
def _(x, packed, absmax, absmax2, offset, n, k, block_size, weight_dtype, transpose):
    return x.new_empty((x.shape[0], n if transpose else k))


def _setup_context(ctx, inputs, output):
    _, packed, absmax, absmax2, offset, n, k, block_size, weight_dtype, transpose = inputs
    ctx.save_for_backward(packed, absmax, absmax2, offset)  # packed codes + scales only: ~0.52 bytes per weight
    ctx.meta = (n, k, block_size, weight_dtype, transpose)


def _backward(ctx, grad):
    n, k, block_size, weight_dtype, transpose = ctx.meta
    grad_x = None
    if ctx.needs_input_grad[0]:  # d(x @ W^T)/dx = grad @ W and d(x @ W)/dx = grad @ W^T: the same op, flipped
        # grad may have any strides (expanded, from .sum()): the reference matmul takes them as they are and the
        # kernels' launcher copies only when the last stride is not 1.
        grad_x = _nf4_matmul(grad, *ctx.saved_tensors, n, k, block_size, weight_dtype, not transpose)
    return (grad_x,) + (None,) * 9


_nf4_matmul.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("lowrank::nf4_lora_matmul", mutates_args=())
def _nf4_lora_matmul(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
    offset: torch.Tensor | None, n: int, k: int, block_size: int, weight_dtype: torch.dtype, a: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(x @ W^T, x @ A^T)``: x (M, k) -> (M, n) in x.dtype and (M, r) in float32 (float64 for float64 x).

    The weight arguments are those of ``_nf4_matmul``. No autograd formula (inference only). A (r, k) is used in
    x's dtype on both paths.
    """
    weight = _rebuild(packed, absmax, absmax2, offset, n, k, block_size, weight_dtype)
    if _use_triton(x):
        return _kernels()[2].matmul_lora(x, weight, a)  # xa: float32 sums, not rounded to x's dtype
    # The reference computes x A^T exactly as the unfused LoRA forward does (F.linear in x's dtype) and widens it
    # without rounding, so the caller's cast back to x.dtype gives the unfused value bit for bit.
    xa = F.linear(x, a.to(x.dtype)).to(torch.promote_types(x.dtype, torch.float32))  # (M, k) @ (k, r)
    return _matmul_dequant(x, weight, True), xa


@_nf4_lora_matmul.register_fake
def _(x, packed, absmax, absmax2, offset, n, k, block_size, weight_dtype, a):
    xa_dtype = torch.promote_types(x.dtype, torch.float32)
    return x.new_empty((x.shape[0], n)), x.new_empty((x.shape[0], a.shape[0]), dtype=xa_dtype)


def _op_args(x: torch.Tensor, weight: NF4Tensor, name: str) -> tuple[torch.Tensor, tuple]:
    """Checks x against the weight; returns x as (M, in) and the ops' weight arguments (packed ... weight dtype)."""
    if len(weight.shape) != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: x {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    if x.device != weight.packed.device:
        raise ValueError(f"{name}: x is on {x.device}, the weight on {weight.packed.device}")
    n, k = weight.shape
    absmax = weight.absmax_q if weight.double_quant else weight.absmax  # absmax2 / offset are None without it
    args = (weight.packed, absmax, weight.absmax2, weight.offset, n, k, weight.block_size, weight.dtype)
    return x.reshape(-1, k), args


def _needs_op(x: torch.Tensor) -> bool:
    """Whether a call must go through the registered op: autograd will need its backward (x requires a gradient
    in grad mode), or torch.compile is tracing (it must see the op). Otherwise the op's body is called directly."""
    return (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling()


def nf4_linear(x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x W^T + b``, W = ``weight`` dequantized (16-bit original dtype first, then ``x.dtype``).

    Args:
        x: (..., in_features), floating. weight: NF4Tensor of shape (out_features, in_features), on x's device.
        bias: (out_features,) in x.dtype, or None.

    Returns:
        (..., out_features) in x.dtype. Differentiable in x and bias; W gets no gradient.

    Raises:
        ValueError: shapes that do not match, or x and the weight on different devices.
    """
    x2d, args = _op_args(x, weight, "nf4_linear")  # (M, in)
    if _needs_op(x2d):
        y = _nf4_matmul(x2d, *args, True)
    else:  # the op's body without its dispatch: 50 us less a call (403 vs 350 us, 192x576, one row, 2-core CPU)
        y = _matmul(x2d, weight, True)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])  # (M, in) @ (in, out) -> (..., out)


def nf4_lora_linear(
    x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None, a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x W^T + b, x A^T)`` in one pass over x: an NF4 layer and its LoRA down-projection, for inference.

    Args:
        x: (..., in_features), floating. weight: NF4Tensor of shape (out_features, in_features), on x's device.
        bias: (out_features,) in x.dtype, or None. a: LoRA A of shape (r, in_features), used in x.dtype.

    Returns:
        ``(y, xa)``: y (..., out_features) in x.dtype, as ``nf4_linear``; xa (..., r) in float32 (float64 for
        float64 x), not yet rounded to x.dtype: ``xa.to(x.dtype)`` is the unfused ``F.linear(x, a.to(x.dtype))``
        (bit for bit on the reference path, up to float32 summation order on the Triton path).

    Raises:
        ValueError: shapes that do not match, or x and the weight on different devices.
        RuntimeError: a gradient is needed (grad mode on and x, bias or a requires grad): the op has no backward,
            so the caller must run it under ``torch.no_grad()`` / ``torch.inference_mode()`` or on tensors that
            need no gradient. Training uses ``nf4_linear`` and separate adapter matmuls.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, a)):
        raise RuntimeError("nf4_lora_linear is inference-only (no backward): call it under torch.no_grad()")
    if a.dim() != 2 or a.shape[1] != x.shape[-1]:
        raise ValueError(f"nf4_lora_linear: x {tuple(x.shape)} does not match LoRA A {tuple(a.shape)}")
    x2d, args = _op_args(x, weight, "nf4_lora_linear")  # (M, in)
    y, xa = _nf4_lora_matmul(x2d, *args, a)  # (M, out), (M, r)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0]), xa.view(*x.shape[:-1], a.shape[0])
