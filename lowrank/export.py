"""Export a fine-tuned model for serving: a merged dense checkpoint transformers loads without lowrank
(`save_merged`), or the adapter alone as a llama.cpp LoRA GGUF (`save_gguf_adapter`, see ``lowrank/gguf_export.py``).

Folder layout written by `save_merged` (what ``transformers.AutoModelForCausalLM.from_pretrained`` reads):
``config.json`` (the model's own config, ``dtype`` set to the weights' dtype), ``generation_config.json`` when the
model has one, and ``model.safetensors``, or, above ``max_shard_size``, ``model-00001-of-0000N.safetensors`` ...
plus ``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {key: file}}``).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from ._progress import progress as _progress
from .adapters import lora_layers
from .base import follows_protocol
from .lora import LoRALayer

SAFE_NAME, INDEX_NAME, CONFIG_NAME = "model.safetensors", "model.safetensors.index.json", "config.json"
DEFAULT_SHARD = 2 * 1024**3  # bytes: below the 4 GiB some filesystems and hubs limit a file to


def _from_conv1d(module: nn.Module) -> bool:
    """A quantized base made from a HF Conv1D (``from_conv1d``): its dense export goes back to (in, out)."""
    return follows_protocol(module) and bool(getattr(module, "from_conv1d", False))


def merged_state_dict(model: nn.Module, *, progress: bool | None = None) -> dict[str, torch.Tensor]:
    """The merged model's full state dict on the CPU, under the original (un-adapted, un-quantized) key names.

    Adapted layers: ``<name>.weight = W0 + scale * B @ A`` (``layer.merged_weight()``; Conv1D back in its (in, out)
    layout) and ``<name>.bias``; NF4 layers without adapters: dequantized. NF4 weights come out in the layer's
    compute dtype (its original dtype when None), biases in the weight's dtype. Tensors sharing storage in the
    model (tied embeddings) share it here too. The model is not modified.
    """
    if isinstance(model, LoRALayer):
        raise ValueError("cannot export a bare LoRALinear: keys are named by the layer's place in a model")
    dense: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    layers = list(lora_layers(model))
    with torch.no_grad():
        # Each dense weight goes to the CPU as soon as it is built: a 4-bit model must not need its whole dense
        # size on the accelerator to be exported.
        for name, layer in _progress(layers, desc="merge", total=len(layers), enable=progress):
            weight = layer.merged_weight().cpu()  # (out, in)
            conv1d_layout = layer.fan_in_fan_out or _from_conv1d(layer.base)  # Conv1D stores (in, out)
            dense[name] = (weight.T if conv1d_layout else weight, layer.base.bias)
        wrapped = tuple(name + "." for name in dense)
        for name, module in model.named_modules():
            if follows_protocol(module) and not name.startswith(wrapped):  # NF4 (any quantized base) unadapted
                weight = module.dense_weight(module.dense_dtype).cpu()
                dense[name] = (weight.T if _from_conv1d(module) else weight, module.bias)
        prefixes = tuple(name + "." for name in dense)
        state, by_storage = {}, {}
        for key, t in model.state_dict().items():
            if key.startswith(prefixes):
                continue
            ptr = t.untyped_storage().data_ptr() if t.numel() else None
            if ptr is not None and ptr in by_storage and by_storage[ptr][1].shape == t.shape:
                state[key] = by_storage[ptr][1]  # tied: one CPU tensor under both keys
                continue
            state[key] = t.detach().cpu()
            by_storage[ptr] = (key, state[key])
        for name, (weight, bias) in dense.items():
            state[f"{name}.weight"] = weight.contiguous()
            if bias is not None:  # a dense layer keeps weight and bias in one dtype (NF4: the compute dtype)
                state[f"{name}.bias"] = bias.detach().to(weight.dtype).cpu()
    return state


def _parse_size(size) -> int:
    """``max_shard_size``: bytes as an int, or a string like "500MB" / "2GB" / "1GiB" (as transformers reads it)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if isinstance(size, str):
        units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
        text = size.strip().upper()
        for unit, factor in units.items():
            if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
                return int(float(text[: -len(unit)]) * factor)
    raise ValueError(f"max_shard_size must be a positive int (bytes) or a string like '2GB', got {size!r}")


