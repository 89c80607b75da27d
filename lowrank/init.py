"""Adapter initialisations, by name: ``lowrank.inject(..., init="gaussian")``.

An initialisation is a function ``(layer, name) -> None`` that sets adapter ``name`` of ``layer`` (a
`lowrank.lora.LoRALayer`); it may also change the layer's frozen base (PiSSA, LoftQ). It runs once, right after
the adapter is added. Register a new one in `INITS`.

* ``"default"``: A Kaiming-uniform (a = sqrt 5), B = 0 (what `LoRAAdapter` starts with): outputs unchanged.
* ``"gaussian"``: A ~ N(0, 1/r), B = 0 (PEFT's ``init_lora_weights="gaussian"``): outputs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _default(layer, name: str) -> None:
    """Nothing to do: `LoRAAdapter` is built with Kaiming-uniform A and zero B."""


@torch.no_grad()
def _gaussian(layer, name: str) -> None:
    adapter = layer.adapters[name]
    adapter.lora_A.normal_(0.0, 1.0 / adapter.r)


INITS: dict[str, Callable] = {"default": _default, "gaussian": _gaussian}


def check_init(init) -> Callable:
    """The init function registered as ``init``; ValueError listing the known names otherwise."""
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(f"unknown init {init!r}; known: {sorted(INITS)}")
    return INITS[init]
