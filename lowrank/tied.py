"""Tied weights (``tie_word_embeddings=True``: the output head's weight *is* the embedding table) and LoRA.

The rule, the same as PEFT 0.21's default forward (``ensure_weight_tying=False``):

* every adapted module sees its own update only. Adapting ``embed_tokens`` changes the lookup; the head keeps
  computing with the base table. Adapting ``lm_head`` changes the logits; the lookup keeps the base table.
  Adapting both gives two independent adapters. PEFT files therefore give the same logits in lowrank.
* merging (`lowrank.merge`, ``save_merged``) would have to write ``W + delta`` into the one shared matrix, which
  changes the other module too (PEFT does this silently: on a tied tiny Llama its ``merge_adapter()`` moved the
  logits by up to 208, see docs/moe_and_embeddings.md), or give the adapted module its own copy, which unties
  them (round 1 did that for a tied GPT-2 head). Neither is what the unmerged model computes as a tied model, so
  lowrank refuses, before changing anything, and names the modules that share the weight.
* `lowrank.eject` never replaces a Parameter: the head and the embedding are still the same tensor afterwards.
"""

from __future__ import annotations

from torch import nn

from .adapters import lora_layers


def _holders(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every ``module.attr`` name that holds it (tied weights have several)."""
    out: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            out.setdefault(id(p), []).append(f"{name}.{attr}" if name else attr)
    return out


def merge_targets(layer) -> list[str]:
    """Attribute names of ``layer.base`` that merging would replace (none for a quantized base or no adapter)."""
    if layer.merged or not layer.active_adapters() or getattr(layer.view, "quantized", False):
        return []
    params = getattr(layer, "merged_params", None)
    if params is not None:  # LoRAExperts: one entry per adapted 3-D weight
        return sorted({p for n in layer.active_adapters() for p in layer.adapters[n].params})
    return ["weight"]


def check_merge_keeps_ties(model: nn.Module) -> None:
    """Raise ValueError if merging would write into a weight another module also holds (see the module doc)."""
    holders = _holders(model)
    for name, layer in lora_layers(model):
        base_names = {f"{name}.base.{attr}" if name else f"base.{attr}" for attr in merge_targets(layer)}
        for attr in merge_targets(layer):
            others = [h for h in holders.get(id(getattr(layer.base, attr)), []) if h not in base_names]
            if others:
                raise ValueError(
                    f"cannot merge the adapter of {name or type(model).__name__}: its {attr} is the same Parameter "
                    f"as {others} (tied weights, e.g. tie_word_embeddings=True). Merging would change "
                    f"{others[0].rsplit('.', 1)[0]} too, or untie the two. Keep the adapter unmerged (save_adapter "
                    "writes it as is), or untie the weights before inject (give one module its own copy)."
                )
