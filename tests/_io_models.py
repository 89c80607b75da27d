"""The tiny model and helpers shared by the adapter-file tests (test_io.py, test_io_errors.py).
(``snapshot`` / ``assert_unchanged`` for the refused operations are in ``_helpers``.)

``Tiny``: two residual MLP blocks and a head, widths that are not powers of two; ``reference_forward`` is its
forward in float64 from dense weights, the independent reference every round trip is checked against.
"""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from _helpers import randomize_adapters

import lowrank

TARGETS = ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]
# float32 forward vs the float64 reference through 5 layers of width <= 20 with |activations| ~ 1: rounding is a
# few float32 ulps (6e-8) per dot product; 1e-5 leaves margin and is far below the adapters' effect (~0.5).
F32_TOL = dict(rtol=1e-5, atol=1e-5)


class Block(nn.Module):
    def __init__(self, dim=12, hidden=20):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim, bias=False)


class Tiny(nn.Module):
    """Two residual MLP blocks and a head; widths that are not powers of two."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        for b in self.blocks:
            x = x + b.down(b.act(b.up(x)))
        return self.head(x)


def reference_forward(weights: dict, x: torch.Tensor) -> torch.Tensor:
    """Tiny's forward in float64 from {layer name: (W, b or None)} dense weights."""
    x = x.double()
    for i in range(2):
        h = F.gelu(F.linear(x, *weights[f"blocks.{i}.up"]))
        x = x + F.linear(h, *weights[f"blocks.{i}.down"])
    return F.linear(x, *weights["head"])


def dense_weights(base: nn.Module, adapters: dict) -> dict:
    """float64 W (+ scale * B @ A where adapted) per layer; ``adapters`` maps name -> (A, B, scale)."""
    out = {}
    for name in ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "head"]:
        layer = base.get_submodule(name)
        w = layer.weight.double()
        if name in adapters:
            a, b, scale = adapters[name]
            w = w + scale * b.double() @ a.double()
        out[name] = (w, None if layer.bias is None else layer.bias.double())
    return out


def randomize(model):
    """B starts at zero; random A and B (std 0.3) make every adapter change the output."""
    return randomize_adapters(model, std_b=0.3, std_a=0.3)


def adapted(base, targets=TARGETS, **kw):
    model = copy.deepcopy(base)
    lowrank.inject(model, targets, **({"r": 4, "alpha": 8} | kw))
    return randomize(model)


def adapters_of(model) -> dict:
    return {n: (l.lora_A.detach().clone(), l.lora_B.detach().clone(), l.scale) for n, l in lowrank.lora_layers(model)}
