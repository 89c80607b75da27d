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

Writes are atomic per file: each file is written to a temporary name in the same directory, flushed to disk and
renamed over the destination (``os.replace``), weights first, config last. A crash leaves each file either complete
old or complete new, and a fresh directory without a config (which ``load_adapter`` rejects). We do not swap whole
directories because users keep other files next to the adapter (README, tokenizer) and PEFT writes in place too.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._match import layer_kind, linear_features
from .adapter import check_adapter_name, lora_scale
from .adapters import adapter_names, delete_adapter, lora_layers
from .base import follows_protocol
from .inject import eject, inject
from .lora import DEFAULT, LoRALayer
from .peft_config import CONFIG_NAME, build_config, pattern_value, read_config

WEIGHTS_NAME = "adapter_model.safetensors"
MERGED_NAME = "model.safetensors"
_PARTS = ("lora_A", "lora_B")
_KEY = re.compile(r"base_model\.model\.(?P<name>.+)\.(?P<part>lora_A|lora_B)(?:\.default)?\.weight")

# ---------------------------------------------------------------------------------------------------- writing


def _atomic_write(dest: Path, write: Callable[[str], None]) -> None:
    """Write ``dest`` through a temporary file in the same directory, fsync it, then rename it into place."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # same filesystem: rename is atomic
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX; Windows cannot open directories)
        fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
            adapter mixing rsLoRA and plain LoRA, or two adapters whose folders would coincide. Everything is
            checked before anything is written.
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
        config = build_config([(n, layer.adapters[name]) for n, layer in layers], base_model_name_or_path,
                              any(layer.fan_in_fan_out for _, layer in layers))  # fmt: skip
        tensors, bad = {}, []
        for layer_name, layer in layers:
            for part in _PARTS:
                t = getattr(layer.adapters[name], part)
                if not torch.isfinite(t).all():
                    bad.append(f"{layer_name}.{part}" + ("" if name == DEFAULT else f" (adapter {name!r})"))
                tensors[f"base_model.model.{layer_name}.{part}.weight"] = t
        if bad:
            raise ValueError(f"refusing to save non-finite adapter weights (NaN or inf) in {bad}")
        jobs.append((folders[name], _cpu_tensors(tensors), json.dumps(config, indent=2, sort_keys=True) + "\n"))
    for folder, tensors, text in jobs:
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / WEIGHTS_NAME, lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}))
        _atomic_write(folder / CONFIG_NAME, lambda tmp, t=text: Path(tmp).write_text(t, encoding="utf-8"))
    return directory


def _from_conv1d(module: nn.Module) -> bool:
    """A quantized layer made from a HF Conv1D (``from_conv1d``): its dense export goes back to (in, out)."""
    return follows_protocol(module) and bool(getattr(module, "from_conv1d", False))


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
    _check_not_bare_layer(model)
    dest = Path(path)
    if dest.is_dir():
        dest = dest / MERGED_NAME
    dense: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    with torch.no_grad():
        # Each dense weight goes to the CPU as soon as it is built: a 4-bit model must not need its whole dense
        # size on the accelerator to be exported.
        for name, layer in lora_layers(model):
            weight = layer.merged_weight().cpu()  # (out, in)
            conv1d_layout = layer.fan_in_fan_out or _from_conv1d(layer.base)  # Conv1D stores (in, out)
            dense[name] = (weight.T if conv1d_layout else weight, layer.base.bias)
        wrapped = tuple(name + "." for name in dense)
        for name, module in model.named_modules():
            if follows_protocol(module) and not name.startswith(wrapped):
                weight = module.dense_weight(module.dense_dtype).cpu()
                dense[name] = (weight.T if _from_conv1d(module) else weight, module.bias)
    prefixes = tuple(name + "." for name in dense)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for name, (weight, bias) in dense.items():
        state[f"{name}.weight"] = weight
        if bias is not None:  # a dense layer keeps weight and bias in one dtype (NF4: the compute dtype)
            state[f"{name}.bias"] = bias.detach().to(weight.dtype)
    state = _cpu_tensors(state)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(dest, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    return dest


# ---------------------------------------------------------------------------------------------------- reading


def _read_tensors(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """adapter_model.safetensors -> {module name: {"lora_A": A, "lora_B": B}}, keys and tensors validated."""
    file = directory / WEIGHTS_NAME
    if not file.is_file():
        hint = ""
        if (directory / "adapter_model.bin").exists():
            hint = " (found adapter_model.bin: pickled adapters are not loaded, convert them to safetensors)"
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}{hint}")
    try:
        tensors = load_file(str(file))  # checks the header and that the data length matches it
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a valid safetensors file (truncated or another format?): {e}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            unknown.append(key)
            continue
        pairs.setdefault(m["name"], {})[m["part"]] = t
    if unknown:
        raise ValueError(
            f"{file}: tensors {sorted(unknown)[:8]} are not LoRA weights in PEFT's layout "
            "'base_model.model.<module>.lora_A[.default].weight' / '...lora_B...' (DoRA, biases, embeddings and "
            "modules_to_save are not supported)"
        )
    if not pairs:
        raise ValueError(f"{file} holds no LoRA tensors")
    missing = [f"{name}.{part}" for name, p in pairs.items() for part in _PARTS if part not in p]
    if missing:
        raise ValueError(f"{file}: missing tensors {missing} (each adapted module needs both lora_A and lora_B)")
    for name, p in pairs.items():
        for part, t in p.items():
            if not t.is_floating_point():
                raise ValueError(f"{file}: {name}.{part} has dtype {t.dtype}; LoRA weights must be floating point")
            if not torch.isfinite(t.float()).all():  # float(): also catches float64 values that overflow float32
                raise ValueError(f"{file}: {name}.{part} holds NaN or inf (or values beyond the float32 range)")
    return pairs


def _plan(model: nn.Module, cfg: dict, pairs: dict, strict: bool, where: Path, adapter_name: str) -> list:
    """Check every tensor pair against the model and the config; return [(name, r, alpha)] of the layers to load."""
    existing = {n: layer for n, layer in lora_layers(model) if adapter_name in layer.adapters}
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
            in_features, out_features = linear_features(module)
        else:
            raise ValueError(f"{where}: {name!r} is a {type(module).__name__}, not a linear layer")
        r = pattern_value(cfg["rank_pattern"], name, cfg["r"])
        alpha = pattern_value(cfg["alpha_pattern"], name, cfg["lora_alpha"])
        a, b = p["lora_A"], p["lora_B"]
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
        warnings.warn(f"load_adapter(strict=False) skipped tensors for {unmatched[:8]} (no such adapted module)")
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

    Everything (files, JSON, fields, tensor names, shapes, dtypes, finiteness) is checked before the model is
    touched: on any error the model is exactly as it was.

    Args:
        model: the base model (plain, quantized with ``lowrank.quantize``, or already adapted).
        path: the adapter directory (for PEFT's multi-adapter layout, ``path/<name>`` of a non-default adapter).
        adapter_name: the name the adapter gets in the model.
        strict: if False, tensors for modules the model lacks (or, when replacing, for modules the adapter does
            not cover) are skipped with a warning, and a replaced adapter may keep layers the file does not cover.

    Returns:
        ``model``, with the adapter loaded (y = base(x) + scale * dropout(x) A^T B^T per adapted layer).

    Raises:
        FileNotFoundError: the directory or one of its two files is missing.
        ValueError: anything else that is wrong with the files or does not fit the model (the message says what).
    """
    check_adapter_name(adapter_name)
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    cfg = read_config(directory)
    pairs = _read_tensors(directory)
    plan = _plan(model, cfg, pairs, strict, directory, adapter_name)
    if adapter_name not in adapter_names(model):
        names = {name for name, _, _ in plan}
        grad_flags = [(p, p.requires_grad) for p in model.parameters()]
        had_adapters = bool(adapter_names(model))
        try:
            inject(
                model,
                lambda n, m: n in names,  # exact names (a list entry would also match longer names ending with it)
                r=cfg["r"],
                alpha=cfg["lora_alpha"],
                dropout=cfg["lora_dropout"],
                rslora=cfg["use_rslora"],
                adapter_name=adapter_name,
                rank_pattern={name: r for name, r, _ in plan},
                alpha_pattern={name: alpha for name, _, alpha in plan},
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
            adapter.lora_A.copy_(pairs[name]["lora_A"])  # copy_ converts dtype and device
            adapter.lora_B.copy_(pairs[name]["lora_B"])
    return model