def _shards(state: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Keys in order, split so that each shard holds at most ``limit`` bytes (a larger tensor gets its own)."""
    shards, current, size = [], [], 0
    for key, t in state.items():
        n = t.numel() * t.element_size()
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += n
    return shards + [current] if current else shards


def _check_dest(dest: Path, overwrite: bool, is_file: bool) -> None:
    if not dest.exists():
        return
    if is_file:
        if dest.is_dir():
            raise ValueError(f"{dest} is a directory; a path ending in .safetensors must name a file")
        if not overwrite:
            raise FileExistsError(f"{dest} exists; pass overwrite=True to replace it")
        return
    if not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a directory")
    if any(dest.iterdir()) and not overwrite:
        raise FileExistsError(f"{dest} exists and is not empty; pass overwrite=True to replace its contents")


def _config_json(model: nn.Module, dtype: torch.dtype) -> str:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(
            f"the folder form needs a transformers model (model.config); {type(model).__name__} has none. "
            "Pass a path ending in .safetensors for a single state-dict file"
        )
    d = config.to_dict()
    d.pop("quantization_config", None)  # the weights are dense now (a GGUF-loaded model may still name one)
    d["dtype"] = str(dtype).removeprefix("torch.")
    d.pop("torch_dtype", None)
    return json.dumps(d, indent=2, sort_keys=True) + "\n"


def _write_safetensors(state: dict[str, torch.Tensor], file: Path) -> None:
    from safetensors.torch import save_file

    # safetensors refuses tensors sharing storage within one file: clone the second of a tied pair.
    seen, out = set(), {}
    for key, t in state.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        out[key] = t.clone() if ptr in seen else t.contiguous()
        seen.add(ptr)
    save_file(out, str(file), metadata={"format": "pt"})


def save_merged(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = DEFAULT_SHARD,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Write the merged model (adapters folded in, NF4 dequantized) for serving without lowrank.

    A path ending in ``.safetensors``: one file with the full merged state dict (``merged_state_dict``), which
    ``model.load_state_dict`` of the original class reads. Any other path: a folder that
    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads (see the module docstring for the layout).
    The 4-bit rounding stays in the weights: the export reproduces the quantized model the adapter was trained on.
    Everything is written to a temporary sibling first and moved into place at the end, so a failure leaves
    ``path`` as it was. The model is not modified.

    Args:
        model: any model, with or without adapters and NF4 layers (the folder form needs ``model.config``).
        path: the ``.safetensors`` file or the folder to write.
        max_shard_size: bytes per shard (int, or a string like "500MB"); one tensor larger than it gets a shard.
        overwrite: replace an existing file, or the contents of an existing non-empty folder.
        progress: show a tqdm bar (None: when tqdm is installed and stderr is a terminal).

    Returns:
        The file or folder written.

    Raises:
        FileExistsError: ``path`` exists (a file, or a non-empty folder) and ``overwrite`` is False.
        ValueError: a bad ``max_shard_size``; the folder form for a model without ``config``; a bare LoRALinear.
    """
    if isinstance(model, LoRALayer):
        raise ValueError("cannot export a bare LoRALinear: keys are named by the layer's place in a model")
    dest = Path(path)
    is_file = dest.suffix == ".safetensors"
    limit = _parse_size(max_shard_size)
    _check_dest(dest, overwrite, is_file)
    if not is_file:
        _config_json(model, torch.float32)  # fail before the (long) merge when there is no config
    state = merged_state_dict(model, progress=progress)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if is_file:
            _write_safetensors(state, tmp)
            os.replace(tmp, dest)
            return dest
        tmp.mkdir()
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        dtype = max(set(floats), key=floats.count) if floats else torch.float32  # the weights' (majority) dtype
        (tmp / CONFIG_NAME).write_text(_config_json(model, dtype), encoding="utf-8")
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "to_json_string"):
            (tmp / "generation_config.json").write_text(generation.to_json_string(), encoding="utf-8")
        shards = _shards(state, limit)
        weight_map = {}
        for i, keys in enumerate(_progress(shards, desc="write shards", total=len(shards), enable=progress)):
            name = SAFE_NAME if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors({k: state[k] for k in keys}, tmp / name)
            weight_map.update(dict.fromkeys(keys, name))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if dest.exists():  # overwrite=True (checked above): swap the old folder out only now that all is written
            old = dest.with_name(tmp.name + ".old")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    return dest
