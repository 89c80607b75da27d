"""What PiSSA and LoftQ adapters apply to, and how to share them.

* PiSSA trains on the residual base ``W - s B0 A0``. `save_pissa_as_lora` writes an ordinary LoRA adapter for
  the unmodified base W (rank 2r: ``A' = [A; A0]``, ``B' = [B, -B0]``, alpha doubled so the scale is kept; PEFT's
  ``path_initial_model_for_weight_conversion``), loadable by ``lowrank.load_adapter`` and PEFT on the original
  model.
* LoftQ trains on the NF4 base Q it computed. No low-rank adapter can move W's NF4 error (full rank) onto W, so a
  LoftQ adapter needs Q: re-running ``inject(..., init="loftq")`` with the same r / alpha on the same float weights
  rebuilds Q byte for byte (the init is deterministic), after which ``load_adapter`` replaces A and B. Or ship
  the quantized model itself (its NF4 state dict). `loftq_report` gives the per-layer errors.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from torch import nn

from .adapter import LoRAAdapter
from .adapters import lora_layers
from .init_svd import pissa_as_lora


def loftq_report(model: nn.Module) -> list[dict]:
    """Per LoftQ-initialised layer: ``{"layer", "adapter", "error", "error_nf4", "ratio"}`` with
    ``error = ||W - deq(Q) - s B0 A0||_F`` and ``error_nf4 = ||W - deq(nf4(W))||_F`` at init (ratio < 1: LoftQ
    approximates W better than NF4 alone)."""
    rows = []
    for name, layer in lora_layers(model):
        rec = layer.__dict__.get("_svd_init")
        if rec is not None and rec["kind"] == "loftq":
            ratio = rec["error"] / rec["error_nf4"] if rec["error_nf4"] > 0 else 0.0
            rows.append({"layer": name, "adapter": rec["adapter"], "error": rec["error"],
                         "error_nf4": rec["error_nf4"], "ratio": ratio})  # fmt: skip
    return rows


def save_pissa_as_lora(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write PiSSA adapter ``adapter_name`` as a LoRA adapter (PEFT's files) for the original, unmodified base.

    ``W_res + s B A = W + s B' A'`` with ``A' = [A; A0]`` (2r, in), ``B' = [B, -B0]`` (out, 2r), r' = 2r and
    alpha' = 2 alpha (rsLoRA: sqrt(2) alpha), so ``s' = s``. The layers of the adapter must all carry PiSSA.

    Raises:
        ValueError: the adapter does not exist, is not (only) PiSSA-initialised, or is a DoRA adapter (its norm
            depends on the base, so the rewrite would not be exact).
    """
    from safetensors.torch import save_file

    from .peft_config import build_config

    layers = [(n, layer) for n, layer in lora_layers(model) if adapter_name in layer.adapters]
    if not layers:
        raise ValueError(f"no adapter named {adapter_name!r} in {type(model).__name__}")
    entries, tensors, plain = [], {}, []
    for name, layer in layers:
        adapter = layer.adapters[adapter_name]
        if type(adapter) is not LoRAAdapter:
            raise ValueError(f"{name}: {type(adapter).__name__} cannot be rewritten for the original base (PiSSA "
                             "conversion is exact for plain LoRA adapters only)")  # fmt: skip
        pair = pissa_as_lora(layer, adapter_name)
        if pair is None:
            plain.append(name)
            continue
        alpha = adapter.alpha * (math.sqrt(2) if adapter.rslora else 2)
        twin = LoRAAdapter(
            adapter.in_features,
            adapter.out_features,
            2 * adapter.r,
            alpha,
            adapter.dropout_p,
            adapter.rslora,
            device="meta",
        )  # fmt: skip  (only its hyper-parameters are read)
        entries.append((name, twin))
        tensors[f"base_model.model.{name}.lora_A.weight"] = pair[0].detach().to("cpu").contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = pair[1].detach().to("cpu").contiguous()
    if plain:
        raise ValueError(f"adapter {adapter_name!r} was not initialised with PiSSA on {plain[:8]}: nothing to convert")
    config = build_config(entries, getattr(model, "name_or_path", None) or None,
                          any(layer.fan_in_fan_out for _, layer in layers))  # fmt: skip
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory
