"""Model surgery: put `LoRALinear` wrappers into a model, fold them in and out, and take them back out.

    lowrank.inject(model, ["q_proj", "v_proj"], r=8, alpha=16)   # wrap; freeze everything else
    opt = torch.optim.AdamW(lowrank.adapter_parameters(model))
    with lowrank.disabled(model): ...                          # the base model's outputs
    lowrank.merge(model); lowrank.unmerge(model)               # fold scale * B @ A in and out (exact)
    lowrank.eject(model)                                       # the original modules, bit-identical

Adapted layers are found by module type (`LoRALinear`), never by name substrings, so a user module that happens
to be called ``lora_something`` is never mistaken for an adapter.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from ._match import find_targets, is_linear, linear_features
from .lora import _ADAPTER_KEYS, LoRALinear, _check_hyperparameters
from .nf4_linear import NF4Linear


def inject(
    model: nn.Module,
    targets,
    *,
    r: int = 8,
    alpha: float = 8.0,
    dropout: float = 0.0,
    rslora: bool = False,
    exclude=None,
    adapter_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Wrap the target linear layers of ``model`` in `LoRALinear`, in place, and freeze every other parameter.

    Each adapted layer computes ``y = x W^T + b + scale * dropout(x) A^T B^T``, ``scale = alpha / r`` (rslora:
    ``alpha / sqrt(r)``); B starts at zero, so the model's outputs are unchanged right after the call.

    Args:
        model: any ``nn.Module``; its linear layers are ``nn.Linear``, HF ``Conv1D`` or ``NF4Linear``.
        targets: which layers to adapt. A list of names (a layer matches an entry when its qualified name equals
            it or ends with ``"." + entry``, as in PEFT), a single string (regular expression, full match on the
            qualified name), a callable ``(name, module) -> bool``, or ``"all-linear"`` (every linear layer
            except the output head; name the head explicitly to adapt it).
        r, alpha, dropout, rslora: see `LoRALinear`.
        exclude: layers to skip, in the same forms as ``targets`` (not ``"all-linear"``); wins over targets.
        adapter_dtype: dtype of A and B (float32 by default, also for bf16/fp16 models).

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: bad hyper-parameter; nothing matched (the message lists the model's linear layers); a list
            entry matched nothing; a match is not a linear layer; a match is already adapted; a match is shared
            by several parents (adapting one place would silently leave the other).
        TypeError: ``targets`` / ``exclude`` of an unsupported type.

    Everything is checked before the model is touched: after an exception the model is unchanged.
    """
    _check_hyperparameters(r, alpha, dropout, adapter_dtype)
    found = find_targets(model, targets, exclude)
    already = [name for name, module in found if isinstance(module, LoRALinear)]
    if already:
        raise ValueError(
            f"{already} already carry a LoRA adapter; adapters do not stack. Call lowrank.eject(model) first, or "
            "exclude them"
        )
    not_linear = [f"{name} ({type(module).__name__})" for name, module in found if not is_linear(module)]
    if not_linear:
        raise ValueError(
            f"targets={targets!r} matched modules that are not linear layers: {not_linear}. Only nn.Linear, HF "
            "Conv1D and NF4Linear can be adapted; use exact names or a tighter pattern"
        )
    names_of = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(module), []).append(name)
    shared = {name: names_of[id(module)] for name, module in found if len(names_of[id(module)]) > 1}
    if shared:
        raise ValueError(f"target layers are shared by several parents (names: {shared}); cannot adapt one copy")

    # Build every wrapper before swapping any in: a failure while building (e.g. out of memory) leaves the model
    # as it was. (Building freezes each base; that is undone below only for the bases of a failed build.)
    grad_flags = [(p, p.requires_grad) for _, module in found for p in module.parameters()]
    try:
        wrappers = [
            (name, LoRALinear(module, r, alpha, dropout, rslora, adapter_dtype=adapter_dtype)) for name, module in found
        ]
    except BaseException:
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        raise
    for name, wrapper in wrappers:
        _set_submodule(model, name, wrapper)
    adapters = {id(p) for p in adapter_parameters(model)}
    for p in model.parameters():
        if id(p) not in adapters:
            p.requires_grad_(False)
    return model


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)  # also right for nn.ModuleList / nn.Sequential children ("0", "1", ...)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Yield ``(qualified_name, layer)`` for every `LoRALinear` in ``model`` (found by type), in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter's ``lora_A`` and ``lora_B`` (pass them to an optimizer). Frozen base weights excluded."""
    return [p for _, layer in lora_layers(model) for p in (layer.lora_A, layer.lora_B)]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone, under the model's own key names (``'model.layers.0.self_attn.q_proj.lora_A'``).

    Values are detached tensors sharing storage with the parameters (as ``state_dict()`` gives); clone them to
    keep a snapshot that later training does not change.
    """
    return {
        f"{name}.{key}" if name else key: getattr(layer, key).detach()
        for name, layer in lora_layers(model)
        for key in _ADAPTER_KEYS
    }


def merge(model: nn.Module) -> nn.Module:
    """Fold ``scale * B @ A`` into every adapted layer's weight (see `LoRALinear.merge`). Idempotent.

    While merged the forward costs what the base does, but the adapters cannot be trained: a forward in training
    mode with gradients enabled raises (eval mode or ``torch.no_grad()`` is fine). Merging is never a side effect
    of ``model.eval()``.
    """
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge` on every adapted layer, bit-exactly (the original weights were kept). Idempotent."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def eject(model: nn.Module) -> nn.Module:
    """Put the original base modules back (unmerging first) and drop the adapters; returns ``model``.

    The result's ``state_dict()`` is bit-identical to the model's before `inject`, however long the adapter was
    trained. Parameters that `inject` froze stay frozen (``model.requires_grad_(True)`` to train them again).
    If ``model`` itself is a `LoRALinear`, its base is returned instead (a module cannot replace itself).
    """
    if isinstance(model, LoRALinear):
        model.unmerge()
        return model.base
    for name, layer in list(lora_layers(model)):
        layer.unmerge()
        _set_submodule(model, name, layer.base)
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


def _logical_numel(module: nn.Module) -> int:
    """Parameters a quantized linear layer stands for (in * out + bias), not the packed bytes it stores."""
    in_features, out_features = linear_features(module)
    bias = getattr(module, "bias", None)
    return in_features * out_features + (bias.numel() if isinstance(bias, torch.Tensor) else 0)


def summary(model: nn.Module) -> str:
    """A short human-readable account of the adapters in ``model``.

    Trainable / total parameters (a quantized NF4 layer counts as the in * out + bias parameters it stands for)
    and their percentage, the number of adapted layers grouped by (type, r, alpha, scale, dropout), and the bytes
    held by frozen parameters and buffers (the number QLoRA shrinks; while merged it includes the extra copies).
    """
    quantized = [m for m in model.modules() if isinstance(m, NF4Linear)]
    quantized_params = {id(p) for m in quantized for p in m.parameters()}
    total = sum(_logical_numel(m) for m in quantized)
    trainable = frozen_bytes = 0
    for p in model.parameters():
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen_bytes += p.numel() * p.element_size()
        if id(p) not in quantized_params:
            total += p.numel()
    frozen_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    # While merged, a dense layer also holds its set-aside original weight (see LoRALinear.merge).
    originals = [layer._original_weight for _, layer in lora_layers(model) if layer._original_weight is not None]
    frozen_bytes += sum(w.numel() * w.element_size() for w in originals)

    groups: dict[tuple, int] = {}
    for _, layer in lora_layers(model):
        key = (type(layer.base).__name__, layer.r, layer.alpha, layer.scale, layer.dropout_p, layer.merged)
        groups[key] = groups.get(key, 0) + 1
    lines = [
        f"{type(model).__name__}: trainable {trainable:,} / total {total:,} parameters "
        f"({100.0 * trainable / max(total, 1):.4f}%)",
        f"adapted layers: {sum(groups.values())}",
    ]
    for (base, r, alpha, scale, p, merged), count in groups.items():
        lines.append(
            f"  {count} x {base}: r={r}, alpha={alpha:g}, scale={scale:g}, dropout={p:g}"
            + (", merged" if merged else "")
        )
    lines.append(f"frozen parameters and buffers: {frozen_bytes:,} bytes ({frozen_bytes / 2**20:.2f} MiB)")
    return "\n".join(lines)
