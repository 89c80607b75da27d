"""The one place that picks how NF4 math runs: Triton kernels for CUDA tensors, the torch reference otherwise.

``nf4_linear(x, weight, bias)`` is the NF4 linear layer's op: ``y = x W^T + b`` with ``W = dequantize(weight)``
(in the weight's original dtype, then cast to ``x.dtype``, as bitsandbytes does). Its autograd function saves
only the packed weight and its scales (about 0.52 bytes per weight), never the dequantized W: the backward pass
dequantizes again. W is frozen, so only x (and a trainable bias, if any) get gradients.

Routing: ``_use_triton(x)`` decides per call (environment ``LOWRANK_REFERENCE=1`` forces the reference). The
two helpers ``_dequantize`` and ``_matmul_dequant`` are the whole surface a kernel path has to replace.
"""

from __future__ import annotations

import os

import torch

from .nf4 import NF4Tensor, dequantize


def _reference_forced() -> bool:
    return os.environ.get("LOWRANK_REFERENCE", "") == "1"


def _use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels serve this call (CUDA tensor and not forced to the reference). Not yet wired."""
    return False


def _dequantize(weight: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W (out, in) in ``dtype``: dequantized in the original dtype, then cast (one rounding when they agree).

    For a float32/float64 original the float32 product is rounded straight to ``dtype`` (same result as going
    through the original dtype, one pass less).
    """
    if weight.dtype in (torch.float32, torch.float64, dtype):
        return dequantize(weight, dtype)
    return dequantize(weight).to(dtype)


def _matmul_dequant(x: torch.Tensor, weight: NF4Tensor, transpose: bool) -> torch.Tensor:
    """``x @ W^T`` (forward, x: (M, in)) or ``x @ W`` (backward, x: (M, out)) with W dequantized in x.dtype.

    The dequantized W is a temporary freed on return: on CPU it costs one (out, in) buffer per layer at a time.
    """
    w = _dequantize(weight, x.dtype)  # (out, in)
    return x @ w.t() if transpose else x @ w


class NF4LinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with W from NF4 storage; saves the NF4 tensors, not W, for the backward pass."""

    @staticmethod
    def forward(ctx, x, bias, meta, *tensors):
        weight = _rebuild(meta, tensors)
        x2d = x.reshape(-1, x.shape[-1])  # (M, in)
        y = _matmul_dequant(x2d, weight, transpose=True)  # (M, in) @ (in, out)
        if bias is not None:
            y = y + bias
        ctx.meta = meta
        ctx.has_bias = bias is not None
        ctx.save_for_backward(*tensors)  # packed codes + scales only: ~0.52 bytes per weight
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        weight = _rebuild(ctx.meta, ctx.saved_tensors)
        g2d = grad_y.reshape(-1, grad_y.shape[-1])  # (M, out)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _matmul_dequant(g2d, weight, transpose=False).view(*grad_y.shape[:-1], -1)  # (M, out) @ (out, in)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = g2d.sum(0)
        return (grad_x, grad_bias, None) + (None,) * len(ctx.saved_tensors)


def _flatten(weight: NF4Tensor) -> tuple[tuple, tuple[torch.Tensor, ...]]:
    meta = (tuple(weight.shape), weight.dtype, weight.block_size, weight.double_quant)
    return meta, tuple(weight.tensors().values())


def _rebuild(meta: tuple, tensors) -> NF4Tensor:
    shape, dtype, block_size, double_quant = meta
    if double_quant:
        packed, absmax_q, absmax2, offset = tensors
        return NF4Tensor(shape, dtype, block_size, packed, None, absmax_q, absmax2, offset)
    packed, absmax = tensors
    return NF4Tensor(shape, dtype, block_size, packed, absmax=absmax)


def nf4_linear(x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x W^T + b``, W = ``weight`` dequantized (original dtype, then ``x.dtype``).

    Args:
        x: (..., in_features), floating. weight: NF4Tensor of shape (out_features, in_features), on x's device.
        bias: (out_features,) in x.dtype, or None.

    Returns:
        (..., out_features) in x.dtype. Differentiable in x and bias; W gets no gradient.
    """
    if len(weight.shape) != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"nf4_linear: x {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    meta, tensors = _flatten(weight)
    if _use_triton(x) and not _reference_forced():  # pragma: no cover - wired by the Triton kernels
        raise NotImplementedError("Triton NF4 path not wired yet")
    return NF4LinearFunction.apply(x, bias, meta, *tensors)
