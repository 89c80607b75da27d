"""Check an adapted model against its dense equivalent, for use in your own unit tests.

The dense equivalent of a `LoRALinear` is one linear layer with weight ``W0 + sum_a scale_a * B_a @ A_a`` over
its active adapters. The reference is built independently of the layer's own code: ``W0`` from the raw base
parameters (Conv1D transposed; NF4 decoded by the format's reference ``lowrank.nf4.dequantize``) and each scale
from ``alpha``, ``r`` and ``rslora`` (``alpha / r``, rsLoRA ``alpha / sqrt(r)``). Two views of it:

* `dense_equivalent(model)`: a copy of the model with every adapted layer replaced by a plain ``nn.Linear``
  holding the materialised weight (what `lowrank.merge` approximates; useful for export checks);
* the *dense re-parametrisation*, used by `compare_with_dense`: the same copy, but each layer keeps ``A`` and
  ``B`` as float64 leaves and computes ``x (W0 + scale * B @ A)^T + b``, so autograd gives the gradients that
  LoRA's two small matmuls must reproduce.

    report = lowrank.testing.compare_with_dense(model, {"input_ids": ids})
    print(report)                                     # largest deviation of outputs and of each layer's grads
    lowrank.testing.assert_matches_dense(model, {"input_ids": ids})

Deviations are *normwise*: ``max |got - ref| / max |ref|`` per tensor (an elementwise ratio explodes where the
reference is near zero and says nothing about the kernel).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import nf4
from .adapter import LoRAAdapter
from .adapters import lora_layers, replace_module
from .base import is_conv1d
from .inject import adapter_parameters
from .lora import LoRALayer

__all__ = ["DenseComparison", "LayerDeviation", "assert_matches_dense", "compare_with_dense", "dense_equivalent"]

# Default normwise tolerances per compute dtype, for a small model (a few layers, widths up to ~1k). Each is a
# few hundred ulps of the dtype (eps: fp64 2.2e-16, fp32 1.2e-7, fp16 9.8e-4, bf16 7.8e-3): rounding errors of a
# dot product of length K grow like sqrt(K) * eps and compound through the layers.
DEFAULT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _replace(model: nn.Module, make: Callable[[LoRALayer], nn.Module]) -> nn.Module:
    if isinstance(model, LoRALayer):
        return make(model)
    for name, layer in list(lora_layers(model)):
        replace_module(model, name, make(layer))
    return model


def _raw_base_weight(layer: LoRALayer, dtype: torch.dtype) -> torch.Tensor:
    """W0 (out, in) in ``dtype`` from the base's own parameters, not through the layer's code."""
    base = layer.base
    if hasattr(base, "nf4_weight"):  # NF4: the format's reference decoder, with the layer's rounding rule
        q = base.nf4_weight()
        return nf4.dequantize(q, nf4.rounding_dtype(q, dtype)).to(dtype)
    weight = layer._original_weight if layer.merged and layer._original_weight is not None else base.weight
    return (weight.T if is_conv1d(base) else weight).detach().to(dtype)


def _reference_adapters(layer: LoRALayer) -> list[tuple[LoRAAdapter, float]]:
    """(adapter, scale from alpha / r / rslora) for the adapters the layer applies."""
    names = layer.merged_adapters if layer.merged else layer.active_adapters()
    out = []
    for name in names:
        a = layer.adapters[name]
        if type(a) is not LoRAAdapter:
            raise NotImplementedError(f"no dense reference for adapter type {type(a).__name__} ({name!r})")
        out.append((a, a.alpha / math.sqrt(a.r) if a.rslora else a.alpha / a.r))
    return out


def dense_equivalent(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy of ``model`` in which every `LoRALinear` is an ``nn.Linear`` with weight ``W0 + scale * B @ A``.

    Args:
        model: a model with adapters (merged or not; the merge state does not change the result).
        dtype: if given, the whole copy is cast to it (``torch.float64`` for a reference); otherwise each dense
            weight is computed in float64 and rounded once to the base weight's dtype (NF4: its ``dtype``).

    Returns:
        The copy; ``model`` is not modified. Conv1D layers become ``nn.Linear`` (weight transposed back).
    """

    def make(layer: LoRALayer) -> nn.Module:
        w = _raw_base_weight(layer, torch.float64)  # (out, in)
        for a, scale in _reference_adapters(layer):
            w = w + scale * (a.lora_B.double() @ a.lora_A.double())
        bias = layer.bias
        target = dtype or (layer.base.dtype if hasattr(layer.base, "nf4_weight") else layer.base.weight.dtype)
        dense = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=w.device, dtype=target)
        with torch.no_grad():
            dense.weight.copy_(w)
            if bias is not None:
                dense.bias.copy_(bias)
        dense.requires_grad_(False)
        return dense

    with torch.no_grad():
        out = _replace(copy.deepcopy(model), make)
    return out if dtype is None else out.to(dtype)


