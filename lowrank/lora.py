"""LoRA layers: a frozen base module plus named adapters, and the linear kind `LoRALinear`.

    y = base(x) + sum over active adapters a of  scale_a * dropout_a(x) @ A_a^T @ B_a^T

`LoRALayer` holds what every target kind shares: the base (frozen, never replaced, so ejecting gives back the
very module that was wrapped), its adapters by name (``layer.adapters``, an ``nn.ModuleDict`` of
`lowrank.adapter.LoRAAdapter`), the active names, merging, and the state-dict naming. A target kind (linear here;
embeddings, experts) is a subclass with its own forward.

State-dict naming: the wrapper is invisible. Base keys keep the layer's own prefix (``q_proj.weight``, not
``q_proj.base.weight``); adapter ``"default"`` adds ``q_proj.lora_A`` / ``q_proj.lora_B`` (round 1's keys); any
other adapter ``n`` adds ``q_proj.lora_A.n`` / ``q_proj.lora_B.n``. A checkpoint of the original model (no adapter
keys) loads with ``strict=True``.

Mixed batches (`lowrank.mixed_batch`): row i of the batch gets only adapter ``names[i]``. The adapters of the
layer are concatenated along the rank (plus one zero row), one gather picks each row's own A and B (padded with
the zero row to the largest rank), and two batched matmuls apply them: the same ops for any number of adapters,
differentiable, so each adapter gets exactly the gradient of its own rows.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter import LoRAAdapter, check_hyperparameters
from .base import BaseView, base_view

DEFAULT = "default"


class LoRALayer(nn.Module):
    """A frozen base module and its adapters by name (the part every target kind shares).

    Attributes:
        base: the wrapped module (frozen). adapters: ``nn.ModuleDict`` name -> adapter, in the order added.
        active: the names applied by ``forward`` (set by `lowrank.set_adapter`; names this layer lacks add nothing).
        merged: True while the active adapters are folded into the weight ``forward`` uses (see `merge`).
        enabled: False makes ``forward`` compute the base alone (see ``lowrank.disabled``).
    """

    def __init__(self, base: nn.Module, view: BaseView):
        if isinstance(base, LoRALayer):
            raise TypeError("base is already a LoRA layer: add adapters to it (inject with a new adapter_name)")
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.__dict__["view"] = view  # stateless view of `base`; not a submodule
        self.in_features, self.out_features = view.in_features, view.out_features
        self.fan_in_fan_out = view.fan_in_fan_out
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged = False
        self.merged_adapters: tuple[str, ...] = ()
        self.enabled = True
        self.mixed = None  # a lowrank.adapters.MixedBatch while one is active
        # While merged, a dense base's original weight Parameter is set aside (the base holds a new Parameter
        # W0 + delta). Kept in __dict__, not registered: the very object goes back on unmerge (a weight tied to
        # another module, e.g. a GPT-2 head, is never written to). A quantized base stays untouched; its dense
        # merged weight is a non-persistent buffer (follows .to(), never reaches a checkpoint).
        self.__dict__["_original_weight"] = None
        self.register_buffer("_merged_weight", None, persistent=False)
        self._absent_keys: tuple[str, ...] = ()
        self.register_state_dict_post_hook(_state_dict_post_hook)
        self.register_load_state_dict_pre_hook(_load_pre_hook)
        self.register_load_state_dict_post_hook(_load_post_hook)
        self.train(base.training)  # injecting into a model in eval() must not switch dropout on

    # ---- adapters by name --------------------------------------------------------------------------------

    def add_adapter(self, name: str, adapter: LoRAAdapter) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        adapter.train(self.training)
        self.adapters[name] = adapter

    def active_adapters(self) -> list[str]:
        """The active names this layer has, in activation order."""
        return [n for n in self.active if n in self.adapters]

    def _single(self) -> LoRAAdapter:
        """The adapter the round-1 attributes (``lora_A``, ``r``, ``scale``, ...) answer for: the only one, or
        the only active one."""
        if len(self.adapters) == 1:
            return next(iter(self.adapters.values()))
        active = self.active_adapters()
        if len(active) == 1:
            return self.adapters[active[0]]
        raise RuntimeError(
            f"this layer has adapters {list(self.adapters)} (active: {active}); use layer.adapters[name]"
        )

    lora_A = property(lambda self: self._single().lora_A)
    lora_B = property(lambda self: self._single().lora_B)
    r = property(lambda self: self._single().r)
    alpha = property(lambda self: self._single().alpha)
    scale = property(lambda self: self._single().scale)
    rslora = property(lambda self: self._single().rslora)
    dropout_p = property(lambda self: self._single().dropout_p)
    dropout = property(lambda self: self._single().dropout)

    @property
    def weight(self) -> torch.Tensor:  # HF code reads e.g. `q_proj.weight.dtype`: answer for the base
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.view.bias

    # ---- dense weights and merging -----------------------------------------------------------------------

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The single adapter's ``scale * B @ A``, (out_features, in_features), differentiable (see `_single`)."""
        return self._single().delta_weight(dtype)

    def dense_base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen base weight W0 as a dense (out_features, in_features) tensor, also while merged."""
        if self.merged and not self.view.quantized:
            w = self._original_weight
            w = w.T if self.fan_in_fan_out else w
            return w if dtype is None else w.to(dtype)
        return self.view.dense_weight(dtype)

    def merged_weight(self) -> torch.Tensor:
        """W0 with the active adapters folded in (the merged ones while merged), (out_features, in_features).

        Summed in float32 (or wider if the base or an adapter is) and rounded once to the base's dense dtype.
        What `merge` uses and ``save_merged`` writes.
        """
        names = self.merged_adapters if self.merged else self.active_adapters()
        dtype = self.view.dtype
        wide = torch.promote_types(torch.float32, dtype)
        for n in names:
            wide = torch.promote_types(wide, self.adapters[n].lora_A.dtype)
        w = self.dense_base_weight(wide)
        for n in names:
            w = self.adapters[n].merge_weight(w)
        return w.to(dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapters into the weight ``forward`` uses. Idempotent; a layer with none is left as is.

        Dense base: the original weight Parameter is set aside and the base gets a new frozen Parameter
        ``W0 + delta`` (summed wide, rounded once: at most half an ulp of the base dtype). Quantized base: it is
        left untouched and a dense merged copy in its dense dtype serves ``forward``. Either costs one dense copy
        of the weight while merged; `unmerge` is exact (nothing is subtracted).
        """
        if self.merged or not self.active_adapters():
            return
        if self.mixed is not None:
            raise RuntimeError("cannot merge while lowrank.mixed_batch is active (each row has its own adapter)")
        self._fold()
        self.merged_adapters = tuple(self.active_adapters())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` exactly (the original weight was kept). Idempotent."""
        if not self.merged:
            return
        self._unfold()
        self.merged, self.merged_adapters = False, ()

    def _fold(self) -> None:
        """`merge`'s change to the layer (a layer kind with other weights overrides this and `_unfold`)."""
        merged = self.merged_weight()  # (out, in)
        if self.view.quantized:
            self._merged_weight = merged
        else:
            self.__dict__["_original_weight"] = self.base.weight
            merged = merged.T.contiguous() if self.fan_in_fan_out else merged  # stored (in, out)
            self.base.weight = nn.Parameter(merged, requires_grad=False)

    def _unfold(self) -> None:
        if self.view.quantized:
            self._merged_weight = None
        else:
            self.base.weight = self._original_weight  # it followed any .to() since merge: see `_apply`
            self.__dict__["_original_weight"] = None

    def _check_merged_forward(self) -> None:
        params = [p for n in self.merged_adapters for p in self.adapters[n].parameters()]
        if self.training and torch.is_grad_enabled() and any(p.requires_grad for p in params):
            # The merged forward never touches the adapters: training now would silently leave them unchanged.
            raise RuntimeError(
                "this LoRA layer is merged, so its forward does not use its adapters and they would get no "
                "gradient. Call lowrank.unmerge(model) before training, or run inference under model.eval() or "
                "torch.no_grad()."
            )

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (behind .to(), .cuda(), .half()), plus the original weight set aside while merged:
        it is registered nowhere, so it must be moved or cast here (a tied weight converted elsewhere: no-op)."""
        super()._apply(fn, recurse)
        original = self._original_weight
        if original is not None:
            original.data = fn(original.data)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, active={list(self.active)}, "
            f"merged={self.merged}, enabled={self.enabled}"
        )


class LoRALinear(LoRALayer):
    """A frozen linear layer (``nn.Linear``, HF ``Conv1D``, ``NF4Linear`` or any base-protocol module) plus adapters.

    ``y = base(x) + sum_a scale_a * dropout_a(x) @ A_a^T @ B_a^T`` over the active adapters; x (..., in_features)
    -> y (..., out_features), in x's dtype. ``LoRALinear(base, r, alpha, dropout, rslora)`` builds the layer with
    one adapter named "default" (round 1's constructor); `lowrank.inject` is the usual way in.

    While merged the adapters cannot be trained: a forward in training mode with gradients enabled raises
    RuntimeError; inference (``eval()`` or ``torch.no_grad()``) is fine. ``load_state_dict`` while merged raises.

    Raises:
        TypeError: ``base`` is not a linear layer, or already a LoRA layer. ValueError: a bad hyper-parameter.
    """

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        return base_view(module) is not None

    def __init__(self, base: nn.Module, r: int | None = 8, alpha: float = 8.0, dropout: float = 0.0,
                 rslora: bool = False, *, adapter_dtype: torch.dtype = torch.float32):  # fmt: skip
        if isinstance(base, LoRALayer):
            raise TypeError("base is already a LoRALinear: adapters do not stack; add one with a new adapter_name")
        view = base_view(base)
        if view is None:
            raise TypeError(f"base must be nn.Linear, HF Conv1D or NF4Linear, got {type(base).__name__}")
        if r is not None:
            check_hyperparameters(r, alpha, dropout, adapter_dtype)  # before the base is frozen
        super().__init__(base, view)
        if r is not None:  # r=None: an empty layer; the caller adds adapters
            device = next(iter(base.parameters()), torch.empty(0)).device
            adapter = LoRAAdapter(self.in_features, self.out_features, r, alpha, dropout, rslora,
                                  adapter_dtype=adapter_dtype, device=device)  # fmt: skip
            self.add_adapter(DEFAULT, adapter)
            self.active = (DEFAULT,)

    def _dense_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + b`` with W in the base's stored layout ((out, in), Conv1D (in, out))."""
        bias = self.bias
        bias = None if bias is None else bias.to(x.dtype)
        if self.fan_in_fan_out:
            # Same op as HF Conv1D's forward (addmm): the disabled-while-merged output is bit-identical to it.
            x2d = x.reshape(-1, self.in_features)  # (M, in) @ (in, out)
            out = x2d @ weight.to(x.dtype) if bias is None else torch.addmm(bias, x2d, weight.to(x.dtype))
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, weight.to(x.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features), in x's dtype."""
        if self.merged:
            self._check_merged_forward()
            if not self.enabled:  # "the base model": the base as it was before merging
                return self.base(x) if self.view.quantized else self._dense_forward(x, self._original_weight)
            return self._dense_forward(x, self._merged_weight) if self.view.quantized else self.base(x)
        if not self.enabled:
            return self.base(x)
        if self.mixed is not None:
            return self._mixed_forward(x, self.base(x))
        names = self.active_adapters()
        if len(names) == 1:
            fused = self._fused(x, self.adapters[names[0]])
            if fused is not None:
                return fused
        result = base_out = self.base(x)
        for n in names:
            result = self.adapters[n].add_to(result, x, self.view, base_out)
        return result

    def _mixed_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` plus, for row i, adapter ``mixed.names[i]`` only: ``s_i * drop(x_i) A_i^T B_i^T``.

        x (batch, ..., in), result (batch, ..., out). ``A_cat`` (R + 1, in) and ``B_cat^T`` (R + 1, out) are this
        layer's adapters concatenated along the rank plus a zero row; one gather gives every row its own
        (r_max, in) and (r_max, out) (a smaller rank padded with the zero row: exact), then a bmm and a baddbmm that
        adds into ``result``. Measured on one 576 -> 1536 bf16 layer, batch 8 x 64, 8 adapters of r=8, 2 threads:
        0.11 ms, against 0.25 ms for one matmul over all R columns with a row mask.
        """
        plan = self.mixed.plan(self, x)  # names, (batch, r_max) row indices, (batch, 1, 1) scales, dropout
        if not plan.names:  # no row uses an adapter of this layer
            return result
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (batch, T, in)
        if self.training and plan.dropout is not None:
            keep = 1.0 - plan.dropout.to(x.dtype).view(-1, 1, 1)  # (batch, 1, 1)
            x3 = x3 * (torch.rand_like(x3) < keep) / keep
        a_cat, b_cat = self.mixed.stacked(self, plan.names, x.dtype)  # (R + 1, in), (R + 1, out)
        a, b = a_cat[plan.rows], b_cat[plan.rows]  # (batch, r_max, in), (batch, r_max, out)
        h = torch.bmm(x3, a.transpose(1, 2)) * plan.row_scale  # (batch, T, in) @ (batch, in, r_max)
        r3 = result.reshape(x3.shape[0], x3.shape[1], self.out_features)
        if r3.dtype != h.dtype:
            return result + torch.bmm(h, b).view(result.shape).to(result.dtype)
        return torch.baddbmm(r3, h, b).view(result.shape)  # result + (batch, T, r_max) @ (batch, r_max, out)

    def _fused(self, x: torch.Tensor, adapter: LoRAAdapter) -> torch.Tensor | None:
        """The one-pass route (base matmul and ``x A^T`` together, inference only) when the base offers it: a
        plain adapter, dropout inactive, no gradient needed. Same casts, scale and output dtype as the unfused
        forward (bit for bit on the CPU reference path)."""
        if not adapter.mixable or (adapter.dropout_p > 0 and self.training) or adapter.wide_update(x):
            return None  # wide_update: the small-row float32 update is already the faster route on the CPU
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, adapter.lora_A, adapter.lora_B, self.bias)):  # fmt: skip
            return None
        out = self.view.fused_lora_forward(x, adapter.lora_A)  # A is used in x.dtype there
        if out is None:
            return None
        result, xa = out  # (..., out) in x.dtype, (..., r) wide
        return result + F.linear(xa.to(x.dtype) * adapter.scale, adapter.lora_B.to(x.dtype)).to(result.dtype)


# --- state-dict naming ----------------------------------------------------------------------------------------
# Module-level functions, not bound methods or lambdas: a bound method in the hook dicts would be a reference
# cycle and a lambda would break pickling/deepcopy of the model.


def adapter_key(param: str, name: str) -> str:
    """State-dict key (relative to the layer) of adapter ``name``'s parameter ``param``: ``lora_A`` for the
    default adapter (round 1), ``lora_A.<name>`` for any other."""
    return param if name == DEFAULT else f"{param}.{name}"


def _adapter_keys(module: LoRALayer) -> dict[str, str]:
    """{state-dict key relative to the layer: internal key ``adapters.<name>.<param>``} for every adapter."""
    return {
        adapter_key(param, name): f"adapters.{name}.{param}"
        for name, adapter in module.adapters.items()
        for param, _ in itertools.chain(adapter.named_parameters(), adapter.named_buffers())
    }


def _state_dict_post_hook(module: LoRALayer, state_dict, prefix: str, local_metadata) -> None:
    """``<prefix>base.<rest>`` -> ``<prefix><rest>`` and ``<prefix>adapters.<n>.<p>`` -> ``<prefix><p>[.<n>]``."""
    base_prefix = prefix + "base."
    # This layer's keys are the last ones written: pop and re-insert them, walking back only as far as they go (a
    # scan of the whole dict per layer would make state_dict() quadratic in the number of adapted layers).
    ours = list(itertools.takewhile(lambda k: k.startswith(prefix), reversed(state_dict)))[::-1]
    items = {k: state_dict.pop(k) for k in ours}
    for key, value in items.items():
        if key.startswith(base_prefix):
            state_dict[prefix + key[len(base_prefix) :]] = value
    if module.merged and not module.view.quantized and (prefix + "weight") in state_dict:
        # A checkpoint means "base + adapters" whatever the merge state: save the original weight, not W0 + delta.
        original = module._original_weight
        keep_vars = isinstance(state_dict[prefix + "weight"], nn.Parameter)
        state_dict[prefix + "weight"] = original if keep_vars else original.detach()
    for public, internal in _adapter_keys(module).items():
        if prefix + internal in items:
            state_dict[prefix + public] = items[prefix + internal]


def _load_pre_hook(module: LoRALayer, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """Incoming base keys -> ``<prefix>base.<rest>``, adapter keys -> ``<prefix>adapters.<n>.<p>``."""
    if module.merged:
        raise RuntimeError(
            f"cannot load a state dict into merged LoRA layer {prefix[:-1] or type(module).__name__!r}: "
            "call lowrank.unmerge(model) first"
        )
    adapter_keys = _adapter_keys(module)
    present = False
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if rest in adapter_keys:
            state_dict[prefix + adapter_keys[rest]] = state_dict.pop(key)
            present = True
        elif not rest.startswith(("base.", "adapters.")):
            state_dict[prefix + "base." + rest] = state_dict.pop(key)
        else:
            present = present or rest.startswith("adapters.")
    # Only when NO adapter key is there is this a base checkpoint; one missing some of them is broken and must fail.
    module._absent_keys = () if present else tuple(prefix + k for k in adapter_keys.values())


def _load_post_hook(module: LoRALayer, incompatible_keys) -> None:
    """A checkpoint of the original model (no adapter keys) loads with strict=True: the adapters keep their values.
    Missing adapter keys are reported under their public names."""
    missing = incompatible_keys.missing_keys
    for key in module._absent_keys:
        if key in missing:
            missing.remove(key)
    module._absent_keys = ()
    public = {internal: name for name, internal in _adapter_keys(module).items()}
    for i, key in enumerate(missing):
        head, sep, rest = key.partition("adapters.")
        if sep and rest and f"adapters.{rest}" in public and not head.endswith("base."):
            missing[i] = head + public[f"adapters.{rest}"]
