"""`LoRAExperts`: LoRA on the fused 3-D expert weights of a transformers MoE experts module.

    expert e:  y = x W_e^T + scale * dropout(x) A_e^T B_e^T,   A: (E, r, in), B: (E, out, r)

for each adapted parameter (``gate_up_proj``, ``up_proj``, ``down_proj``) of an experts module built with
transformers' ``@use_experts_implementation`` (Mixtral, Qwen3-MoE, OLMoE, gpt-oss, ...). One layer wraps the whole
experts module; each adapter (`ExpertsAdapter`) holds one (A, B) stack per parameter it adapts. The forward is
`lowrank.moe_ops.experts_forward`: routed tokens only, no dense ``B_e @ A_e``, dropout per (token, expert) pair.

Targets are parameters, named as in PEFT's ``target_parameters``: ``inject(model, [], target_parameters=
["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])``; a parameter ``<module>.<param>`` matches an entry when its
name equals it or ends with ``"." + entry``. `plan_experts` resolves them for `lowrank.inject`.

Merging swaps each adapted parameter for ``W + delta`` (summed in float32 or wider, rounded once) and keeps the
original Parameter aside, as `LoRALayer` does for a linear weight; `unmerge` puts the very object back. The
state dict always holds the original weights and, per adapter, ``lora_A.<param>`` (E, r, in) / ``lora_B.<param>``
(E, out, r) (``.<adapter name>`` appended for adapters other than "default"). PEFT's file layout (stacked per
expert, nested ``base_layer.`` prefixes) is built in `peft_tensors` / read in `from_peft`.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ._match import outer_modules
from .adapter import _ORDER, check_hyperparameters, lora_scale
from .base import BaseView
from .lora import LoRALayer
from .moe_ops import LowRank, experts_forward

# The parameters the experts forward multiplies tokens with; order = the decorator's use order.
EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


def is_experts_module(module: nn.Module) -> bool:
    """True for an experts module with transformers' experts protocol and fused 3-D weights."""
    flags = ("has_gate", "has_bias", "is_transposed", "num_experts")
    return all(hasattr(module, f) for f in flags) and getattr(module, "down_proj", None) is not None


def weight_features(module: nn.Module, param: str) -> tuple[int, int, int]:
    """(num_experts, in_features, out_features) of 3-D weight ``param`` (PEFT's rule: (E, out, in) unless the module
    says ``is_transposed``, then (E, in, out))."""
    e, d1, d2 = getattr(module, param).shape
    return (int(e), int(d1), int(d2)) if module.is_transposed else (int(e), int(d2), int(d1))


class ExpertsAdapter(nn.Module):
    """One adapter of an experts module: per adapted parameter p, ``lora_A[p]`` (E, r, in) and ``lora_B[p]``
    (E, out, r); expert e's update is ``scale * lora_B[p][e] @ lora_A[p][e]``.

    A_e is uniform(-1/sqrt(in), 1/sqrt(in)) per expert (nn.Linear's init for an (r, in) matrix), B = 0, so a new
    adapter changes nothing. Stored in ``adapter_dtype``, used in the input's dtype.
    """

    def __init__(self, shapes: dict[str, tuple[int, int, int]], r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 rslora: bool = False, *, adapter_dtype: torch.dtype = torch.float32, device=None):  # fmt: skip
        check_hyperparameters(r, alpha, dropout, adapter_dtype)
        super().__init__()
        self.r, self.alpha, self.rslora = r, float(alpha), bool(rslora)
        self.scale = lora_scale(self.alpha, r, self.rslora)
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for p, (e, fin, fout) in shapes.items():
            bound = 1.0 / math.sqrt(fin)
            a = torch.empty(e, r, fin, device=device, dtype=adapter_dtype).uniform_(-bound, bound)
            self.lora_A[p] = nn.Parameter(a)
            self.lora_B[p] = nn.Parameter(torch.zeros(e, fout, r, device=device, dtype=adapter_dtype))
        self.order = next(_ORDER)

    mixable = False  # lowrank.mixed_batch: rows are flattened into routed tokens; refused

    @property
    def params(self) -> list[str]:
        return list(self.lora_A.keys())

    def delta_weight(self, param: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scale * B_e @ A_e`` for every expert, (E, out, in), differentiable."""
        dtype = dtype or self.lora_A[param].dtype
        return torch.bmm(self.lora_B[param].to(dtype), self.lora_A[param].to(dtype)) * self.scale

    def updates(self) -> dict[str, LowRank]:
        return {p: LowRank(self.lora_A[p], self.lora_B[p], self.scale, self.dropout) for p in self.params}

    def extra_repr(self) -> str:
        return (
            f"params={self.params}, r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.dropout_p:g}"
        )


class _ExpertsView(BaseView):
    """The experts module as a base: hidden -> hidden; its weights are handled by `LoRAExperts` itself."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.in_features = self.out_features = weight_features(module, "down_proj")[2]  # down_proj's out: hidden

    @property
    def bias(self) -> None:
        return None


class LoRAExperts(LoRALayer):
    """A frozen transformers experts module plus `ExpertsAdapter` s; ``forward(hidden (T, hidden), top_k_index
    (T, K), top_k_weights (T, K)) -> (T, hidden)`` as the module's own, plus the active adapters' updates.

    Raises:
        TypeError: ``base`` is not an experts module with the transformers experts protocol.
    """

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        return is_experts_module(module)

    def __init__(self, base: nn.Module):
        if isinstance(base, LoRALayer):
            raise TypeError("base is already a LoRA layer: add adapters to it (inject with a new adapter_name)")
        if not is_experts_module(base):
            raise TypeError(f"{type(base).__name__} is not a transformers experts module (@use_experts_implementation)")
        super().__init__(base, _ExpertsView(base))
        self.__dict__["_original_params"] = {}  # param -> the original Parameter while merged (see merge)
        self.register_state_dict_post_hook(_originals_in_state_dict)

    def _updates(self, names) -> dict[str, tuple[LowRank, ...]]:
        out: dict[str, tuple[LowRank, ...]] = {}
        for n in names:
            for p, u in self.adapters[n].updates().items():
                out[p] = (*out.get(p, ()), u)
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if getattr(self.base, "_is_expert_parallel", False):
            raise NotImplementedError("LoRA on expert-parallel experts modules is not supported")
        if self.mixed is not None:
            raise ValueError("lowrank.mixed_batch does not support MoE experts adapters (tokens are routed, not rows)")
        if self.merged:
            self._check_merged_forward()
            if not self.enabled:  # the base as it was before merging
                return experts_forward(self.base, hidden_states, top_k_index, top_k_weights,
                                       weights=self._original_params)  # fmt: skip
            return self.base(hidden_states, top_k_index, top_k_weights)  # the weights hold W + delta
        if not self.enabled or not self.active_adapters():
            return self.base(hidden_states, top_k_index, top_k_weights)
        updates = self._updates(self.active_adapters())
        return experts_forward(self.base, hidden_states, top_k_index, top_k_weights, updates)

    # ---- merging: per parameter ------------------------------------------------------------------------------

    def merged_params(self) -> dict[str, torch.Tensor]:
        """param -> W with the active adapters (the merged ones while merged) folded in, in the module's layout and
        dtype: summed in float32 (or wider) and rounded once. What `merge` installs and ``save_merged`` writes."""
        names = self.merged_adapters if self.merged else self.active_adapters()
        out = {}
        for p in EXPERT_WEIGHTS:
            adapters = [self.adapters[n] for n in names if p in self.adapters[n].lora_A]
            if not adapters:
                continue
            w0 = self._original_params.get(p, getattr(self.base, p))
            wide = torch.promote_types(torch.float32, w0.dtype)
            w = w0.detach().to(wide)
            for a in adapters:
                delta = a.delta_weight(p, wide)  # (E, out, in)
                w = w + (delta.transpose(1, 2) if self.base.is_transposed else delta)
            out[p] = w.to(w0.dtype)
        return out

    def _fold(self) -> None:
        """`merge`: swap each adapted weight for ``W + delta`` (the original Parameter is kept aside)."""
        for p, w in self.merged_params().items():
            self._original_params[p] = getattr(self.base, p)
            setattr(self.base, p, nn.Parameter(w, requires_grad=False))

    def _unfold(self) -> None:
        """`unmerge`: put the original Parameters back (exact)."""
        for p, w in self._original_params.items():
            setattr(self.base, p, w)
        self._original_params.clear()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for w in self._original_params.values():
            w.data = fn(w.data)
        return self

    def merged_weight(self):
        raise TypeError("an experts layer has several 3-D weights: use merged_params()")

    def dense_base_weight(self, dtype=None):
        raise TypeError("an experts layer has several 3-D weights: read them from layer.base")

    def delta_weight(self, dtype=None):
        raise TypeError("an experts layer has several 3-D weights: use layer.adapters[name].delta_weight(param)")

    def extra_repr(self) -> str:
        return f"num_experts={self.base.num_experts}, active={list(self.active)}, merged={self.merged}"


def _originals_in_state_dict(module: LoRAExperts, state_dict, prefix: str, local_metadata) -> None:
    """A checkpoint means "base + adapters" whatever the merge state: the original weights, not W + delta."""
    for p, w in module._original_params.items():
        key = prefix + p
        if key in state_dict:
            state_dict[key] = w if isinstance(state_dict[key], nn.Parameter) else w.detach()


# ---- targets: PEFT's target_parameters ------------------------------------------------------------------------


def find_parameters(model: nn.Module, target_parameters) -> dict[str, list[str]]:
    """Resolve ``target_parameters`` to ``{experts module name: [parameter names]}`` in module order.

    A parameter registered directly on a module (``<module>.<param>``) matches an entry when its qualified name
    equals it or ends with ``"." + entry`` (PEFT's rule). Inside an existing `LoRAExperts` the base's parameters
    count under the layer's name.

    Raises:
        TypeError: not a list of strings. ValueError: an entry matches nothing (the message lists the model's 3-D
            parameters), a match is not 3-D, not on a transformers experts module, or not an expert weight.
    """
    if isinstance(target_parameters, str) or not isinstance(target_parameters, (list, tuple)):
        raise TypeError(f"target_parameters must be a list of parameter names, got {target_parameters!r}")
    if not target_parameters or not all(isinstance(t, str) and t for t in target_parameters):
        raise ValueError(f"target_parameters must be a non-empty list of non-empty names, got {target_parameters!r}")
    found: dict[str, list[str]] = {}
    hits = dict.fromkeys(target_parameters, False)
    three_d = []
    for name, holder in _parameter_holders(model):
        for pname, param in holder.named_parameters(recurse=False):
            key = f"{name}.{pname}" if name else pname
            if param.dim() == 3:
                three_d.append(key)
            matched = [t for t in target_parameters if key == t or key.endswith("." + t)]
            if not matched:
                continue
            for t in matched:
                hits[t] = True
            if param.dim() != 3:
                raise ValueError(
                    f"target_parameters entry {matched[0]!r} matched {key}, a {param.dim()}-D parameter of shape "
                    f"{tuple(param.shape)}; only 3-D expert weights (num_experts, ., .) can be targeted this way "
                    "(adapt linear layers through targets)"
                )
            if not is_experts_module(holder):
                raise ValueError(
                    f"{key} is a 3-D parameter of {type(holder).__name__}, which is not a transformers experts module "
                    "(@use_experts_implementation with has_gate / is_transposed / num_experts): its forward is unknown"
                )
            if pname not in EXPERT_WEIGHTS:
                raise ValueError(f"{key}: only the expert weights {list(EXPERT_WEIGHTS)} can be adapted")
            found.setdefault(name, []).append(pname)
    unmatched = [t for t, hit in hits.items() if not hit]
    if unmatched:
        shown = ", ".join(three_d[:8]) + (f", ... ({len(three_d)} in all)" if len(three_d) > 8 else "")
        raise ValueError(
            f"target_parameters {unmatched} matched no parameter of {type(model).__name__}. "
            f"Its 3-D parameters: {shown or '(none)'}"
        )
    return found


def _parameter_holders(model: nn.Module):
    """(name, module whose own parameters count under that name): a LoRA layer stands for its base."""
    for name, module in outer_modules(model):
        yield name, module.base if isinstance(module, LoRALayer) else module


def plan_experts(model: nn.Module, target_parameters, *, r: int, alpha: float, dropout: float, rslora: bool,
                 adapter_dtype: torch.dtype, adapter_name: str, init: str = "default") -> list:  # fmt: skip
    """Build (not install) the experts layers and adapters ``inject(..., target_parameters=...)`` adds.

    Returns:
        ``[(module name, module now at that name, layer, adapter)]``: ``layer`` is the module itself when it is
        already a `LoRAExperts`, else a new one around it (which froze its base; `lowrank.inject` restores the
        flags if anything fails). Nothing is added or swapped in here.

    Raises:
        ValueError: see `find_parameters`; a non-default ``init``; an experts layer that is merged, mixed or
            already has ``adapter_name``.
    """
    if init != "default":
        raise ValueError(f"init={init!r} is not available for MoE experts adapters (only 'default')")
    found = find_parameters(model, target_parameters)
    built = []
    for name, params in found.items():
        module = model.get_submodule(name)
        if isinstance(module, LoRAExperts):
            if module.merged or module.mixed is not None:
                raise ValueError(f"{name} is merged or in a mixed batch: unmerge / leave mixed_batch before adding")
            if adapter_name in module.adapters:
                raise ValueError(f"{name} already carries an adapter named {adapter_name!r}")
        holder = module.base if isinstance(module, LoRAExperts) else module
        shapes = {p: weight_features(holder, p) for p in EXPERT_WEIGHTS if p in params}
        device = getattr(holder, params[0]).device
        adapter = ExpertsAdapter(shapes, r, alpha, dropout, rslora, adapter_dtype=adapter_dtype, device=device)
        built.append((name, module, module if isinstance(module, LoRAExperts) else None, adapter))
    # Layers last: building one freezes its base, so nothing is frozen before every check above has passed.
    return [(n, m, layer or LoRAExperts(m), a) for n, m, layer, a in built]


def warn_unadapted_experts(model: nn.Module) -> None:
    """``targets="all-linear"`` adapts linear layers only, as PEFT 0.21 does: say which expert weights it left out."""
    left = unadapted_expert_weights(model)
    if left:
        shown = ", ".join(left[:4]) + (f", ... ({len(left)} in all)" if len(left) > 4 else "")
        warnings.warn(
            f"targets='all-linear' adapted linear layers only (as PEFT's 'all-linear'); the MoE expert weights "
            f"{shown} are 3-D parameters, not linear layers, and were not adapted (nor the routers). Pass "
            "target_parameters=[...] to adapt them.",
            stacklevel=3,
        )


def unadapted_expert_weights(model: nn.Module) -> list[str]:
    """Names of expert weights (3-D, on transformers experts modules) that no adapter covers."""
    out = []
    for name, holder in _parameter_holders(model):
        if not is_experts_module(holder):
            continue
        layer = model.get_submodule(name) if name else model
        covered = {p for a in layer.adapters.values() for p in a.params} if isinstance(layer, LoRAExperts) else set()
        out += [f"{name}.{p}" for p in EXPERT_WEIGHTS if getattr(holder, p, None) is not None and p not in covered]
    return out