class _DenseReparam(nn.Module):
    """``y = x (W0 + sum_a scale_a * B_a @ A_a)^T + b`` with every A, B as a trainable leaf: what LoRA must match."""

    def __init__(self, layer: LoRALayer, dtype: torch.dtype):
        super().__init__()
        adapters = _reference_adapters(layer)
        with torch.no_grad():
            self.register_buffer("w0", _raw_base_weight(layer, dtype).clone())  # (out, in)
            bias = layer.bias
            self.register_buffer("b", None if bias is None else bias.detach().to(dtype).clone())
            self.lora_A = nn.ParameterList([a.lora_A.detach().to(dtype).clone() for a, _ in adapters])
            self.lora_B = nn.ParameterList([a.lora_B.detach().to(dtype).clone() for a, _ in adapters])
        self.scales = [scale for _, scale in adapters]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w0
        for a, b, scale in zip(self.lora_A, self.lora_B, self.scales, strict=False):
            w = w + scale * (b @ a)  # (out, r) @ (r, in)
        return F.linear(x, w.to(x.dtype), None if self.b is None else self.b.to(x.dtype))


@dataclass
class LayerDeviation:
    """Normwise deviations ``max|got - ref| / max|ref|`` of one layer's adapter gradients (abs: numerator)."""

    grad_A_abs: float
    grad_A_rel: float
    grad_B_abs: float
    grad_B_rel: float

    @property
    def worst_rel(self) -> float:
        return max(self.grad_A_rel, self.grad_B_rel)


