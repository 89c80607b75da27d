"""Adapter files: save and load LoRA adapters in the layout PEFT reads and writes, and export merged models.

Several adapters are saved as PEFT does: adapter "default" in ``path``, every other adapter ``n`` in
``path/n/`` (each a complete adapter directory; keys never carry the adapter name). An adapter directory holds
two files:

* ``adapter_model.safetensors``: for every adapted layer ``<name>`` (its qualified module name),
  ``base_model.model.<name>.lora_A.weight`` of shape (r, in_features) and ``base_model.model.<name>.lora_B.weight``
  of shape (out_features, r), contiguous, in their stored dtype (float32 unless the user cast them), with
  safetensors metadata ``{"format": "pt"}``. The layout is the same for Conv1D layers (PEFT keeps A and B in the
  nn.Linear orientation and only transposes the merged delta).
* ``adapter_config.json``: PEFT's ``LoraConfig`` fields. ``r`` / ``lora_alpha`` are the most common values and
  layers that differ are listed under ``rank_pattern`` / ``alpha_pattern`` by full module name (PEFT resolves a
  pattern key ``k`` for module ``m`` with ``re.match(rf"(.*\\.)?({k})$", m)``; we use the same rule when reading).
  ``fan_in_fan_out`` is true when any adapted layer is a Conv1D: PEFT decides per layer from the layer type anyway
  (it flips the flag for an nn.Linear or Conv1D that disagrees, with a warning), so a model that mixes both loads
  correctly in PEFT, and lowrank ignores the flag when reading. Built and validated in ``peft_config.py``.

Each adapter folder changes as a whole (``lowrank/files.py``): both files are written to temporary siblings and
renamed into place under a folder lock, and the weights file carries a copy of the config, so a load after any
crash or concurrent save gives one complete adapter or a clear error, never new weights with an old alpha. Loads
check the safetensors header (names, shapes, dtypes, offsets) against the model before reading any tensor data,
read only the tensors they use, and check finiteness after the cast to the adapter's dtype. Saving several
adapters writes one folder after another: each folder is whole, the set is not.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from . import _safetensors
from . import files as _files
from ._match import layer_kind
from .adapter import check_adapter_name, lora_scale
from .adapters import adapter_names, delete_adapter, lora_layers
from .base import follows_protocol
from .files import WEIGHTS_NAME
from .inject import eject, inject
from .lora import DEFAULT, LoRALayer
from .lora_embedding import LoRAEmbedding
from .lora_experts import LoRAExperts
from .peft_config import build_config, pattern_value, read_config
from .peft_layout import (
    check_base_weights,
    config_entries,
    explain_key,
    layer_tensors,
    match_adapter_key,
    module_features,
    parameter_names,
    plan_experts_load,
    special_keys,
    split_tensors,
)
from .tied import check_merge_keeps_ties

MERGED_NAME = "model.safetensors"
_PARTS = ("lora_A", "lora_B")
_KEY = re.compile(r"base_model\.model\.(?P<name>.+)\.(?P<part>lora_A|lora_B)(?:\.default)?\.weight")
# DoRA's magnitude (lowrank.dora): PEFT writes "base_model.model.<module>.lora_magnitude_vector" (no ".weight").
_MAGNITUDE = "lora_magnitude_vector"
_MAGNITUDE_KEY = re.compile(
    r"base_model\.model\.(?P<name>.+)\.(?P<part>lora_magnitude_vector)(?:\.default)?(?:\.weight)?"
)

# ---------------------------------------------------------------------------------------------------- writing


def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies; tensors sharing storage (tied weights) are cloned, which safetensors needs."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        t = t.to("cpu").contiguous()
        if ptr is not None and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


def _check_not_bare_layer(model: nn.Module) -> None:
    # Keys are named after the adapted module ("base_model.model.<name>.lora_A.weight"): the root has no name.
    if isinstance(model, LoRALayer):
        raise ValueError(
            "cannot save a bare LoRALinear: adapter files name each layer by its place in a model; save the model "
            "that contains it"
        )


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the model's LoRA adapters as ``adapter_model.safetensors`` + ``adapter_config.json`` directories.

    The files are the ones PEFT's ``save_pretrained`` writes, so ``PeftModel.from_pretrained(base, path)`` loads
    them (and ``PeftModel.from_pretrained(base, path / "b", adapter_name="b")`` adapter "b"). A merged model is
    saved the same way: the files hold A and B, never merged weights.

    Args:
        model: a model with adapters from ``lowrank.inject``.
        path: the directory (created if needed; other files in it are left alone).
        adapter_name: None saves every adapter, "default" at ``path`` and each other one at ``path/<name>/``
            (PEFT's multi-adapter layout); a name saves that adapter alone at ``path``.
        base_model_name_or_path: recorded in the config; by default the model's ``name_or_path`` when it has one.

    Returns:
        The directory ``path``.

    Raises:
        ValueError: no adapters (or a bare LoRALinear), an unknown name, an adapter holding NaN/inf, layers of one
            adapter mixing rsLoRA and plain LoRA, two adapters whose folders would coincide, or a config field
            that JSON cannot hold (e.g. ``base_model_name_or_path``). Everything is checked before anything is
            written.
        OSError: a folder or file cannot be written (the message names it; that folder keeps its old adapter).
    """
    _check_not_bare_layer(model)
    known = adapter_names(model)
    if not known:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to save (call lowrank.inject first)")
    if adapter_name is not None and adapter_name not in known:
        raise ValueError(f"unknown adapter {adapter_name!r}; the model has {known}")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    directory = Path(path)
    names = known if adapter_name is None else [adapter_name]
    folders = {n: directory if (adapter_name is not None or n == DEFAULT) else directory / n for n in names}
    clash = [n for n in names if str(folders[n]).lower() in [str(folders[m]).lower() for m in names if m != n]]
    if clash:  # e.g. "B" and "b" on a case-insensitive file system
        raise ValueError(f"adapters {clash} would be saved into one folder; rename one (lowrank has no rename)")
    jobs = []
    for name in names:  # build and check every file's content first: nothing is written if any is bad
        layers = [(n, layer) for n, layer in lora_layers(model) if name in layer.adapters]
        config = build_config(config_entries(layers, name), base_model_name_or_path,
                              any(lay.fan_in_fan_out for _, lay in layers if not isinstance(lay, LoRAEmbedding)),
                              [p for n, layer in layers for p in parameter_names(n, layer, name)])  # fmt: skip
        tensors, bad = {}, []
        for layer_name, layer in layers:
            for key, t in layer_tensors(layer_name, layer, name).items():
                if not torch.isfinite(t).all():
                    where = key.removeprefix("base_model.model.").removesuffix(".weight")
                    bad.append(where + ("" if name == DEFAULT else f" (adapter {name!r})"))
                tensors[key] = t
            magnitude = getattr(layer.adapters[name], _MAGNITUDE, None)
            if magnitude is not None:  # DoRA (lowrank.dora): PEFT's key has no ".weight"
                if not torch.isfinite(magnitude).all():
                    bad.append(f"{layer_name}.{_MAGNITUDE}" + ("" if name == DEFAULT else f" (adapter {name!r})"))
                tensors[f"base_model.model.{layer_name}.{_MAGNITUDE}"] = magnitude
        if bad:
            raise ValueError(f"refusing to save non-finite adapter weights (NaN or inf) in {bad}")
        _files.config_text(config)  # an unserialisable field fails here, before any folder is written
        jobs.append((folders[name], _cpu_tensors(tensors), config))
    for folder, tensors, config in jobs:
        _files.write_adapter(folder, tensors, config)
    return directory


