"""Quantize while loading: fill a model built on the meta device from safetensors files, one tensor at a time,
with the targeted linear weights going straight to NF4, so the full-precision model never exists.

    with torch.device("meta"):
        model = MyModel(config)                   # no memory: every tensor is a shape and a dtype
    lowrank.load_quantized(model, "ckpt_dir/", device="cuda", compute_dtype=torch.bfloat16)
    model = lowrank.from_pretrained("hf_folder/", device="cuda")      # the same for a local HF folder

Order of work: read every file's header (names, shapes, dtypes: no tensor data) and check it against the model
(missing, unexpected, mismatched, tied); then read each tensor memory-mapped, convert it (NF4 for a targeted
linear weight, a copy on ``device`` in the target dtype otherwise) and drop the mapping; then, only when every
tensor converted, put the results into the model. An error at any step leaves the model as it was (on meta).

Memory: the file is reopened per tensor because safetensors' tensors are views of the mapping, whose pages count
in the process's resident set until it is unmapped (one handle for a 256 MiB file left 256 MiB of file pages
resident; reopening, 16 MiB = one tensor). Peak: the final model plus one tensor and its quantizer temporaries.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from . import nf4 as _nf4
from ._match import find_targets
from .base import is_conv1d, is_linear
from .lora import LoRALayer
from .nf4_linear import NF4Linear, _check_compute_dtype

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # fmt: skip
_PROGRESS_BYTES = 256 * 2**20  # show a progress bar (tqdm, when installed) for checkpoints at least this big
_TRIM_BYTES = 4 * 2**20  # hand freed heap back to the OS after about this many checkpoint bytes (see below)
_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class _Entry:
    """One tensor of a checkpoint, known from its file's header."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class _Slot:
    """One tensor of the model: ``owner.<attr>`` reached as ``name``; several slots share a tensor when tied."""

    name: str
    owner: nn.Module
    attr: str
    is_param: bool
    persistent: bool
    tensor: torch.Tensor


def checkpoint_files(checkpoint) -> list[Path]:
    """The safetensors files of ``checkpoint``: a file, a folder (``model.safetensors.index.json`` shards, else
    ``model.safetensors``) or a list of files. Raises FileNotFoundError / ValueError naming the path."""
    if isinstance(checkpoint, (list, tuple)):
        files = [Path(f) for f in checkpoint]
        if not files:
            raise ValueError("checkpoint is an empty list of files")
    else:
        path = Path(checkpoint)
        if path.is_dir():
            if (path / _INDEX).exists():
                weight_map = json.loads((path / _INDEX).read_text()).get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise ValueError(f"{path / _INDEX} has no 'weight_map'")
                files = [path / f for f in dict.fromkeys(weight_map.values())]
            elif (path / "model.safetensors").exists():
                files = [path / "model.safetensors"]
            else:
                raise FileNotFoundError(f"{path} holds neither {_INDEX} nor model.safetensors")
        else:
            files = [path]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {f}")
        if f.suffix != ".safetensors":
            raise ValueError(f"{f} is not a .safetensors file")
    return files


