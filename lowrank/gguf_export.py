"""The adapter alone as a llama.cpp LoRA GGUF (what ``llama-cli -m base.gguf --lora adapter.gguf`` reads).

File contents, as llama.cpp's adapter loader expects them (learned from its ``convert_lora_to_gguf.py`` and
``llama-adapter.cpp``): ``general.architecture`` (the base's, e.g. "llama": llama.cpp refuses a mismatch),
``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32), and for every adapted
base tensor ``<gguf name>.lora_a`` = A (r, in) and ``<gguf name>.lora_b`` = B (out, r) as torch shapes (ggml
reverses them: ne = [in, r] and [r, out]). llama.cpp applies ``y += (alpha / r) * B A x`` with r read from
lora_a, so a per-layer scale that is not alpha / r (rsLoRA, mixed ranks) is folded into B.

Llama-family GGUFs store q_proj / k_proj with the rows of each head reordered for llama.cpp's interleaved RoPE
(transformers undoes it when it loads a GGUF); the update's rows must be reordered the same way, which touches
only B. Supported architectures are listed in ``ARCHITECTURES``; others are refused by name.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch
from torch import nn

from .adapters import lora_layers
from .lora import LoRALayer

# HF config.model_type -> (GGUF architecture, whether q/k rows are RoPE-permuted as convert_hf_to_gguf does).
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


def rope_permutation(out_features: int, n_head: int) -> torch.Tensor:
    """Row order of a q/k projection in a llama GGUF: within each of ``n_head`` heads of size d, row
    ``h*d + 2i + j`` (j in {0, 1}) is HF row ``h*d + j*d/2 + i`` (HF pairs i with i + d/2, llama.cpp 2i with 2i+1).
    Returns the index ``p`` with ``W_gguf = W_hf[p]``."""
    d = out_features // n_head
    rows = torch.arange(out_features).view(n_head, 2, d // 2)  # [head, half j, i]
    return rows.transpose(1, 2).reshape(-1)  # [head, i, j]


def _single_adapter(name: str, layer: LoRALayer):
    """(A (r, in), B (out, r), scale) of the layer's one active plain-LoRA adapter, else ValueError."""
    if getattr(layer, "mixed", None) is not None:
        raise ValueError(f"{name}: a lowrank.mixed_batch is active; leave it before exporting")
    active = layer.active_adapters() if hasattr(layer, "active_adapters") else ["default"]
    if len(active) != 1:
        raise ValueError(f"{name}: exactly one active adapter can be exported, this layer has {active or 'none'}")
    adapter = layer.adapters[active[0]] if hasattr(layer, "adapters") else layer
    if type(adapter).__name__ not in ("LoRAAdapter", "LoRALinear"):  # DoRA etc.: y is not x + s B A x
        raise ValueError(f"{name}: a {type(adapter).__name__} adapter is not a plain LoRA (llama.cpp's lora type)")
    if getattr(layer, "fan_in_fan_out", False):
        raise ValueError(f"{name}: Conv1D bases (GPT-2 layout) are not exported to GGUF")
    return adapter.lora_A.detach(), adapter.lora_B.detach(), float(adapter.scale)


def _plan(model: nn.Module) -> tuple[str, list[tuple[str, torch.Tensor, torch.Tensor]], float]:
    """Validate and build everything: (GGUF architecture, [(tensor base name, A, B)], alpha)."""
    import gguf

    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to export (call lowrank.inject first)")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"GGUF adapter export does not know the architecture {model_type!r} "
            f"({type(model).__name__}); supported: {sorted(ARCHITECTURES)}"
        )
    arch_name, permuted = ARCHITECTURES[model_type]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    adapters = [(name, *_single_adapter(name, layer)) for name, layer in layers]
    first_name, a0, _, s0 = adapters[0]
    alpha = s0 * a0.shape[0]  # llama.cpp's scale is alpha / r: one alpha for the file
    tensors, unknown = [], []
    for name, a, b, scale in adapters:
        gguf_name = names.get_name(name)
        if gguf_name is None:
            unknown.append(name)
            continue
        b = b.to(torch.float32)
        if permuted and name.endswith(("q_proj", "k_proj")):
            heads = n_head if name.endswith("q_proj") else n_kv
            b = b[rope_permutation(b.shape[0], heads)]
        fold = scale * a.shape[0] / alpha  # 1 for plain LoRA with one r and alpha everywhere
        if fold != 1.0:
            b = b * fold
        tensors.append((gguf_name + ".weight", a.to(torch.float32), b))
    if unknown:
        raise ValueError(f"no {arch_name} GGUF tensor name for the adapted modules {unknown[:4]}")
    return arch_name, tensors, alpha


def save_gguf_adapter(
    model: nn.Module, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, overwrite: bool = False
) -> Path:
    """Write the model's adapters as a llama.cpp LoRA adapter GGUF (``--lora path``), with the ``gguf`` package.

    ``y = W x + (alpha / r) * B A x`` per adapted tensor, alpha stored once (``adapter.lora.alpha``), A and B
    under ``<tensor>.lora_a`` / ``.lora_b`` (e.g. ``blk.0.attn_q.weight.lora_a``). The model is not modified;
    the file is written to a temporary sibling and renamed into place.

    Args:
        model: a transformers model of a supported architecture (``ARCHITECTURES``) with one active adapter per
            adapted layer (bases may be dense or NF4: the adapter does not depend on them).
        path: the ``.gguf`` file. dtype: torch.float32 or torch.float16 for A and B.
        overwrite: replace an existing file.

    Returns:
        The file written.

    Raises:
        ValueError: no adapters; an architecture or module GGUF has no name for; several active adapters, a mixed
            batch, a non-LoRA adapter; a bad dtype. FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    import gguf
    import numpy as np

    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
    dest = Path(path)
    if dest.exists() and (dest.is_dir() or not overwrite):
        raise FileExistsError(f"{dest} exists; pass overwrite=True to replace the file")
    arch_name, tensors, alpha = _plan(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        writer = gguf.GGUFWriter(str(tmp), arch_name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        np_dtype = np.float32 if dtype == torch.float32 else np.float16
        for name, a, b in tensors:
            writer.add_tensor(name + ".lora_a", a.cpu().numpy().astype(np_dtype))
            writer.add_tensor(name + ".lora_b", b.cpu().numpy().astype(np_dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest
