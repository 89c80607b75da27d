"""The adapters of a model: find them, name them, switch them, delete them, and mix them within one batch.

    lowrank.adapter_names(model)                      # ["default", "b"], in the order they were added
    lowrank.set_adapter(model, "b")                   # only "b" applies (and trains)
    lowrank.set_adapter(model, ["default", "b"])      # both apply, summed
    with lowrank.mixed_batch(model, ["default", "b", None, "b"]):   # one adapter per row (None: the base)
        loss = model(ids).loss; loss.backward()       # each adapter gets exactly its own rows' gradient
    lowrank.delete_adapter(model, "b")

State lives in the layers (`LoRALayer.active`, ``.mixed``); these functions set it on every layer at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from .init_svd import restore_base
from .lora import LoRALayer


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """Yield ``(qualified_name, layer)`` for every LoRA layer in ``model`` (found by type), in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters in ``model``, in the order they were added."""
    first: dict[str, int] = {}
    for _, layer in lora_layers(model):
        for name, adapter in layer.adapters.items():
            first[name] = min(first.get(name, adapter.order), adapter.order)
    return sorted(first, key=first.__getitem__)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at qualified name ``name`` of ``model`` (also right for ModuleList / Sequential children)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_names(model: nn.Module, names, what: str) -> list[str]:
    known = adapter_names(model)
    if not known:
        raise ValueError(f"{type(model).__name__} has no adapters (call lowrank.inject first)")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{what}: unknown adapter(s) {unknown}; the model has {known}")
    return known


def _check_switchable(model: nn.Module, what: str) -> None:
    for name, layer in lora_layers(model):
        if layer.mixed is not None:
            raise RuntimeError(f"{what} while lowrank.mixed_batch is active ({name})")
        if layer.merged:
            raise RuntimeError(f"{what} while adapters are merged into {name}: call lowrank.unmerge(model) first")


def _activate(model: nn.Module, names: Sequence[str]) -> None:
    """Every layer applies ``names`` (those it has); exactly their parameters require grad."""
    for _, layer in lora_layers(model):
        layer.active = tuple(names)
        for name, adapter in layer.adapters.items():
            adapter.requires_grad_(name in names)


def set_adapter(model: nn.Module, name_or_names: str | Sequence[str]) -> nn.Module:
    """Make one adapter, or several (applied and summed, as PEFT's ``set_adapter([...])``), the active ones.

    Only the active adapters' parameters require grad. A layer that lacks an active adapter adds nothing for it.

    Raises:
        ValueError: an unknown name (the message lists the known ones), or no names.
        RuntimeError: the model is merged (unmerge first) or inside `mixed_batch`.
    """
    names = [name_or_names] if isinstance(name_or_names, str) else list(name_or_names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"set_adapter needs one name or a list of distinct names, got {name_or_names!r}")
    _check_names(model, names, "set_adapter")
    if any(layer.active != tuple(names) for _, layer in lora_layers(model)):
        _check_switchable(model, "cannot change the active adapters")
    _activate(model, names)
    return model


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapter names (as set by `set_adapter`; a fresh `inject` activates the new adapter alone)."""
    for _, layer in lora_layers(model):
        return list(layer.active)
    return []


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` from every layer; a layer left without adapters gets its base module back.

    If ``name`` was active, the remaining active adapters stay active; if none remain, the first adapter added
    (of those left) becomes active.

    Raises:
        ValueError: unknown name. RuntimeError: merged or inside `mixed_batch`.
    """
    known = _check_names(model, [name], "delete_adapter")
    _check_switchable(model, f"cannot delete adapter {name!r}")
    active = [n for n in active_adapters(model) if n != name]
    for layer_name, layer in list(lora_layers(model)):
        if name in layer.adapters:
            restore_base(layer, name)  # a PiSSA / LoftQ base goes back with its adapter
            del layer.adapters[name]
        if not layer.adapters:
            replace_module(model, layer_name, layer.base)
    remaining = [n for n in known if n != name]
    if remaining:
        _activate(model, active or remaining[:1])
    return model


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it every adapter is switched off and the model computes as its base model.

    Each layer's previous ``enabled`` flag is restored on exit, also when the body raises.
    """
    previous = [(layer, layer.enabled) for _, layer in lora_layers(model)]
    try:
        for layer, _ in previous:
            layer.enabled = False
        yield model
    finally:
        for layer, flag in previous:
            layer.enabled = flag


@dataclass
class MixPlan:
    """One layer's view of a mixed batch: its adapters used, in concatenation order (R = their summed ranks);
    the (batch, R) mask of each row's own columns times its scale; ``rows`` (batch, r_max), the indices of row i's
    rank rows in the concatenation with one zero row appended (index R pads a smaller rank, and fills None rows);
    ``row_scale`` (batch, 1, 1), row i's scale; per-row dropout probabilities (None when all are 0)."""

    names: list[str]
    mask: torch.Tensor
    rows: torch.Tensor
    row_scale: torch.Tensor
    dropout: torch.Tensor | None


class MixedBatch:
    """The per-row adapter assignment of `mixed_batch`, shared by every layer; plans are built once per layer."""

    def __init__(self, names: list[str | None], layer_names: dict[int, str]):
        self.names = names
        self._layer_names = layer_names
        self._plans: dict[tuple, MixPlan] = {}
        self._cache: dict[tuple, tuple] = {}

    def stacked(self, layer: LoRALayer, names: list[str], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_cat, B_cat^T)`` of ``names`` in ``dtype``, a zero row appended: (R + 1, in), (R + 1, out).

        Differentiable when a gradient is needed; otherwise (inference) built once and reused while no adapter
        parameter changes (their version counters), which saves two concatenations and casts per layer.
        """
        adapters = [layer.adapters[n] for n in names]
        params = [p for a in adapters for p in (a.lora_A, a.lora_B)]
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        key = ("stacked", id(layer), dtype)
        versions = tuple(p._version for p in params) + tuple(p.data_ptr() for p in params)
        if not needs_grad and key in self._cache and self._cache[key][0] == versions:
            return self._cache[key][1]
        zero_a = adapters[0].lora_A.new_zeros(1, layer.in_features)
        zero_b = adapters[0].lora_B.new_zeros(1, layer.out_features)
        a = torch.cat([ad.lora_A for ad in adapters] + [zero_a], 0).to(dtype)
        b = torch.cat([ad.lora_B.T for ad in adapters] + [zero_b], 0).to(dtype)
        if not needs_grad:
            self._cache[key] = (versions, (a, b))
        return a, b

    def plan(self, layer: LoRALayer, x: torch.Tensor) -> MixPlan:
        if x.dim() < 2 or x.shape[0] != len(self.names):
            raise ValueError(
                f"mixed_batch has {len(self.names)} names, one per row, but layer "
                f"{self._layer_names.get(id(layer), '?')!r} got an input of shape {tuple(x.shape)} "
                f"(batch {x.shape[0] if x.dim() else '-'}); inputs must be (batch, ..., features)"
            )
        key = (id(layer), x.dtype, x.device)
        if key not in self._plans:
            used = [n for n in layer.adapters if n in self.names]
            owner, scale, p = [], [], []
            for k, n in enumerate(used):
                adapter = layer.adapters[n]
                owner += [k] * adapter.r
                scale += [adapter.scale] * adapter.r
            rows = [used.index(n) if n in used else -1 for n in self.names]
            p = [layer.adapters[n].dropout_p if n in used else 0.0 for n in self.names]
            mask = (torch.tensor(rows)[:, None] == torch.tensor(owner, dtype=torch.long)[None, :]) * torch.tensor(
                scale, dtype=torch.float64
            )
            dropout = torch.tensor(p, device=x.device) if any(p) else None
            offsets = [0]
            for n in used:
                offsets.append(offsets[-1] + layer.adapters[n].r)
            r_max = max((layer.adapters[n].r for n in used), default=1)
            pad = offsets[-1]  # the zero row
            index = [
                [offsets[k] + j if j < layer.adapters[used[k]].r else pad for j in range(r_max)]
                if k >= 0
                else [pad] * r_max
                for k in rows
            ]
            row_scale = [layer.adapters[n].scale if n in used else 0.0 for n in self.names]
            self._plans[key] = MixPlan(
                used,
                mask.to(device=x.device, dtype=x.dtype),
                torch.tensor(index, device=x.device),
                torch.tensor(row_scale, dtype=torch.float64).to(device=x.device, dtype=x.dtype).view(-1, 1, 1),
                dropout,
            )
        return self._plans[key]


@contextmanager
def mixed_batch(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Context manager: row i of every batch gets adapter ``names[i]`` alone (None: the base model alone).

    Works in training: ``loss.backward()`` gives each adapter exactly the gradient its own rows give (as if each
    row ran with ``set_adapter(names[i])``). Inputs of every adapted layer must be (batch, ..., features) with
    batch == len(names). Inside the block the named adapters are the active (trainable) ones; on exit the previous
    active set and requires_grad flags come back. Plain LoRA adapters only (variants such as DoRA raise).

    Raises:
        ValueError: an unknown name, an empty list, a variant adapter; a layer input whose batch size is not
            len(names) (at that layer's forward). RuntimeError: merged, or already inside a mixed batch.
    """
    names = list(names)
    if not names or not all(n is None or isinstance(n, str) for n in names):
        raise ValueError(f"mixed_batch needs one adapter name (or None) per batch row, got {names!r}")
    _check_names(model, [n for n in names if n is not None], "mixed_batch")
    _check_switchable(model, "cannot start a mixed batch")
    layers = list(lora_layers(model))
    named = list(dict.fromkeys(n for n in names if n is not None))
    for layer_name, layer in layers:
        variants = [n for n in named if n in layer.adapters and not layer.adapters[n].mixable]
        if variants:
            kind = type(layer.adapters[variants[0]]).__name__  # a variant (DoRA) or an MoE experts adapter
            raise ValueError(f"mixed_batch supports plain LoRA adapters; {variants} in {layer_name} are {kind}")
    previous = [(layer, layer.active) for _, layer in layers]
    flags = [(p, p.requires_grad) for _, layer in layers for p in layer.adapters.parameters()]
    mix = MixedBatch(names, {id(layer): name for name, layer in layers})
    try:
        _activate(model, named)
        for _, layer in layers:
            layer.mixed = mix
        yield model
    finally:
        for layer, active in previous:
            layer.mixed = None
            layer.active = active
        for p, flag in flags:
            p.requires_grad_(flag)
