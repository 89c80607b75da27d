"""PEFT's ``adapter_config.json`` for LoRA: the fields lowrank writes, and how it reads and validates them.

Writing (``build_config``): ``r`` / ``lora_alpha`` are the most common values among the adapted layers; layers
that differ are listed under ``rank_pattern`` / ``alpha_pattern`` by full module name. PEFT resolves a pattern key
``k`` for module ``m`` with ``re.match(rf"(.*\\.)?({k})$", m)`` (``pattern_value``), and so do we when reading.

Reading (``read_config``): three kinds of fields. The ones lowrank uses (``_USED``, with PEFT's defaults for
missing or null ones); the ones accepted whatever their value (metadata, target selection, initialisation:
``_IGNORED``); and features that change the forward pass (``_UNSUPPORTED``), refused unless at their default.
Unknown fields are refused too unless "off" (null, false, empty), so a newer PEFT feature is never silently dropped.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path

from .adapter import LoRAAdapter

CONFIG_NAME = "adapter_config.json"

# Config fields lowrank reads: name -> PEFT's default (PEFT silently uses these when a field is missing, so we do too).
_USED = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
# Accepted whatever their value: metadata, target selection (targets come from the tensor names), weight
# initialisation (the file holds the trained weights) and switches that only act together with a rejected field.
_IGNORED = {
    "peft_type", "task_type", "auto_mapping", "base_model_name_or_path", "revision", "peft_version", "inference_mode",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out",
    "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "megatron_core", "qalora_group_size", "ensure_weight_tying",
}  # fmt: skip
# Features that change the forward pass or add tensors lowrank does not have: rejected unless at their default.
_UNSUPPORTED = {
    "bias": "none", "use_dora": False, "lora_bias": False, "modules_to_save": None, "layer_replication": None,
    "use_qalora": False, "target_parameters": None, "trainable_token_indices": None, "alora_invocation_tokens": None,
    "use_bdlora": None, "arrow_config": None, "kasa_config": None, "velora_config": None, "monteclora_config": None,
    "megatron_config": None,
}  # fmt: skip
_KNOWN = set(_USED) | _IGNORED | set(_UNSUPPORTED)


def _is_default(value, default) -> bool:
    # PEFT writes both null and empty containers for "off"; an unknown field that is off is harmless.
    return value == default or value in (None, False, [], {}, "")


def pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def build_config(
    layers: list[tuple[str, LoRAAdapter]], base_model_name_or_path: str | None, fan_in_fan_out: bool = False
) -> dict:
    """PEFT's config for one adapter: ``layers`` is [(qualified layer name, that layer's adapter)].

    ``fan_in_fan_out``: some adapted layer is a Conv1D (PEFT decides per layer anyway).
    """
    rslora = {bool(layer.rslora) for _, layer in layers}
    if len(rslora) > 1:
        raise ValueError("PEFT's config has one use_rslora flag, but some adapted layers use rsLoRA and others do not")
    r = Counter(layer.r for _, layer in layers).most_common(1)[0][0]
    alpha = Counter(float(layer.alpha) for _, layer in layers).most_common(1)[0][0]
    dropouts = Counter(float(layer.dropout_p) for _, layer in layers)
    if len(dropouts) > 1:
        warnings.warn(f"layers use different dropout {sorted(dropouts)}; PEFT stores one: writing the most common")
    rank_pattern = {name: int(layer.r) for name, layer in layers if layer.r != r}
    alpha_pattern = {name: _number(layer.alpha) for name, layer in layers if float(layer.alpha) != alpha}
    for name, layer in layers:  # the pattern keys are regexes to PEFT: make sure each resolves to its own layer
        if (
            pattern_value(rank_pattern, name, r) != layer.r
            or pattern_value(alpha_pattern, name, alpha) != layer.alpha
        ):
            raise ValueError(f"cannot express the rank/alpha of {name!r} with PEFT's rank_pattern/alpha_pattern")
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(r),
        "lora_alpha": _number(alpha),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": [name for name, _ in layers],
        "exclude_modules": None,
        "lora_dropout": dropouts.most_common(1)[0][0],
        "use_rslora": rslora.pop(),
        "fan_in_fan_out": bool(fan_in_fan_out),
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }


def read_config(directory: Path) -> dict:
    """adapter_config.json -> {r, lora_alpha, lora_dropout, use_rslora, rank_pattern, alpha_pattern}, validated."""
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in adapter directory {directory}")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(raw).__name__}")
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type is {raw.get('peft_type')!r}; lowrank loads only LoRA adapters ('LORA')")
    unsupported = {k: v for k, v in raw.items() if k in _UNSUPPORTED and not _is_default(v, _UNSUPPORTED[k])}
    unknown = {k: v for k, v in raw.items() if k not in _KNOWN and not _is_default(v, None)}
    if unsupported or unknown:
        raise ValueError(
            f"{file} uses features lowrank does not support: {unsupported | unknown} "
            f"(supported: plain LoRA with bias='none'; fields read: {sorted(_USED)})"
        )
    cfg = {k: raw.get(k, default) for k, default in _USED.items()}
    cfg = {k: (_USED[k] if v is None else v) for k, v in cfg.items()}  # PEFT writes null for "default"

    def positive_number(key, value, integer):
        ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
        if isinstance(value, bool) or not ok or value <= 0:
            kind = "a positive integer" if integer else "a positive number"
            raise ValueError(f"{file}: {key} must be {kind}, got {value!r}")

    positive_number("r", cfg["r"], True)
    positive_number("lora_alpha", cfg["lora_alpha"], False)
    p = cfg["lora_dropout"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"{file}: lora_dropout must be a number in [0, 1), got {p!r}")
    if not isinstance(cfg["use_rslora"], bool):
        raise ValueError(f"{file}: use_rslora must be true or false, got {cfg['use_rslora']!r}")
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        if not isinstance(cfg[key], dict):
            raise ValueError(f"{file}: {key} must be an object mapping module patterns to values")
        for pattern, value in cfg[key].items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{file}: {key} key {pattern!r} is not a valid regular expression: {e}") from None
            positive_number(f"{key}[{pattern!r}]", value, integer)
    return cfg