def _read_headers(files: list[Path]) -> dict[str, _Entry]:
    """Every tensor's name, shape and dtype (headers only; no tensor data is read)."""
    from safetensors import safe_open

    entries: dict[str, _Entry] = {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor_slice = f.get_slice(name)
                st_dtype = tensor_slice.get_dtype()
                if st_dtype not in _ST_DTYPES:
                    raise ValueError(f"{name} in {file} has dtype {st_dtype}, which lowrank cannot load")
                if name in entries:
                    raise ValueError(f"{name} is in both {entries[name].file} and {file}")
                entries[name] = _Entry(name, file, tuple(tensor_slice.get_shape()), _ST_DTYPES[st_dtype])
    return entries


def _slots(model: nn.Module) -> dict[str, _Slot]:
    """Every parameter and buffer of ``model`` under every name it is reachable by (tied ones under each)."""
    slots = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for attr, t in module._parameters.items():
            if t is not None:
                slots[dot + attr] = _Slot(dot + attr, module, attr, True, True, t)
        for attr, t in module._buffers.items():
            if t is not None:
                persistent = attr not in module._non_persistent_buffers_set
                slots[dot + attr] = _Slot(dot + attr, module, attr, False, persistent, t)
    return slots


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _init_owner(model: nn.Module, name: str):
    """The ``_init_weights`` of the innermost module above ``name`` that has one (Hugging Face models), or None."""
    parts = name.split(".")[:-1]
    for depth in range(len(parts), -1, -1):
        module = model.get_submodule(".".join(parts[:depth]))
        if callable(getattr(module, "_init_weights", None)):
            return module._init_weights
    return None


def _targets(model, targets, exclude) -> dict[str, nn.Module]:
    """The linear layers to quantize (the checks of ``lowrank.quantize``, before anything is read)."""
    if targets is None:
        return {}
    todo = {}
    for name, module in find_targets(model, targets, exclude):
        if isinstance(module, LoRALayer):
            raise ValueError(f"{name} is a LoRA layer: load the base model first, then lowrank.inject")
        if isinstance(module, NF4Linear):
            raise ValueError(f"{name} is already an NF4Linear: load_quantized expects a plain (meta) model")
        if not (isinstance(module, nn.Linear) or is_conv1d(module)) or not is_linear(module):
            raise ValueError(f"{name} is a {type(module).__name__}, not an nn.Linear or Conv1D: it cannot be quantized")
        todo[name] = module
    return todo


def _plan(model, entries: dict[str, _Entry], slots: dict[str, _Slot], files: list[Path]):
    """Match the checkpoint's headers to the model's tensors and check them; reads no tensor data.

    Returns ``(groups, plan, duplicates, recompute, move)``: slots by shared tensor, ``(entry, group)`` to load,
    tied copies stored twice ``(first, other, group key)``, buffer slots to recompute (on meta, no checkpoint
    entry) and non-persistent buffer groups that already hold values (moved to the device).
    """
    # Tensors shared by several slots (tied weights) form one group, loaded once and put back under every name.
    groups: dict[int, list[_Slot]] = {}
    for slot in slots.values():
        groups.setdefault(id(slot.tensor), []).append(slot)
    plan: list[tuple[_Entry, list[_Slot]]] = []  # the checkpoint tensor each persistent group loads from
    checks: list[tuple[_Entry, list[_Slot]]] = []  # every checkpoint tensor with the group it fills
    duplicates: list[tuple[_Entry, _Entry, int]] = []  # a tied group stored under two names: the copies must agree
    missing, recompute, move = [], [], []
    for key, group in groups.items():
        if not any(s.persistent for s in group):  # computed by the model, never in a checkpoint
            (recompute if group[0].tensor.device.type == "meta" else move).append(group)
            continue
        found = [entries[s.name] for s in group if s.name in entries]
        if not found:
            missing += [s.name for s in group]
            continue
        plan.append((found[0], group))
        checks += [(e, group) for e in found]
        duplicates += [(found[0], other, key) for other in found[1:]]
    if missing:
        hint = ""
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            hint = " (config.tie_word_embeddings is set: is the model's head tied? model.tie_weights() on meta)"
        raise ValueError(f"{len(missing)} tensor(s) of the model are not in {_listing(map(str, files), 3)}: "
                         f"{_listing(missing)}{hint}")  # fmt: skip
    unexpected = [e for name, e in entries.items() if name not in slots or not slots[name].persistent]
    if unexpected:
        raise ValueError(f"{len(unexpected)} checkpoint tensor(s) are not in the model: "
                         f"{_listing(f'{e.name} ({e.file})' for e in unexpected)}")  # fmt: skip
    for entry, group in checks:
        meta = group[0].tensor
        if entry.shape != tuple(meta.shape):
            raise ValueError(f"{entry.name} in {entry.file} has shape {entry.shape}, the model expects "
                             f"{tuple(meta.shape)}")  # fmt: skip
        if entry.dtype.is_floating_point != meta.dtype.is_floating_point:
            raise ValueError(f"{entry.name} in {entry.file} is {entry.dtype}, the model's tensor is {meta.dtype}")
    recompute = [s for group in recompute for s in group]
    without_init = [s.name for s in recompute if _init_owner(model, s.name) is None]
    if without_init:
        raise ValueError(
            f"buffer(s) {_listing(without_init)} are on the meta device and not in the checkpoint, and "
            "no _init_weights can recompute them: create them on a real device after building the model"
        )
    return groups, plan, duplicates, recompute, move


def _load(model, checkpoint, *, device, dtype, compute_dtype, targets, exclude, block_size, double_quant):
    """load_quantized's work; ``targets=None`` loads every tensor dense (``from_pretrained(quantize=False)``)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    _check_compute_dtype(compute_dtype)
    _nf4.check_block_size(block_size)
    device = torch.device(device if device is not None else "cpu")
    files = checkpoint_files(checkpoint)
    entries = _read_headers(files)
    quantized = _targets(model, targets, exclude)
    slots = _slots(model)

    groups, plan, duplicates, recompute, move = _plan(model, entries, slots, files)
    weight_of: dict[int, list[str]] = {}  # a weight shared by several targeted layers quantizes once for each
    for name, module in quantized.items():
        weight_of.setdefault(id(module.weight), []).append(name)
    quantized_ids = {id(module) for module in quantized.values()}

    def target_dtype(entry: _Entry, meta: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and entry.dtype.is_floating_point else meta.dtype

    # Read and convert, one tensor at a time; nothing is put into the model yet.
    dense: dict[int, torch.Tensor] = {}  # id(meta tensor) -> its new tensor
    nf4: dict[str, _nf4.NF4Tensor] = {}  # quantized module name -> its NF4 weight
    # Largest first: the biggest tensor's copy and mapped pages then coexist with an almost empty model, so the
    # peak is about max(2 x largest, final model + one layer's quantizer temporaries), not their sum.
    plan.sort(key=lambda item: -item[0].nbytes)
    since_trim = 0
    for entry, group in _progress(plan, sum(e.nbytes for e, _ in plan)):
        meta = group[0].tensor
        since_trim += entry.nbytes
        if since_trim >= _TRIM_BYTES:
            _release_freed_heap()
            since_trim = 0
        with _open(entry) as f:
            loaded = f.get_tensor(entry.name)  # a view of the mapping: converted before the file closes
            wanted = target_dtype(entry, meta)
            for name in weight_of.get(id(meta), []):
                weight = loaded.to(device, wanted)
                weight = weight.t() if is_conv1d(quantized[name]) else weight
                try:
                    nf4[name] = _nf4.quantize(weight, block_size, double_quant)
                except ValueError as e:
                    raise ValueError(f"{entry.name} in {entry.file}: {e}") from None
            if any(not (s.is_param and s.attr == "weight" and id(s.owner) in quantized_ids) for s in group):
                value = loaded.to(device, wanted, copy=True)  # a copy: `loaded` dies with the mapping
                if group[0].is_param and value.is_floating_point() and value.numel() and not _finite(value):
                    bad = int((~value.isfinite()).sum())
                    raise ValueError(f"{entry.name} in {entry.file} holds {bad} NaN/inf value(s)")
                dense[id(meta)] = value
    for first, other, key in duplicates:
        with _open(other) as f:
            copy = f.get_tensor(other.name).to(device, target_dtype(other, groups[key][0].tensor))
            if key in dense and not torch.equal(copy, dense[key]):
                raise ValueError(f"{other.name} ({other.file}) is tied to {first.name} ({first.file}) in the model, "
                                 "but the checkpoint holds different values for them")  # fmt: skip

    # Everything converted: now change the model.
    _install(model, groups.values(), move, dense, quantized, nf4, compute_dtype, device)
    _recompute_buffers(model, recompute, device)
    return model


def _install(model, groups, move, dense, quantized, nf4, compute_dtype, device) -> None:
    """Put the converted tensors into ``model``: one new Parameter per tied group (under each of its names),
    buffers, and an ``NF4Linear`` in every place a targeted layer is reachable from."""
    biases = {name: None if m.bias is None else dense[id(m.bias)] for name, m in quantized.items()}
    for group in move:
        dense[id(group[0].tensor)] = group[0].tensor.to(device)
    for group in groups:
        meta = group[0].tensor
        if id(meta) not in dense:
            continue
        value = (
            nn.Parameter(dense[id(meta)], requires_grad=meta.requires_grad) if group[0].is_param else dense[id(meta)]
        )
        for s in group:
            (s.owner._parameters if s.is_param else s.owner._buffers)[s.attr] = value
    parents: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():
            parents.setdefault(id(child), []).append((parent, child_name))
    for name, module in quantized.items():
        new = NF4Linear.from_nf4(nf4[name], biases[name], compute_dtype, from_conv1d=is_conv1d(module))
        new.train(module.training)
        for parent, child_name in parents[id(module)]:
            setattr(parent, child_name, new)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; elsewhere there is nothing to call
    except (OSError, AttributeError):
        return None


def _release_freed_heap() -> None:
    """Give freed heap pages back to the OS. glibc keeps the quantizer's freed temporaries, scattered between the
    NF4 tensors that stay: loading SmolLM2-135M on CPU peaked at 166 MiB above baseline for a 106 MiB model
    without trimming, 139 MiB trimming every 16 MiB read, 117-129 MiB every 4 MiB, 116 MiB after every tensor
    (272 calls: 0.9 s on a loaded 2-core machine)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _finite(t: torch.Tensor) -> bool:
    # min and max are NaN/inf exactly when some element is: one pass and no temporary (|x| would be a full copy:
    # 54 MiB more at the peak for SmolLM2's embedding).
    low, high = torch.aminmax(t)
    return bool(low.isfinite() & high.isfinite())


def _open(entry: _Entry):
    from safetensors import safe_open

    return safe_open(entry.file, framework="pt", device="cpu")


def _progress(items, total_bytes: int):
    if total_bytes < _PROGRESS_BYTES:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="load_quantized", unit="tensor", dynamic_ncols=True)