def _from_conv1d(module: nn.Module) -> bool:
    """A quantized layer made from a HF Conv1D (``from_conv1d``): its dense export goes back to (in, out)."""
    return follows_protocol(module) and bool(getattr(module, "from_conv1d", False))


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The merged model's full state dict (CPU tensors, original key names): what `save_merged` writes.

    See `save_merged` for what each layer becomes. Tensors sharing storage (tied weights) are separate copies.
    """
    _check_not_bare_layer(model)
    check_merge_keeps_ties(model)  # a merged export of one side of a tied pair is not a tied model
    dense: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    experts: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        # Each dense weight goes to the CPU as soon as it is built: a 4-bit model must not need its whole dense
        # size on the accelerator to be exported.
        for name, layer in lora_layers(model):
            if isinstance(layer, LoRAExperts):  # several 3-D weights, each in the module's own layout
                experts[name] = {p: w.cpu() for p, w in layer.merged_params().items()}
                continue
            weight = layer.merged_weight().cpu()  # (out, in)
            conv1d_layout = layer.fan_in_fan_out or _from_conv1d(layer.base)  # Conv1D stores (in, out)
            dense[name] = (weight.T if conv1d_layout else weight, layer.base.bias)
        wrapped = tuple(name + "." for name in dense)
        for name, module in model.named_modules():
            if follows_protocol(module) and not name.startswith(wrapped):
                weight = module.dense_weight(module.dense_dtype).cpu()
                dense[name] = (weight.T if _from_conv1d(module) else weight, module.bias)
    prefixes = tuple(name + "." for name in dense)
    adapter_keys = tuple(f"{name}.lora_" for name in experts)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes + adapter_keys)}
    for name, params in experts.items():
        state.update({f"{name}.{p}": w for p, w in params.items()})
    for name, (weight, bias) in dense.items():
        state[f"{name}.weight"] = weight
        if bias is not None:  # a dense layer keeps weight and bias in one dtype (NF4: the compute dtype)
            state[f"{name}.bias"] = bias.detach().to(weight.dtype)
    return _cpu_tensors(state)


def save_merged(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the merged model's full state dict, with the original (un-adapted, un-quantized) key names.

    Every adapted layer ``<name>`` becomes ``<name>.weight`` = W0 + scale * B @ A (Conv1D: transposed back to its
    (in, out) layout), summed in float32 (float64 for a float64 base) and rounded once to the base dtype, plus
    ``<name>.bias``; the ``lora_A`` / ``lora_B`` keys are dropped. NF4 layers, adapted or not, become a dense
    ``<name>.weight`` of shape (out, in): dequantized (+ the delta) in the layer's ``compute_dtype``, or its original
    weight dtype when ``compute_dtype`` is None, with the bias in the same dtype. The 4-bit rounding stays in the
    weights: the file reproduces the quantized model, not the model before quantization. NF4 layers quantized from a
    Conv1D come out in its (in, out) layout, so the file loads into the original model class. Tensors that
    share storage (tied embeddings) are written under each key, so ``load_state_dict(..., strict=True)`` works.
    The model is not modified: a merged model stays merged, an unmerged one unmerged (the result is the same).

    Args:
        model: any model, with or without adapters and NF4 layers.
        path: the ``.safetensors`` file to write, or an existing directory (then ``<path>/model.safetensors``).

    Returns:
        The file written.
    """
    dest = Path(path)
    if dest.is_dir():
        dest = dest / MERGED_NAME
    state = merged_state_dict(model)
    _files.write_tensors_file(dest, state)
    return dest


