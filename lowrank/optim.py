"""Optimizer parameter groups for adapters, with LoRA+ (arXiv 2402.12354): B learns ``ratio`` times faster than A.

    optimizer = torch.optim.AdamW(lowrank.param_groups(model, 2e-4, loraplus_ratio=16))
    trainer = transformers.Trainer(model, args, ..., optimizers=(optimizer, None))   # None: the default schedule

Grouping follows PEFT's ``create_loraplus_optimizer``: A at ``lr``; B and DoRA's magnitude vector (PEFT puts every
1-D trainable tensor with B) at ``lr * ratio``. Other trainable parameters (a head or norm the user unfroze) stay at
``lr`` (PEFT would raise 1-D ones to ``lr * ratio``: LoRA+ argues about B, not about them), without weight decay when
1-D (biases, norms), as HF Trainer does.
"""

from __future__ import annotations

import math

from torch import nn

from .adapter import LoRAAdapter


def _check_positive(value, what: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{what} must be a finite number {bound}, got {value!r}")
    return float(value)


def param_groups(
    model: nn.Module, lr: float, *, loraplus_ratio: float | None = None, weight_decay: float = 0.0
) -> list[dict]:
    """The trainable parameters of ``model`` as optimizer parameter groups (LoRA+ when ``loraplus_ratio`` is set).

    Groups (empty ones left out), each a dict with ``params``, ``lr``, ``weight_decay`` and a ``name``:
    ``"lora_A"`` (lr), ``"lora_B"`` (lr * ratio), ``"lora_magnitude"`` (DoRA's m: lr * ratio, as PEFT),
    ``"other"`` (other trainable tensors with 2+ dims: lr) and ``"other_no_decay"`` (other 1-D ones: lr, no decay).
    Adapters are found by type (`LoRAAdapter` and its subclasses), every adapter of every layer, active or not;
    frozen parameters are left out.

    Args:
        model: a model with adapters (``lowrank.inject``), or any module.
        lr: the base learning rate (A's), > 0.
        loraplus_ratio: B's learning rate over A's (LoRA+; the paper uses 2-16, PEFT's docs 16); None: 1.
        weight_decay: for every group but ``other_no_decay``, >= 0.

    Returns:
        A list for ``torch.optim.<Optimizer>(groups)``; the extra ``name`` key is kept by torch optimizers.

    Raises:
        ValueError: lr or ratio not > 0, weight decay < 0, or nothing trainable.
    """
    lr = _check_positive(lr, "lr")
    ratio = 1.0 if loraplus_ratio is None else _check_positive(loraplus_ratio, "loraplus_ratio")
    weight_decay = _check_positive(weight_decay, "weight_decay", allow_zero=True)
    groups: dict[str, list[nn.Parameter]] = {k: [] for k in ("lora_A", "lora_B", "lora_magnitude", "other")}
    groups["other_no_decay"] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoRAAdapter):
            for pname, p in module.named_parameters(recurse=False):
                kind = pname if pname in ("lora_A", "lora_B") else "lora_magnitude"
                if p.requires_grad and id(p) not in seen:
                    groups[kind].append(p)
                seen.add(id(p))
    for p in model.parameters():  # deduplicated by nn.Module (a tied weight appears once)
        if p.requires_grad and id(p) not in seen:
            groups["other" if p.dim() > 1 else "other_no_decay"].append(p)
    lrs = {"lora_A": lr, "lora_B": lr * ratio, "lora_magnitude": lr * ratio, "other": lr, "other_no_decay": lr}
    out = [
        {"name": k, "params": ps, "lr": lrs[k], "weight_decay": 0.0 if k == "other_no_decay" else weight_decay}
        for k, ps in groups.items()
        if ps
    ]
    if not out:
        raise ValueError("param_groups: the model has no trainable parameters (inject adapters first)")
    return out