def _recompute_buffers(model: nn.Module, slots: list[_Slot], device: torch.device) -> None:
    """Buffers that no checkpoint holds (RoPE's inv_freq): recomputed by the model's own ``_init_weights``, as
    transformers' from_pretrained does, with every other tensor of the owner marked initialised so it is kept."""
    if not slots:
        return
    try:  # transformers' init functions skip tensors marked _is_hf_initialized; torch's only under this guard
        from transformers import initialization as hf_init

        guard = hf_init.guard_torch_init_functions
    except ImportError:
        guard = contextlib.nullcontext
    for s in slots:  # NaN first: a buffer that _init_weights does not write is caught below, not left random
        fill = float("nan") if s.tensor.is_floating_point() else 0
        s.owner._buffers[s.attr] = torch.full_like(s.tensor, fill, device=device)
    owners = {id(s.owner): s for s in slots}
    for s in owners.values():
        keep = [t for t in [*s.owner._parameters.values(), *s.owner._buffers.values()] if t is not None]
        keep = [t for t in keep if all(t is not r.owner._buffers[r.attr] for r in slots if r.owner is s.owner)]
        for t in keep:
            t._is_hf_initialized = True
        try:
            with torch.no_grad(), guard():
                _init_owner(model, s.name)(s.owner)
        finally:
            for t in keep:
                del t._is_hf_initialized
    unset = [s.name for s in slots if s.tensor.is_floating_point() and bool(s.owner._buffers[s.attr].isnan().any())]
    if unset:
        raise RuntimeError(f"the model's _init_weights did not recompute buffer(s) {_listing(unset)}")


