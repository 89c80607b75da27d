"""`LoRALinear`: one frozen linear layer plus a trainable low-rank update.

    y = base(x) + scale * dropout(x) @ A^T @ B^T,   A: (r, in_features), B: (out_features, r)
    scale = alpha / r   (rsLoRA: alpha / sqrt(r))

The base is an ``nn.Linear``, a Hugging Face ``Conv1D`` (weight stored transposed, (in, out)) or an
``NF4Linear`` (anything with ``dequantize_weight(dtype)``). The base is frozen and never replaced, so ejecting
gives back the very module that was wrapped.

State-dict naming: the wrapper is invisible in ``state_dict()``. Its keys are the base's keys under the layer's
own prefix (``q_proj.weight``, not ``q_proj.base.weight``) plus ``q_proj.lora_A`` / ``q_proj.lora_B``. Loading
renames the other way, and a checkpoint of the original model (no adapter keys) loads with ``strict=True``.

Fused inference (opt-in, ``LOWRANK_FUSED_LORA=1``): over an NF4 base, a forward that needs no gradient can
compute the base matmul and ``x A^T`` in one pass over x (``lowrank.dispatch.nf4_lora_linear``); see
`LoRALinear._fused_route` for when. Same casts, scale and output dtype as the unfused forward: equal to it bit
for bit on the CPU reference path, up to float32 summation order in the Triton kernel.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._match import is_conv1d, is_linear, linear_features
from .dispatch import fused_lora_enabled, nf4_lora_linear
from .nf4_linear import NF4Linear

_ADAPTER_KEYS = ("lora_A", "lora_B")


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    """The adapter's multiplier: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (PEFT's ``use_rslora``)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def _check_hyperparameters(r, alpha, dropout, adapter_dtype) -> None:
    """Raise a ValueError/TypeError naming the first bad LoRA hyper-parameter (shared with `inject`)."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an int >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if not isinstance(adapter_dtype, torch.dtype) or not adapter_dtype.is_floating_point:
        raise TypeError(f"adapter_dtype must be a floating torch.dtype, got {adapter_dtype!r}")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-``r`` update.

    ``y = base(x) + scale * dropout(x) @ A^T @ B^T``, ``scale = alpha / r`` (rslora: ``alpha / sqrt(r)``), with
    x of shape (..., in_features) and y of shape (..., out_features). A is Kaiming-uniform (a = sqrt 5), B is
    zero, so the wrapped layer starts out computing exactly what the base computes. A and B are stored in
    ``adapter_dtype`` (float32 by default, even for a bf16/fp16 base: small updates to low-precision weights
    would round away) and cast to the input's dtype in ``forward``; the output has the input's dtype. Note that
    ``model.to(dtype)`` after wrapping casts A and B too: cast the model first, then inject.

    Merging (`merge` / `unmerge`) is explicit, idempotent and exact to undo, never a side effect of ``eval()``.
    While merged the adapter cannot be trained: a forward in training mode with gradients enabled raises
    RuntimeError (the merged forward never reads A and B, so they would silently get no gradient); inference
    (``eval()`` or ``torch.no_grad()``) is fine. ``load_state_dict`` while merged raises too.

    Args:
        base: the layer to adapt: ``nn.Linear``, HF ``Conv1D`` or ``NF4Linear``. Its parameters are frozen.
        r: rank of the update, >= 1.
        alpha: scaling numerator, > 0.
        dropout: dropout probability on the adapter's input, in [0, 1).
        rslora: use ``scale = alpha / sqrt(r)`` (rank-stabilised LoRA) instead of ``alpha / r``.
        adapter_dtype: dtype of A and B.

    Attributes:
        merged: True while ``scale * B @ A`` is folded into the weight used by ``forward`` (see `merge`).
        enabled: False makes ``forward`` compute the base alone (see ``lowrank.disabled``).
        fan_in_fan_out: True for a ``Conv1D`` base, whose weight is (in_features, out_features).

    Raises:
        TypeError: ``base`` is not a linear layer.
        ValueError: a hyper-parameter is out of range.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        rslora: bool = False,
        *,
        adapter_dtype: torch.dtype = torch.float32,
    ):
        if isinstance(base, LoRALinear):
            raise TypeError("base is already a LoRALinear: adapters do not stack; eject or reuse the existing one")
        if not is_linear(base):
            raise TypeError(f"base must be nn.Linear, HF Conv1D or NF4Linear, got {type(base).__name__}")
        _check_hyperparameters(r, alpha, dropout, adapter_dtype)
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.in_features, self.out_features = linear_features(base)
        self.fan_in_fan_out = is_conv1d(base)
        self.r, self.alpha, self.rslora = r, float(alpha), bool(rslora)
        self.scale = lora_scale(self.alpha, r, self.rslora)
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()

        device = next(iter(base.parameters()), torch.empty(0)).device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=adapter_dtype))
        # Same init as nn.Linear's weight: uniform(-1/sqrt(in), 1/sqrt(in)).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

        self.merged = False
        self.enabled = True
        # While merged, a dense base's original weight Parameter is set aside (the base holds a new Parameter
        # W0 + delta). Kept in __dict__, not as a buffer or parameter: it must not be registered anywhere, and
        # the very object goes back on unmerge (a weight tied to another module, e.g. a GPT-2 head, is never
        # written to). For an NF4 base, which stays untouched, the dense merged weight is a non-persistent buffer
        # (it follows .to() but never reaches a checkpoint).
        self.__dict__["_original_weight"] = None
        self.register_buffer("_merged_weight", None, persistent=False)
        self._lora_keys_absent: tuple[str, ...] = ()
        self.register_state_dict_post_hook(_state_dict_post_hook)
        self.register_load_state_dict_pre_hook(_load_pre_hook)
        self.register_load_state_dict_post_hook(_load_post_hook)
        # Follow the base's mode: injecting into a model in eval() must not switch the adapter's dropout on.
        self.train(base.training)

    # HF code reads e.g. `q_proj.weight.dtype`; the wrapper answers for its base.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    @property
    def _quantized(self) -> bool:
        return isinstance(self.base, NF4Linear)

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The update ``scale * B @ A`` of shape (out_features, in_features), differentiable.

        Args:
            dtype: compute and return in this dtype; default the adapter dtype (float32).
        """
        dtype = dtype or self.lora_A.dtype
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scale  # (out, r) @ (r, in)

    def dense_base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen base weight W0 as a dense (out_features, in_features) tensor, also while merged.

        NF4 bases are dequantized; Conv1D weights are transposed (a view unless ``dtype`` changes it).
        """
        if self._quantized:
            return self.base.dequantize_weight(dtype)
        w = self._original_weight if self.merged else self.base.weight
        w = w.T if self.fan_in_fan_out else w
        return w if dtype is None else w.to(dtype)

    def merged_weight(self) -> torch.Tensor:
        """``W0 + scale * B @ A`` as a dense (out_features, in_features) tensor, whatever the merge state.

        Summed in float32 (or wider if the base or adapter is) and rounded once to the base's dtype (NF4: its
        ``dense_dtype``, the compute dtype else the original). What `merge` folds in and ``save_merged`` writes.
        """
        dtype = self.base.dense_dtype if self._quantized else self.dense_base_weight().dtype
        wide = torch.promote_types(torch.promote_types(torch.float32, self.lora_A.dtype), dtype)
        return (self.dense_base_weight(wide) + self.delta_weight(wide)).to(dtype)

    def _dense_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + b`` with W given as (out, in) or, for Conv1D, in the base's (in, out) layout."""
        bias = self.bias
        bias = None if bias is None else bias.to(x.dtype)
        if self.fan_in_fan_out:
            # Same op as HF Conv1D's forward (addmm), so the disabled-while-merged output is bit-identical to it.
            x2d = x.reshape(-1, self.in_features)  # (M, in) @ (in, out)
            out = x2d @ weight.to(x.dtype) if bias is None else torch.addmm(bias, x2d, weight.to(x.dtype))
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, weight.to(x.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features), in x's dtype."""
        if self.merged:
            if self.training and torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad):
                # The merged forward never touches A and B: training now would silently leave them unchanged.
                raise RuntimeError(
                    "LoRALinear is merged, so its forward does not use lora_A/lora_B and they would get no gradient. "
                    "Call lowrank.unmerge(model) before training, or run inference under model.eval() or "
                    "torch.no_grad()."
                )
            if not self.enabled:
                # Disabled means "the base model": the base as it was before merging.
                return self.base(x) if self._quantized else self._dense_forward(x, self._original_weight)
            if self._quantized:
                return self._dense_forward(x, self._merged_weight)
            return self.base(x)  # the base weight holds W0 + delta

        if self.enabled and self._fused_route(x):
            return self._fused_forward(x)
        result = self.base(x)
        if not self.enabled:
            return result
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        # Scale the (..., r) intermediate: r is the smallest dimension, so this is the cheapest place.
        update = F.linear(F.linear(self.dropout(x), a) * self.scale, b)  # (..., in) -> (..., r) -> (..., out)
        return result + update.to(result.dtype)

    def _fused_route(self, x: torch.Tensor) -> bool:
        """Whether this (unmerged, enabled) forward may take `_fused_forward`: all of

        - the switch is on (``LOWRANK_FUSED_LORA=1``) and the base is an ``NF4Linear`` without hooks (the fused
          forward does not call the base module) computing in x's dtype (``compute_dtype`` None or x.dtype: the
          one x read serves both products);
        - dropout is inactive (p = 0 or eval mode): the adapter reads the very x the base reads;
        - no gradient is needed: grad mode off, or none of x, A, B and the base bias requires grad (the fused op
          has no backward).
        """
        base = self.base
        if not (isinstance(base, NF4Linear) and fused_lora_enabled()):  # the type first: no env read for dense bases
            return False
        if base._forward_hooks or base._forward_pre_hooks:
            return False
        if base.compute_dtype not in (None, x.dtype) or x.shape[-1] != self.in_features:
            return False
        if self.dropout_p > 0 and self.training:
            return False
        needs_grad = (x, self.lora_A, self.lora_B, base.bias)
        return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in needs_grad)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unmerged forward with ``(x W^T + b, x A^T)`` from one pass over x, then exactly the unfused casts:
        xa (float32) rounded to x's dtype, scaled, multiplied by B in x's dtype, added to the base output."""
        bias = None if self.base.bias is None else self.base.bias.to(x.dtype)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        result, xa = nf4_lora_linear(x, self.base.nf4_weight(), bias, a)  # (..., out) in x.dtype, (..., r) float32
        update = F.linear(xa.to(x.dtype) * self.scale, b)  # (..., r) -> (..., out)
        return result + update.to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scale * B @ A`` into the weight ``forward`` uses. Idempotent.

        Dense base (Linear / Conv1D): the original weight Parameter is set aside and ``base.weight`` becomes a new
        frozen Parameter ``W0 + delta``, computed in float32 (or wider if the base or adapter is) and rounded once
        to the base dtype. Cost: one extra copy of each adapted weight while merged. That rounding is at most half
        an ulp: ``|err| <= u * |W0 + delta|`` elementwise with u = 2^-8 for bf16, 2^-11 for fp16, 2^-24 for
        float32 (plus the float32 sum's own 2^-24 for low-precision bases). Because the original is kept (the same
        object, never written to, so a weight tied to another module is safe), `unmerge` and `lowrank.eject`
        restore it bit-exactly.

        NF4 base: the 4-bit weight is left untouched; a dense ``dequantize(W0) + delta`` in the layer's compute
        dtype (else the original weight dtype) is built and used by ``forward`` until `unmerge` drops it. Cost:
        one dense copy of the weight. The merged layer then skips re-quantization, so its output matches the
        unmerged one up to the compute dtype's rounding.

        ``state_dict()`` does not depend on the merge state: it always holds the original base weights and A, B.
        """
        if self.merged:
            return
        merged = self.merged_weight()  # (out, in)
        if self._quantized:
            self._merged_weight = merged
        else:
            self.__dict__["_original_weight"] = self.base.weight
            merged = merged.T.contiguous() if self.fan_in_fan_out else merged  # Conv1D stores (in, out)
            self.base.weight = nn.Parameter(merged, requires_grad=False)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` exactly (the original weight was kept, nothing is subtracted). Idempotent."""
        if not self.merged:
            return
        if self._quantized:
            self._merged_weight = None
        else:
            self.base.weight = self._original_weight  # it followed any .to() since merge: see `_apply`
            self.__dict__["_original_weight"] = None
        self.merged = False

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (behind .to(), .cuda(), .half(), ...), plus the original weight set aside while
        merged: it is registered nowhere, so the model being moved or cast while merged must move or cast it too
        (a cast rounds it, as it would have rounded the unmerged model). A weight tied to another module was
        already converted there; converting it again is a no-op."""
        super()._apply(fn, recurse)
        original = self._original_weight
        if original is not None:
            original.data = fn(original.data)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha:g}, "
            f"scale={self.scale:g}, rslora={self.rslora}, dropout={self.dropout_p:g}, merged={self.merged}, "
            f"enabled={self.enabled}"
        )


# --- state-dict naming ----------------------------------------------------------------------------------------
# Module-level functions, not bound methods or lambdas: a bound method in the hook dicts would be a reference
# cycle and a lambda would break pickling/deepcopy of the model.


def _state_dict_post_hook(module: LoRALinear, state_dict, prefix: str, local_metadata) -> None:
    """``<prefix>base.<rest>`` -> ``<prefix><rest>``, base keys first, then lora_A, lora_B (original order)."""
    base_prefix = prefix + "base."
    # This layer's keys are the last ones written (own params, then the base's subtree): pop and re-insert them.
    # Walk back from the end only as far as they go: a scan of the whole dict per layer would make state_dict()
    # quadratic in the number of adapted layers.
    ours = list(itertools.takewhile(lambda k: k.startswith(prefix), reversed(state_dict)))[::-1]
    items = {k: state_dict.pop(k) for k in ours}
    for key, value in items.items():
        if key.startswith(base_prefix):
            state_dict[prefix + key[len(base_prefix) :]] = value
    if module.merged and not module._quantized and (prefix + "weight") in state_dict:
        # A checkpoint means "base + adapter" whatever the merge state: save the original weight, not W0 + delta.
        original = module._original_weight
        keep_vars = isinstance(state_dict[prefix + "weight"], nn.Parameter)
        state_dict[prefix + "weight"] = original if keep_vars else original.detach()
    for name in _ADAPTER_KEYS:
        if prefix + name in items:
            state_dict[prefix + name] = items[prefix + name]


def _load_pre_hook(module: LoRALinear, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """Incoming ``<prefix><rest>`` (a base key) -> ``<prefix>base.<rest>``; remember absent adapter keys."""
    if module.merged:
        raise RuntimeError(
            f"cannot load a state dict into merged LoRA layer {prefix[:-1] or type(module).__name__!r}: "
            "call lowrank.unmerge(model) first"
        )
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if rest in _ADAPTER_KEYS or rest.startswith("base."):
            continue
        state_dict[prefix + "base." + rest] = state_dict.pop(key)
    names = tuple(prefix + n for n in _ADAPTER_KEYS)
    # Only when BOTH are absent is this a base checkpoint; a checkpoint missing one of them is broken and must fail.
    module._lora_keys_absent = names if not any(n in state_dict for n in names) else ()


def _load_post_hook(module: LoRALinear, incompatible_keys) -> None:
    """A checkpoint of the original model (no adapter keys) loads with strict=True: the adapter keeps its values."""
    for key in module._lora_keys_absent:
        if key in incompatible_keys.missing_keys:
            incompatible_keys.missing_keys.remove(key)
    module._lora_keys_absent = ()