@dataclass
class DenseComparison:
    """What `compare_with_dense` measured. ``str(report)`` is a table, worst layer first."""

    compute_dtype: torch.dtype
    reference_dtype: torch.dtype
    output_abs: float
    output_rel: float
    layers: dict[str, LayerDeviation] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def worst_rel(self) -> float:
        return max([self.output_rel] + [d.worst_rel for d in self.layers.values()])

    def __str__(self) -> str:
        lines = [
            f"adapted model ({self.compute_dtype}) vs dense re-parametrisation ({self.reference_dtype}); "
            "deviation = max|got - ref| (abs) and abs / max|ref| (rel)",
            f"  output: abs {self.output_abs:.3e}  rel {self.output_rel:.3e}",
        ]
        for name, d in sorted(self.layers.items(), key=lambda kv: -kv[1].worst_rel):
            lines.append(
                f"  {name}: grad A abs {d.grad_A_abs:.3e} rel {d.grad_A_rel:.3e} | "
                f"grad B abs {d.grad_B_abs:.3e} rel {d.grad_B_rel:.3e}"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _deviation(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    if got.shape != ref.shape:
        raise ValueError(f"shape mismatch: adapted model gave {tuple(got.shape)}, reference {tuple(ref.shape)}")
    diff = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    return diff, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def _first_tensor(output) -> torch.Tensor:
    """The model's main output: a tensor, ``.logits`` of an HF output, or the first tensor of a tuple / dict."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find an output tensor in a {type(output).__name__}; pass loss_fn")


def _cast_inputs(inputs, dtype: torch.dtype):
    if isinstance(inputs, torch.Tensor):
        return inputs.to(dtype) if inputs.is_floating_point() else inputs
    if isinstance(inputs, dict):
        return {k: _cast_inputs(v, dtype) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_cast_inputs(v, dtype) for v in inputs)
    return inputs


def _call(model: nn.Module, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _compute_dtype(model: nn.Module, inputs) -> torch.dtype:
    flat = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else [inputs]
    for value in flat:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.dtype
    adapters = {id(p) for p in adapter_parameters(model)}
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in adapters:
            return p.dtype
    return torch.float32


def compare_with_dense(
    model: nn.Module,
    inputs,
    loss_fn: Callable[[object], torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float64,
) -> DenseComparison:
    """Run ``model`` and its dense re-parametrisation on ``inputs``; report output and adapter-gradient deviations.

    Both run in eval mode (dropout off; each module's mode is restored afterwards). The adapted model runs as it
    is (its own dtypes); the reference is a float copy in ``dtype`` where each adapted layer computes
    ``x (W0 + scale * B @ A)^T + b`` and autograd differentiates through ``W0 + scale * B @ A``. Gradients are
    taken with ``torch.autograd.grad``, so existing ``.grad`` fields are untouched.

    Args:
        model: a model containing LoRA layers (plain LoRA adapters; the active ones are compared).
        inputs: a tensor, a tuple of positional arguments or a dict of keyword arguments. Floating tensors are
            cast to ``dtype`` for the reference; integer tensors (token ids) are passed unchanged.
        loss_fn: ``output -> scalar``. Default: ``sum(out * G)`` with ``out`` the main output tensor (``.logits``
            of an HF output) and G a fixed standard-normal tensor (seed 0), so every output element matters.
        dtype: the reference dtype.

    Returns:
        A `DenseComparison`. Gradients are not compared while any layer is merged (a note says so).
    """
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to compare")
    compute_dtype = _compute_dtype(model, inputs)
    reference = _replace(copy.deepcopy(model), lambda layer: _DenseReparam(layer, dtype)).to(dtype)
    ref_layers = [m for m in reference.modules() if isinstance(m, _DenseReparam)]

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    reference.eval()
    try:
        out = _call(model, inputs)
        ref_out = _call(reference, _cast_inputs(inputs, dtype))
    finally:
        for m, mode in modes:
            m.training = mode
    got, ref = _first_tensor(out), _first_tensor(ref_out)
    report = DenseComparison(compute_dtype, dtype, *_deviation(got, ref))

    if any(m.merged for _, m in layers):
        report.notes.append("merged layers: their forward does not use A and B, so gradients were not compared")
        return report
    if loss_fn is None:
        probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        loss_fn = lambda output: (_first_tensor(output).double() * probe.to(_first_tensor(output).device)).sum()  # noqa: E731
    entries = [  # (report name, A, B) per applied adapter of each layer
        ((name or type(model).__name__) + (f"[{n}]" if len(m.active_adapters()) > 1 else ""), m.adapters[n])
        for name, m in layers
        for n in m.active_adapters()
    ]
    params = [p for _, a in entries for p in (a.lora_A, a.lora_B)]
    ref_params = [p for m in ref_layers for pair in zip(m.lora_A, m.lora_B, strict=False) for p in pair]
    grads = torch.autograd.grad(loss_fn(out), params, allow_unused=True)
    ref_grads = torch.autograd.grad(loss_fn(ref_out), ref_params, allow_unused=True)
    for i, (label, _) in enumerate(entries):
        deviations = []
        for k in (2 * i, 2 * i + 1):  # A, then B of this adapter
            zero = torch.zeros_like(params[k])
            got_k = zero if grads[k] is None else grads[k]
            ref_k = zero if ref_grads[k] is None else ref_grads[k]
            deviations.extend(_deviation(got_k, ref_k))
        report.layers[label] = LayerDeviation(*deviations)
    zero_b = [label for label, a in entries if not a.lora_B.detach().any()]
    if zero_b:
        report.notes.append(f"B == 0 in {len(zero_b)} layer(s), so their grad A is 0 on both sides (a weak check)")
    return report


def assert_matches_dense(
    model: nn.Module,
    inputs,
    loss_fn: Callable[[object], torch.Tensor] | None = None,
    *,
    rtol: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> DenseComparison:
    """`compare_with_dense`, then raise ``AssertionError`` (with the per-layer report) if a deviation exceeds rtol.

    Args:
        rtol: normwise tolerance on outputs and every adapter gradient; default `DEFAULT_RTOL` of the compute
            dtype (the first floating input's dtype, else the model's first non-adapter floating parameter).

    Returns:
        The report, when it passes.
    """
    report = compare_with_dense(model, inputs, loss_fn, dtype)
    tol = rtol if rtol is not None else DEFAULT_RTOL.get(report.compute_dtype, 1e-4)
    if not report.worst_rel <= tol:  # `not <=` also catches NaN
        raise AssertionError(f"adapted model deviates from its dense equivalent beyond rtol={tol:g}:\n{report}")
    return report