# ---------------------------------------------------------------------------------------------------- reading


def _read_entries(reader, file: Path, skip=frozenset()) -> dict[str, dict[str, object]]:
    """The header of adapter_model.safetensors -> {module name: {"lora_A": entry, "lora_B": entry}}, checked.

    Entries (``lowrank._safetensors.Entry``: key, dtype, shape) come from the header alone: no tensor data is read.
    Keys in ``skip`` (experts and stored base weights, `lowrank.peft_layout.special_keys`) are left to the caller;
    embedding keys (``lora_embedding_A``) count as the linear layout.
    """
    pairs: dict[str, dict[str, object]] = {}
    unknown = []
    for key, entry in reader.entries.items():
        if key in skip:
            continue
        m = _KEY.fullmatch(key) or _MAGNITUDE_KEY.fullmatch(key) or match_adapter_key(key)
        if m is None:
            unknown.append(key)
            continue
        part = pairs.setdefault(m["name"], {})
        if m["part"] in part:  # "X.lora_A.weight" and "X.lora_A.default.weight": which one would PEFT load?
            raise ValueError(f"{file}: {m['name']}.{m['part']} is stored twice: {part[m['part']].name!r} and {key!r}")
        part[m["part"]] = entry
    if unknown:
        reasons = sorted({explain_key(k) for k in unknown})
        raise ValueError(f"{file}: tensors {sorted(unknown)[:8]} cannot be loaded: {'; '.join(reasons)}")
    if not pairs and not skip:
        raise ValueError(f"{file} holds no LoRA tensors")
    missing = [f"{name}.{part}" for name, p in pairs.items() for part in _PARTS if part not in p]
    if missing:
        raise ValueError(f"{file}: missing tensors {missing} (each adapted module needs both lora_A and lora_B)")
    for name, p in pairs.items():
        for part, entry in p.items():
            if not entry.dtype.is_floating_point:
                raise ValueError(f"{file}: {name}.{part} has dtype {entry.dtype}; LoRA weights must be floating point")
    return pairs


