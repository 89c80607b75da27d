"""Model surgery: put LoRA layers into a model, fold adapters in and out, and take them back out.

    lowrank.inject(model, ["q_proj", "v_proj"], r=8, alpha=16)            # adapter "default"; freeze the rest
    lowrank.inject(model, ["q_proj"], r=4, alpha=8, adapter_name="b")     # a second adapter, active alone
    opt = torch.optim.AdamW(lowrank.adapter_parameters(model))
    lowrank.merge(model); lowrank.unmerge(model)                          # fold the active adapters in and out
    lowrank.eject(model)                                                  # the original modules, bit-identical

Adapted layers are found by module type (`LoRALayer`), never by name substrings, so a user module that happens
to be called ``lora_something`` is never mistaken for an adapter. Finding, naming and switching adapters (and
mixed-adapter batches) is ``lowrank.adapters``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._match import find_targets, layer_kind, linear_features
from .adapter import LoRAAdapter, check_adapter_name, check_hyperparameters
from .adapters import adapter_names, lora_layers, replace_module, set_adapter
from .base import follows_protocol
from .dora import DoRAAdapter
from .init import check_init
from .init_svd import restore_base
from .lora import DEFAULT, LoRALayer, LoRALinear, adapter_key
from .lora_experts import plan_experts, warn_unadapted_experts
from .tied import check_merge_keeps_ties


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
    adapter_name: str = DEFAULT,
    init: str = "default",
    dora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    target_parameters: list[str] | None = None,
) -> nn.Module:
    """Add adapter ``adapter_name`` to the target layers of ``model``, in place; it becomes the active adapter alone.

    Each adapted layer computes ``y = x W^T + b + scale * dropout(x) A^T B^T``, ``scale = alpha / r`` (rslora:
    ``alpha / sqrt(r)``); B starts at zero, so the model's outputs are unchanged right after the call. The first
    call wraps the targets in LoRA layers and freezes every other parameter; a later call with a new name adds an
    adapter (its own r / alpha / dropout / targets) beside the existing ones. Only the active adapter's A and B
    require grad.

    Args:
        model: any ``nn.Module``; its linear layers are ``nn.Linear``, HF ``Conv1D`` or ``NF4Linear``.
        targets: a list of names (a layer matches an entry when its qualified name equals it or ends with
            ``"." + entry``, as in PEFT), a single string (regular expression, full match on the qualified name),
            a callable ``(name, module) -> bool``, or ``"all-linear"`` (every linear layer but the output head).
        r, alpha, dropout, rslora, adapter_dtype: see `lowrank.adapter.LoRAAdapter`.
        exclude: layers to skip, in the same forms as ``targets`` (not ``"all-linear"``); wins over targets.
        adapter_name: the new adapter's name (letters, digits, ``_``, ``-``); must not exist yet.
        init: an initialisation from ``lowrank.init.INITS``: "default", "gaussian", "pissa", "pissa_niter_<k>",
            "loftq" (the last three change the base: see ``lowrank.init_svd``).
        dora: DoRA adapters (`lowrank.dora.DoRAAdapter`, linear layers only) instead of plain LoRA.
        rank_pattern, alpha_pattern: per-layer r / alpha overrides, ``{name: value}`` where a key matches a layer
            as a ``targets`` list entry does (equal to its qualified name or a ``.``-suffix of it); first key wins.
        target_parameters: 3-D MoE expert weights to adapt, PEFT's ``target_parameters`` (e.g.
            ``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``; see `lowrank.lora_experts`). With it,
            ``targets`` may be ``[]`` or None (parameters only).

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: bad hyper-parameter or name; the name exists; nothing matched (the message lists the model's
            linear layers); a match cannot be adapted, is merged, or is shared by several parents.
        TypeError: ``targets`` / ``exclude`` of an unsupported type.

    Everything is checked before the model is touched: after an exception the model is unchanged.
    """
    check_hyperparameters(r, alpha, dropout, adapter_dtype)
    check_adapter_name(adapter_name)
    init_fn = check_init(init)
    if not isinstance(dora, bool):
        raise TypeError(f"dora must be True or False, got {dora!r}")
    if dora and target_parameters is not None:
        raise ValueError("dora=True is for linear layers; expert parameters (target_parameters) take plain LoRA")
    adapter_cls = DoRAAdapter if dora else LoRAAdapter
    params_only = target_parameters is not None and (targets is None or (isinstance(targets, list) and not targets))
    found = [] if params_only else find_targets(model, targets, exclude)
    sizes = {name: (_pattern(rank_pattern, name, r), _pattern(alpha_pattern, name, alpha)) for name, _ in found}
    for layer_r, layer_alpha in sizes.values():
        check_hyperparameters(layer_r, layer_alpha, dropout, adapter_dtype)
    if adapter_name in adapter_names(model):
        already = [name for name, m in found if isinstance(m, LoRALayer) and adapter_name in m.adapters]
        where = f"{already} already carry a LoRA adapter named {adapter_name!r}" if already else (
            f"adapter {adapter_name!r} already exists in {type(model).__name__}")  # fmt: skip
        raise ValueError(f"{where}; adapters do not stack: pass another adapter_name, or delete_adapter/eject first")
    kinds = {}
    for name, module in found:
        if isinstance(module, LoRALayer):
            if module.merged or module.mixed is not None:
                raise ValueError(f"{name} is merged or in a mixed batch: unmerge / leave mixed_batch before adding")
            continue
        kinds[name] = layer_kind(module)
    not_adaptable = [f"{name} ({type(m).__name__})" for name, m in found if name in kinds and kinds[name] is None]
    if not_adaptable:
        raise ValueError(
            f"targets={targets!r} matched modules that are not linear layers: {not_adaptable}. Only nn.Linear, HF "
            "Conv1D and NF4Linear can be adapted; use exact names or a tighter pattern"
        )
    names_of: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(module), []).append(name)
    shared = {name: names_of[id(m)] for name, m in found if len(names_of[id(m)]) > 1}
    if shared:
        raise ValueError(f"target layers are shared by several parents (names: {shared}); cannot adapt one copy")
    if dora:
        no_dora = [n for n, m in found if not (isinstance(m, LoRALinear) or kinds.get(n) is LoRALinear)]
        if no_dora:
            raise ValueError(f"dora=True needs linear layers (nn.Linear, Conv1D, NF4Linear); not: {no_dora[:8]}")

    # Build every new layer and adapter before swapping any in: a failure while building (e.g. out of memory)
    # leaves the model as it was. (Building a layer freezes its base; undone below if anything fails.)
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        built = []
        for name, module in found:
            layer = module if isinstance(module, LoRALayer) else kinds[name](module, r=None)
            device = next(iter(layer.base.parameters()), torch.empty(0)).device
            layer_r, layer_alpha = sizes[name]
            adapter = adapter_cls(layer.in_features, layer.out_features, layer_r, layer_alpha, dropout, rslora,
                                  adapter_dtype=adapter_dtype, device=device)  # fmt: skip
            if hasattr(init_fn, "check"):  # an init that changes the base checks every layer before any changes
                init_fn.check(name, layer, adapter)
            built.append((name, module, layer, adapter))
        if target_parameters is not None:
            built += plan_experts(model, target_parameters, r=r, alpha=alpha, dropout=dropout, rslora=rslora,
                                  adapter_dtype=adapter_dtype, adapter_name=adapter_name, init=init)  # fmt: skip
    except BaseException:
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        raise
    try:
        for name, module, layer, adapter in built:
            layer.add_adapter(adapter_name, adapter)
            if layer is not module:
                replace_module(model, name, layer)
        for _, _, layer, adapter in built:
            init_fn(layer, adapter_name)  # validates before it changes anything (see lowrank.init)
            if dora:  # m = ||W0 + s B A||_row once the init has set B, A and the base
                adapter.init_magnitude(layer.view)
    except BaseException:
        for name, module, layer, _ in built:
            restore_base(layer, adapter_name)
            if adapter_name in layer.adapters:
                del layer.adapters[adapter_name]
            if layer is not module:
                replace_module(model, name, module)
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        raise
    set_adapter(model, adapter_name)
    if targets == "all-linear":
        warn_unadapted_experts(model)
    ours = {id(p) for _, layer in lora_layers(model) for p in layer.adapters.parameters()}
    for p in model.parameters():
        if id(p) not in ours:
            p.requires_grad_(False)
    return model


def _pattern(patterns: dict | None, name: str, default):
    """The value of the first key of ``patterns`` that equals ``name`` or is a ``.``-suffix of it, else default."""
    if patterns is None:
        return default
    if not isinstance(patterns, dict):
        raise TypeError(f"rank_pattern / alpha_pattern must be a dict {{layer name: value}}, got {type(patterns)}")
    return next((v for k, v in patterns.items() if name == k or name.endswith("." + k)), default)


def adapter_parameters(model: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The adapters' parameters (pass them to an optimizer): every adapter's, or adapter ``adapter_name``'s only.
    Frozen base weights are never included."""
    return [
        p
        for _, layer in lora_layers(model)
        for name, adapter in layer.adapters.items()
        if adapter_name is None or name == adapter_name
        for p in adapter.parameters()
    ]


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapters alone, under the model's own state-dict keys (``'...q_proj.lora_A'`` for "default",
    ``'...q_proj.lora_A.<name>'`` for another), every adapter or ``adapter_name``'s only.

    Values are detached tensors sharing storage with the parameters (as ``state_dict()`` gives); clone them to
    keep a snapshot that later training does not change.
    """
    out = {}
    for layer_name, layer in lora_layers(model):
        for name, adapter in layer.adapters.items():
            if adapter_name is None or name == adapter_name:
                for param, t in adapter.named_parameters():
                    key = adapter_key(param, name)
                    out[f"{layer_name}.{key}" if layer_name else key] = t.detach()
    return out


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapters into every adapted layer's weight (see `LoRALayer.merge`). Idempotent.

    While merged the forward costs what the base does, but the adapters cannot be trained: a forward in training
    mode with gradients enabled raises (eval mode or ``torch.no_grad()`` is fine). Merging is never a side effect
    of ``model.eval()``. Raises RuntimeError during a mixed batch, ValueError for a layer with weights on the
    meta device. All or nothing: every layer is checked first, and a failure while merging (out of memory, a
    device mismatch) unmerges the layers merged so far (exactly: `unmerge` restores the kept originals).
    """
    for name, layer in lora_layers(model):
        if layer.mixed is not None:
            raise RuntimeError("cannot merge while lowrank.mixed_batch is active (each row has its own adapter)")
        if not layer.merged and any(t.device.type == "meta" for t in [*layer.parameters(), *layer.buffers()]):
            raise ValueError(f"{name} has weights on the meta device: load them before merging")
    check_merge_keeps_ties(model)  # before any layer is merged: see lowrank.tied
    done = []
    try:
        for _, layer in lora_layers(model):
            if not layer.merged:
                layer.merge()
                done.append(layer)
    except BaseException:
        for layer in reversed(done):
            layer.unmerge()
        raise
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge` on every adapted layer, bit-exactly (the original weights were kept). Idempotent."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def eject(model: nn.Module) -> nn.Module:
    """Put the original base modules back (unmerging first) and drop every adapter; returns ``model``.

    The result's ``state_dict()`` is bit-identical to the model's before `inject`, however long the adapters
    were trained (LoftQ, which quantized the base: the weights are ``deq(Q) + s B0 A0``, within the reported
    LoftQ error of the originals, see ``lowrank.init_svd.loftq_layer``). Parameters that `inject` froze stay
    frozen (``model.requires_grad_(True)`` to train them again).
    If ``model`` itself is a LoRA layer, its base is returned instead (a module cannot replace itself).
    """
    if isinstance(model, LoRALayer):
        model.unmerge()
        restore_base(model)
        return model.base
    for name, layer in list(lora_layers(model)):
        layer.unmerge()
        restore_base(layer)  # PiSSA / LoftQ changed the base: see lowrank.init_svd
        replace_module(model, name, layer.base)
    return model


def _logical_numel(module: nn.Module) -> int:
    """Parameters a quantized linear layer stands for (in * out + bias), not the packed bytes it stores."""
    in_features, out_features = linear_features(module)
    bias = getattr(module, "bias", None)
    return in_features * out_features + (bias.numel() if isinstance(bias, torch.Tensor) else 0)


def summary(model: nn.Module) -> str:
    """A short human-readable account of the adapters in ``model``.

    Trainable / total parameters (a quantized layer counts as the in * out + bias parameters it stands for) and
    their percentage, the adapted layers per adapter name grouped by (base type, r, alpha, scale, dropout), the
    active adapters, and the bytes held by frozen parameters and buffers (the number QLoRA shrinks; while merged
    it includes the extra copies).
    """
    quantized = [m for m in model.modules() if follows_protocol(m)]
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
    originals = [layer._original_weight for _, layer in lora_layers(model) if layer._original_weight is not None]
    frozen_bytes += sum(w.numel() * w.element_size() for w in originals)

    groups: dict[tuple, int] = {}
    layers = list(lora_layers(model))
    active: list[str] = []
    for _, layer in layers:
        active += [n for n in layer.active_adapters() if n not in active]
        for name, a in layer.adapters.items():
            key = (name, type(layer.base).__name__, type(a).__name__, a.r, a.alpha, a.scale, a.dropout_p, layer.merged)
            groups[key] = groups.get(key, 0) + 1
    lines = [
        f"{type(model).__name__}: trainable {trainable:,} / total {total:,} parameters "
        f"({100.0 * trainable / max(total, 1):.4f}%)",
        f"adapted layers: {len(layers)}; adapters: {adapter_names(model)}; active: {active}",
    ]
    for (name, base, kind, r, alpha, scale, p, merged), count in groups.items():
        variant = "" if kind == "LoRAAdapter" else f" ({kind})"
        lines.append(
            f"  {name!r}{variant}: {count} x {base}, r={r}, alpha={alpha:g}, scale={scale:g}, dropout={p:g}"
            + (", merged" if merged else "")
        )
    lines.append(f"frozen parameters and buffers: {frozen_bytes:,} bytes ({frozen_bytes / 2**20:.2f} MiB)")
    return "\n".join(lines)
