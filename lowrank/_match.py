"""Which modules of a model a call acts on: adaptable layers and PEFT-style target matching.

One place for the rules that `inject`, `quantize` and `load_adapter` share:

* the *layer kinds* lowrank can adapt (`LAYER_KINDS`: each a `lowrank.lora.LoRALayer` subclass whose
  ``accepts(module)`` says whether it wraps that module; linear layers are ``nn.Linear``, HF ``Conv1D`` and
  base-protocol modules such as ``NF4Linear``, see `lowrank.base`);
* ``targets`` is a list of names (a module matches an entry when its qualified name equals it or ends with
  ``"." + entry``), a single string (a regular expression that must match the whole qualified name), a callable
  ``(name, module) -> bool``, or ``"all-linear"`` (every linear layer except the output head);
* ``exclude`` takes the same forms (but not ``"all-linear"``) and wins over ``targets``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch.nn as nn

from .base import is_conv1d, is_linear, linear_features
from .lora import LoRALayer, LoRALinear
from .lora_embedding import LoRAEmbedding

__all__ = ["LAYER_KINDS", "find_targets", "is_conv1d", "is_linear", "layer_kind", "linear_features"]

# Adapted-layer classes, tried in order; a new target kind (embeddings, experts) is one more entry.
LAYER_KINDS: list[type[LoRALayer]] = [LoRALinear, LoRAEmbedding]


def layer_kind(module: nn.Module) -> type[LoRALayer] | None:
    """The `LoRALayer` subclass that can wrap ``module``, or None."""
    return next((kind for kind in LAYER_KINDS if kind.accepts(module)), None)


def outer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` without the modules inside a LoRA layer (the layer stands for its base)."""
    wrapped: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if wrapped and name.startswith(wrapped):
            continue
        if isinstance(module, LoRALayer):
            wrapped += (name + ".",)
        yield name, module


def _names_entry(name: str, entry: str) -> bool:
    """PEFT's rule for a list entry: the qualified name equals it or ends with ``"." + entry``."""
    return name == entry or name.endswith("." + entry)


def linear_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the linear layers of ``model`` (layers inside a LoRA wrapper count as the wrapper)."""
    return [name for name, module in outer_modules(model) if isinstance(module, LoRALinear) or is_linear(module)]


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s): the module returned by ``get_output_embeddings()``, else any ``lm_head``."""
    heads = set()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for name, module in model.named_modules():
        if (head is not None and module is head) or name == "lm_head" or name.endswith(".lm_head"):
            heads.add(name)
    return heads


def _matcher(spec, what: str) -> Callable[[str, nn.Module], bool]:
    if callable(spec):
        return lambda name, module: bool(spec(name, module))
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise ValueError(f"{what}={spec!r} is not a valid regular expression: {e}") from None
        return lambda name, module: pattern.fullmatch(name) is not None
    if isinstance(spec, (list, tuple, set, frozenset)):
        entries = list(spec)
        if not entries or not all(isinstance(t, str) and t for t in entries):
            raise ValueError(f"{what} must be a non-empty list of non-empty module names, got {spec!r}")
        return lambda name, module: any(_names_entry(name, t) for t in entries)
    raise TypeError(f"{what} must be a list of names, a regex string, a callable or 'all-linear', got {type(spec)}")


def find_targets(model: nn.Module, targets, exclude=None) -> list[tuple[str, nn.Module]]:
    """Resolve ``targets`` / ``exclude`` to ``[(qualified_name, module)]`` in module order.

    Matches every module of the model (not only linear ones), so callers can reject matches of the wrong type
    with a precise message. Modules inside a LoRA wrapper are never listed (the wrapper is). With
    ``targets="all-linear"`` the result is every linear layer except the output head.

    Raises:
        ValueError: nothing matched (the message lists the linear layers the model has), or a list entry
            matched no module (a typo would otherwise be silently ignored), or ``exclude="all-linear"``.
    """
    if targets == "all-linear":
        heads = output_head_names(model)
        target_fn = lambda name, module: name not in heads and (is_linear(module) or isinstance(module, LoRALinear))  # noqa: E731
    else:
        target_fn = _matcher(targets, "targets")
    if exclude == "all-linear":
        raise ValueError("exclude='all-linear' would exclude every target; name the layers to leave out instead")
    exclude_fn = _matcher(exclude, "exclude") if exclude is not None else (lambda name, module: False)
    found = [
        (name, module)
        for name, module in outer_modules(model)
        if name and target_fn(name, module) and not exclude_fn(name, module)
    ]

    if isinstance(targets, (list, tuple, set, frozenset)):
        unmatched = [t for t in targets if not any(_names_entry(n, t) for n, _ in found)]
        if unmatched and found:
            raise ValueError(
                f"targets {unmatched} matched no module of {type(model).__name__} (others did). "
                f"Linear layers: {_summarise(linear_layer_names(model))}"
            )
    if not found:
        raise ValueError(
            f"targets={targets!r} (exclude={exclude!r}) matched no module of {type(model).__name__}. "
            f"Its linear layers are: {_summarise(linear_layer_names(model))}"
        )
    return found


def _summarise(names: list[str], limit: int = 12) -> str:
    """Unique leaf names first (what users pass as targets), then a few full names."""
    if not names:
        return "(none)"
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"leaf names {leaves}; full names: {shown}"
