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
from .io import merged_state_dict
from .io import save_merged as _save_merged_file
from .lora import LoRALayer

SAFE_NAME, INDEX_NAME, CONFIG_NAME = "model.safetensors", "model.safetensors.index.json", "config.json"
DEFAULT_SHARD = 2 * 1024**3  # bytes: below the 4 GiB some filesystems and hubs limit a file to


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


def _check_dest(dest: Path, overwrite: bool) -> None:
    if not dest.exists():
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
        overwrite: replace the contents of an existing non-empty folder (a ``.safetensors`` file is always
            replaced, atomically, as ``lowrank.io.save_merged`` does).
        progress: show a tqdm bar (None: when tqdm is installed and stderr is a terminal).

    Returns:
        The file or folder written.

    Raises:
        FileExistsError: the folder ``path`` exists, is not empty, and ``overwrite`` is False.
        ValueError: a bad ``max_shard_size``; the folder form for a model without ``config``; a bare LoRALinear.
    """
    if isinstance(model, LoRALayer):
        raise ValueError("cannot export a bare LoRALinear: keys are named by the layer's place in a model")
    dest = Path(path)
    is_file = dest.suffix == ".safetensors"
    limit = _parse_size(max_shard_size)
    if is_file:  # the single state-dict file, replaced atomically (lowrank.io.save_merged)
        if dest.is_dir():
            raise ValueError(f"{dest} is a directory; a path ending in .safetensors must name a file")
        return _save_merged_file(model, dest)
    _check_dest(dest, overwrite)
    _config_json(model, torch.float32)  # fail before the (long) merge when there is no config
    state = merged_state_dict(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
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
