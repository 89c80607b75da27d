"""The frozen base layer: what the adapter code needs from the layer it adapts, declared in one place.

A LoRA layer never asks which concrete class its base is. It asks `base_view(module)` for a `BaseView`, which
answers: sizes, the dense weight (out, in) for merging and export, its dtype, whether the weight is stored
transposed (HF ``Conv1D``), and whether it is *quantized* (merging then keeps a dense copy beside the untouched
base instead of overwriting the base's weight).

Supported here: ``nn.Linear`` and Hugging Face ``Conv1D`` (recognised by class name, so transformers is never
imported). Any other format plugs in by implementing the *base protocol* on its module class, as
``lowrank.NF4Linear`` does; a new format is then one new file:

    class MyInt8Linear(nn.Module):
        _lowrank_base = True                       # marks the protocol
        in_features: int; out_features: int; bias: Tensor | None
        dense_dtype: torch.dtype                   # dtype of the dense weight (merge / export)
        def dense_weight(self, dtype=None) -> Tensor: ...   # (out_features, in_features)
        def fused_lora_forward(self, x, a) -> tuple[Tensor, Tensor] | None: ...   # optional, see below

``fused_lora_forward(x, a)`` may return ``(base(x), x A^T)`` computed in one pass (inference only), or None when
it cannot; a format without it simply never takes that route.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def is_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's ``Conv1D`` (a linear layer with weight of shape (in_features, out_features))."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and weight is not None and weight.dim() == 2


def follows_protocol(module: nn.Module) -> bool:
    """True for modules of a class that implements the base protocol (``_lowrank_base = True``)."""
    return bool(getattr(type(module), "_lowrank_base", False))


def is_linear(module: nn.Module) -> bool:
    """True for the linear layer types lowrank can adapt: nn.Linear, HF Conv1D, protocol modules (NF4Linear)."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or follows_protocol(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer, whatever its weight layout."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return int(in_features), int(out_features)
    return int(module.in_features), int(module.out_features)


class BaseView:
    """What LoRA needs from a frozen linear base ``module``; a thin, stateless view (the module holds the data).

    Attributes:
        module: the base module itself (called for the forward pass).
        in_features, out_features: the layer's sizes; the dense weight is (out_features, in_features).
        fan_in_fan_out: the module stores its weight transposed, (in, out) (HF ``Conv1D``).
        quantized: merging must not write the base weight (it is not a dense tensor); a dense merged copy is kept.
    """

    fan_in_fan_out = False
    quantized = False

    def __init__(self, module: nn.Module):
        self.module = module
        self.in_features, self.out_features = linear_features(module)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the dense weight: what merging rounds to and what an export writes."""
        return self.module.weight.dtype

    def stored_weight(self) -> nn.Parameter:
        """The weight Parameter as the module stores it ((out, in); Conv1D: (in, out)). Dense bases only."""
        return self.module.weight

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W0 as (out_features, in_features), in ``dtype`` (default its own); a view when no cast is needed."""
        w = self.module.weight
        w = w.T if self.fan_in_fan_out else w
        return w if dtype is None else w.to(dtype)

    def fused_lora_forward(self, x: torch.Tensor, a: torch.Tensor):
        """``(base(x), x A^T)`` from one pass over x, or None (dense bases: the separate matmuls are the fast path)."""
        return None


class Conv1DView(BaseView):
    fan_in_fan_out = True


class ProtocolView(BaseView):
    """A module implementing the base protocol (e.g. ``NF4Linear``): quantized, dense weight on request."""

    quantized = True

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dense_dtype

    def stored_weight(self) -> nn.Parameter:
        raise TypeError(f"{type(self.module).__name__} stores no dense weight")

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.module.dense_weight(dtype)

    def fused_lora_forward(self, x: torch.Tensor, a: torch.Tensor):
        fused = getattr(self.module, "fused_lora_forward", None)
        return None if fused is None else fused(x, a)


def base_view(module: nn.Module) -> BaseView | None:
    """The `BaseView` of a linear base module, or None when lowrank cannot adapt it as a linear layer."""
    if follows_protocol(module):
        return ProtocolView(module)
    if is_conv1d(module):
        return Conv1DView(module)
    if isinstance(module, nn.Linear):
        return BaseView(module)
    return None