def load_quantized(
    model: nn.Module,
    checkpoint,
    *,
    device=None,
    compute_dtype: torch.dtype | None = None,
    targets="all-linear",
    exclude=None,
    block_size: int = 64,
    double_quant: bool = True,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load ``checkpoint`` into ``model`` (built on the meta device), quantizing the targeted linear layers to NF4
    as each weight is read: the result equals loading the weights, then ``lowrank.quantize(model, ...)``.

    Args:
        model: the model, built under ``with torch.device("meta")`` (real tensors are replaced too).
        checkpoint: a .safetensors file, a folder (``model.safetensors.index.json`` shards, or
            ``model.safetensors``), or a list of files.
        device: where the model's tensors go (default CPU); weights are quantized there.
        compute_dtype: the NF4 layers' matmul dtype (None: the input's dtype).
        targets, exclude: which linear layers become ``NF4Linear``, as in ``lowrank.quantize`` (the output head
            only when named).
        block_size, double_quant: the NF4 format (see ``lowrank.quantize``).
        dtype: dtype of every floating tensor, the quantized weights' original dtype included (None: the dtype
            each tensor has in ``model``).

    Returns:
        ``model``, with tied tensors still tied and buffers the checkpoint lacks (RoPE's ``inv_freq``)
        recomputed by the model's ``_init_weights`` (Hugging Face models).

    Raises:
        FileNotFoundError: a checkpoint file is missing.
        ValueError: missing or unexpected tensors, shape or kind (float/int) mismatches, NaN/inf in a weight, a
            tied tensor stored twice with different values, bad targets; each message names the tensor and its
            file. The headers are checked before any data is read, and the model is changed only after every
            tensor converted, so on error it is left as it was.
        TypeError: a bad ``dtype``, ``compute_dtype`` or ``block_size``.
    """
    return _load(model, checkpoint, device=device, dtype=dtype, compute_dtype=compute_dtype, targets=targets,
                 exclude=exclude, block_size=block_size, double_quant=double_quant)  # fmt: skip


def from_pretrained(
    path,
    *,
    quantize: bool = True,
    device=None,
    compute_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
    targets="all-linear",
    exclude=None,
    block_size: int = 64,
    double_quant: bool = True,
    model_class=None,
) -> nn.Module:
    """A Hugging Face model from a local folder (config.json + safetensors), quantized while loading; never downloads.

    Equal, tensor for tensor, to ``transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)`` followed
    by ``lowrank.quantize(model, ...)``, without the full-precision model ever in memory. Tokenizers are left to
    the caller (``AutoTokenizer.from_pretrained(path)``).

    Args:
        path: the folder. quantize: False loads every tensor dense (no NF4).
        device, compute_dtype, targets, exclude, block_size, double_quant: as in ``load_quantized``.
        dtype: the model's dtype (None: config.json's ``dtype`` / ``torch_dtype``, else float32: transformers'
            ``dtype="auto"``).
        model_class: the transformers class to build (default ``AutoModelForCausalLM``).

    Returns:
        The model, in eval mode, with its generation_config.json when the folder has one.
    """
    import transformers

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a local model folder with a config.json (from_pretrained never downloads)"
        )
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    files = checkpoint_files(path)  # before building: a folder without weights fails fast
    with torch.device("meta"):
        model = (model_class or transformers.AutoModelForCausalLM).from_config(config, dtype=dtype)
    _load(model, files, device=device, dtype=None, compute_dtype=compute_dtype,
          targets=targets if quantize else None, exclude=exclude, block_size=block_size,
          double_quant=double_quant)  # fmt: skip
    if (path / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config = transformers.GenerationConfig.from_pretrained(path, local_files_only=True)
    config._name_or_path = str(path)
    return model.eval()