def _plan(model: nn.Module, cfg: dict, pairs: dict, strict: bool, where: Path, adapter_name: str) -> list:
    """Check every tensor pair against the model and the config; return [(name, r, alpha)] of the layers to load."""
    existing = {  # experts layers are checked by plan_experts_load
        n: lay for n, lay in lora_layers(model) if adapter_name in lay.adapters and not isinstance(lay, LoRAExperts)
    }
    layers = dict(lora_layers(model))
    modules = dict(model.named_modules())
    if existing:  # adapter_name is in the model: replace its weights, on exactly its layers
        unmatched = sorted(set(pairs) - set(existing))
        if strict and set(pairs) != set(existing):
            raise ValueError(
                f"the model already has adapters, but on other modules than {where}: file only {unmatched[:8]}, "
                f"model only {sorted(set(existing) - set(pairs))[:8]} (lowrank.eject the model, or load with "
                "another adapter_name)"
            )
        merged = [name for name in pairs if name in existing and existing[name].merged]
        if merged:
            raise ValueError(f"adapters of {merged[:8]} are merged into the base weights; call lowrank.unmerge first")
    else:
        unmatched = sorted(name for name in pairs if name not in modules)
        if strict and unmatched:
            raise ValueError(f"{where}: tensors for modules the model does not have: {unmatched[:8]}")
        merged = [name for name in pairs if name in layers and layers[name].merged]
        if merged:
            raise ValueError(f"adapters of {merged[:8]} are merged into the base weights; call lowrank.unmerge first")
    plan = []
    order = {name: i for i, name in enumerate(modules)}  # check (and report) in module order, not file order
    for name in sorted(set(pairs) - set(unmatched), key=order.__getitem__):
        p = pairs[name]
        module = modules[name]
        if isinstance(module, LoRALayer):
            in_features, out_features = module.in_features, module.out_features
        elif layer_kind(module) is not None:
            in_features, out_features = module_features(module)
        else:
            raise ValueError(f"{where}: {name!r} is a {type(module).__name__}, not a linear layer")
        r = pattern_value(cfg["rank_pattern"], name, cfg["r"])
        alpha = pattern_value(cfg["alpha_pattern"], name, cfg["lora_alpha"])
        a, b = p["lora_A"], p["lora_B"]
        if (_MAGNITUDE in p) != cfg["use_dora"]:
            raise ValueError(f"{where}: {name} {'has' if _MAGNITUDE in p else 'lacks'} a {_MAGNITUDE} tensor but the "
                             f"config says use_dora={str(cfg['use_dora']).lower()}")  # fmt: skip
        if _MAGNITUDE in p and tuple(p[_MAGNITUDE].shape) != (out_features,):
            raise ValueError(f"{where}: {name}.{_MAGNITUDE} has shape {tuple(p[_MAGNITUDE].shape)}, expected "
                             f"({out_features},)")  # fmt: skip
        if name in existing and hasattr(existing[name].adapters[adapter_name], _MAGNITUDE) != cfg["use_dora"]:
            raise ValueError(f"{name}: adapter {adapter_name!r} and {where} disagree on DoRA; eject the model first")
        if tuple(a.shape) != (r, in_features) or tuple(b.shape) != (out_features, r):
            raise ValueError(
                f"{where}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but the config gives r={r} "
                f"and the module is {in_features} -> {out_features}: expected ({r}, {in_features}) and "
                f"({out_features}, {r})"
            )
        if name in existing:
            have = existing[name].adapters[adapter_name]
            want = lora_scale(alpha, r, cfg["use_rslora"])
            if have.r != r or not math.isclose(want, have.scale, rel_tol=1e-6):
                raise ValueError(
                    f"{name} already has an adapter with r={have.r}, scale={have.scale:g}; {where} has r={r}, "
                    f"scale={want:g} (alpha={alpha}, rslora={cfg['use_rslora']}). lowrank.eject the model first"
                )
        plan.append((name, r, alpha))
    if not plan:
        raise ValueError(f"{where}: no tensor matches a module of the model (strict=False skipped {unmatched[:8]})")
    if unmatched:
        warnings.warn(
            f"load_adapter(strict=False) skipped tensors for {unmatched[:8]} (no such adapted module)", stacklevel=3
        )
    return plan


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = DEFAULT, *, strict: bool = True
) -> nn.Module:
    """Load an adapter written by ``save_adapter`` or by PEFT's ``save_pretrained`` into ``model`` as ``adapter_name``.

    The adapted modules are the ones named by the tensor keys (``base_model.model.<name>.lora_A[.default].weight``),
    not the config's ``target_modules`` (which may be a regex or suffixes). If the model has no adapter of that
    name, it is added (``lowrank.inject`` with the config's r, lora_alpha, lora_dropout, use_rslora and
    rank_pattern / alpha_pattern, resolved as PEFT does) and becomes the active adapter alone, beside any other
    adapters. If it has one, it must sit on exactly those modules with the same r and scale, and only the weights
    are replaced. Bases may be nn.Linear, Conv1D or NF4Linear. Weights are cast to the adapter parameters' dtype
    (float32). Fields PEFT writes that only select targets or initialise weights are ignored; features that
    change the forward (DoRA, lora_bias, bias != "none", modules_to_save, ...) are refused.

    Everything (files, JSON, fields, tensor names, shapes, dtypes, finiteness after the cast) is checked before
    the model is touched: on any error the model is exactly as it was. Names and shapes are checked from the
    safetensors header before any tensor data is read, and only the tensors loaded are read.

    Args:
        model: the base model (plain, quantized with ``lowrank.quantize``, or already adapted).
        path: the adapter directory (for PEFT's multi-adapter layout, ``path/<name>`` of a non-default adapter).
        adapter_name: the name the adapter gets in the model.
        strict: if False, tensors for modules the model lacks (or, when replacing, for modules the adapter does
            not cover) are skipped with a warning, and a replaced adapter may keep layers the file does not cover.

    Returns:
        ``model``, with the adapter loaded (y = base(x) + scale * dropout(x) A^T B^T per adapted layer).

    Raises:
        FileNotFoundError: the directory or one of its two files is missing. NotADirectoryError: ``path`` is a file.
        ValueError: anything else that is wrong with the files or does not fit the model (the message says what),
            including config and weights from two different saves (an interrupted or concurrent save).
    """
    check_adapter_name(adapter_name)
    directory = _files.check_folder(path)
    cfgs, limits = [], {}  # read_config validates the fields before the two copies of the config are compared
    if strict:  # every tensor must name a module (lora_A, lora_B): a longer header is refused before it is parsed
        n = 2 * sum(1 for _ in model.named_modules())
        limits = {"max_tensors": n, "max_header_bytes": min(_safetensors.MAX_HEADER_BYTES, 4096 * n + (1 << 20))}
    check = lambda raw: cfgs.append(read_config(directory, raw))  # noqa: E731
    with _files.open_adapter(directory, check, **limits) as (_, reader):
        cfg = cfgs[0]  # config and weights of one save; only the headers read so far
        special = special_keys(model, reader.entries, cfg["target_parameters"])
        pairs = _read_entries(reader, directory / WEIGHTS_NAME, skip=special)
        plan = _plan(model, cfg, pairs, strict, directory, adapter_name) if pairs else []
        # Experts (float32, as inject builds them) and stored base weights (their own dtype) are read whole.
        raw = {k: _files.read_tensor(reader, k, special[k] or reader.entries[k].dtype) for k in special}

        def r_of(name: str) -> int:
            return pattern_value(cfg["rank_pattern"], name, cfg["r"])

        _, experts, base = split_tensors(model, raw, cfg["target_parameters"], r_of, directory / WEIGHTS_NAME)
        experts_r, experts_alpha = plan_experts_load(model, cfg, experts, directory, adapter_name)
        check_base_weights(model, base, {name for name, _, _ in plan}, directory)
        layers = dict(lora_layers(model))
        tensors = {}  # only the planned tensors are read, each cast to the dtype it will have in the model
        for name, _, _ in plan:
            known = name in layers and adapter_name in layers[name].adapters
            have = layers[name].adapters[adapter_name] if known else None
            for part in (*_PARTS, _MAGNITUDE) if _MAGNITUDE in pairs[name] else _PARTS:
                dtype = torch.float32 if have is None else getattr(have, part).dtype  # inject's adapter_dtype
                tensors[name, part] = _files.read_tensor(reader, pairs[name][part].name, dtype, f"{name}.{part}")
    if adapter_name not in adapter_names(model):
        names = {name for name, _, _ in plan}
        grad_flags = [(p, p.requires_grad) for p in model.parameters()]
        had_adapters = bool(adapter_names(model))
        try:
            inject(
                model,
                (lambda n, m: n in names) if names else [],  # exact names (a list entry also matches longer ones)
                r=experts_r or cfg["r"],
                alpha=experts_alpha or cfg["lora_alpha"],
                dropout=cfg["lora_dropout"],
                rslora=cfg["use_rslora"],
                dora=cfg["use_dora"],
                adapter_name=adapter_name,
                rank_pattern={name: r for name, r, _ in plan},
                alpha_pattern={name: alpha for name, _, alpha in plan},
                target_parameters=[f"{n}.{p}" for n, p in experts] or None,
            )
        except BaseException:
            if adapter_name in adapter_names(model):  # inject rolls back itself; this covers a later failure
                eject(model) if not had_adapters else delete_adapter(model, adapter_name)
            for p, flag in grad_flags:
                p.requires_grad_(flag)
            raise
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for name, _, _ in plan:
            adapter = layers[name].adapters[adapter_name]
            adapter.lora_A.copy_(tensors[name, "lora_A"])  # copy_ moves to the adapter's device
            adapter.lora_B.copy_(tensors[name, "lora_B"])
            if (name, _MAGNITUDE) in tensors:
                getattr(adapter, _MAGNITUDE).copy_(tensors[name, _MAGNITUDE])
        for (name, param), pair in experts.items():
            adapter = layers[name].adapters[adapter_name]
            adapter.lora_A[param].copy_(pair["lora_A"])
            adapter.lora_B[param].copy_(pair["lora_B"])
    return model
