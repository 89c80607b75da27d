"""Adapter initialisations, by name: ``lowrank.inject(..., init="gaussian")``.

An initialisation is a function ``(layer, name) -> None`` that sets adapter ``name`` of ``layer`` (a
`lowrank.lora.LoRALayer`); it may also change the layer's frozen base (PiSSA, LoftQ). It runs once, right after
the adapter is added. Register a new one in `INITS`.

* ``"default"``: A Kaiming-uniform (a = sqrt 5), B = 0 (what `LoRAAdapter` starts with): outputs unchanged.
* ``"gaussian"``: A ~ N(0, 1/r), B = 0 (PEFT's ``init_lora_weights="gaussian"``): outputs unchanged.
* ``"pissa"`` / ``"pissa_niter_<k>"``: the base's top-r singular part (full / randomized SVD with k power
  iterations) moves into the adapter, the base keeps the residual: outputs unchanged (``lowrank.init_svd``).
* ``"loftq"``: the base becomes NF4 Q and the adapter the rank-r fit of ``W - deq(Q)`` (5 alternations,
  randomized SVD with 4 power iterations): outputs close to the float model, closer than NF4 alone.

An init that changes the base has a ``check(layer_name, layer, adapter)`` attribute that `lowrank.inject` runs on
every target before any init runs, so a refused layer leaves the model unchanged.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import torch

from .init_svd import check_layer, loftq_layer, pissa_layer


def _default(layer, name: str) -> None:
    """Nothing to do: `LoRAAdapter` is built with Kaiming-uniform A and zero B."""


@torch.no_grad()
def _gaussian(layer, name: str) -> None:
    adapter = layer.adapters[name]
    adapter.lora_A.normal_(0.0, 1.0 / adapter.r)


def _base_changing(kind: str, fn: Callable) -> Callable:
    fn = functools.partial(fn)  # a partial takes attributes
    fn.check = functools.partial(check_layer, kind)
    return fn


INITS: dict[str, Callable] = {
    "default": _default,
    "gaussian": _gaussian,
    "pissa": _base_changing("pissa", pissa_layer),
    "loftq": _base_changing("loftq", loftq_layer),
}


def check_init(init) -> Callable:
    """The init function registered as ``init`` (or ``pissa_niter_<k>``); ValueError listing the known names."""
    match = re.fullmatch(r"pissa_niter_([0-9]{1,3})", init) if isinstance(init, str) else None
    if match:
        return _base_changing("pissa", functools.partial(pissa_layer, niter=int(match[1])))
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(f"unknown init {init!r}; known: {sorted(INITS)} and 'pissa_niter_<k>'")
    return INITS[init]
