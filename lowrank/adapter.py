"""One LoRA adapter: its parameters and its math, independent of the layer kind that holds it.

    update(x) = scale * dropout(x) @ A^T @ B^T,   A: (r, in_features), B: (out_features, r)
    scale = alpha / r   (rsLoRA: alpha / sqrt(r))

A layer (`lowrank.lora.LoRALayer`) holds its adapters by name in an ``nn.ModuleDict`` and adds the terms of its
active ones to the base output. A variant is a subclass that overrides `forward` and `merge_weight` (DoRA:
``lowrank.dora``); a new initialisation is a function in ``lowrank.init``.
"""

from __future__ import annotations

import itertools
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

# Adapter names become state-dict key parts and folder names (save_adapter writes adapter "b" to path/b/): a
# plain identifier-like segment, nothing a path could interpret ("..", "/", "~", empty, hidden files).
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}")
_RESERVED_NAMES = {"base", "adapters"}  # would clash with the layer's own attribute names in state-dict keys
_ORDER = itertools.count()  # creation order across the process: `lowrank.adapter_names` sorts by it


def check_adapter_name(name) -> str:
    """Return ``name`` if it is a valid adapter name (a letter, digit or _ then letters, digits, _ or -; at most
    64 characters), else raise ValueError (names become folder names and state-dict key parts)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in _RESERVED_NAMES:
        raise ValueError(
            f"adapter name {name!r} is not valid: use 1-64 letters, digits, '_' or '-' (not starting with '-'), "
            f"not {sorted(_RESERVED_NAMES)}; it becomes a folder name and a state-dict key part"
        )
    return name


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    """The adapter's multiplier: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (PEFT's ``use_rslora``)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def check_hyperparameters(r, alpha, dropout, adapter_dtype) -> None:
    """Raise a ValueError/TypeError naming the first bad LoRA hyper-parameter."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an int >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if not isinstance(adapter_dtype, torch.dtype) or not adapter_dtype.is_floating_point:
        raise TypeError(f"adapter_dtype must be a floating torch.dtype, got {adapter_dtype!r}")


SMALL_ROWS = 32  # see LoRAAdapter.update: at most this many rows compute a 16-bit input's update in float32
_HALF = (torch.bfloat16, torch.float16)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


class LoRAAdapter(nn.Module):
    """A rank-``r`` update ``scale * B @ A`` with dropout on its input.

    A is Kaiming-uniform (a = sqrt 5, as nn.Linear's weight), B is zero, so a new adapter changes nothing. A and B
    are stored in ``adapter_dtype`` (float32 by default, also for a bf16/fp16 base: small updates to low-precision
    weights would round away) and used in the input's dtype.

    Args:
        in_features, out_features: the adapted layer's sizes.
        r: rank, >= 1. alpha: scaling numerator, > 0. dropout: probability on the adapter's input, in [0, 1).
        rslora: ``scale = alpha / sqrt(r)`` instead of ``alpha / r``.
        adapter_dtype: dtype of A and B. device: where they are allocated.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        rslora: bool = False,
        *,
        adapter_dtype: torch.dtype = torch.float32,
        device=None,
    ):
        check_hyperparameters(r, alpha, dropout, adapter_dtype)
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.r, self.alpha, self.rslora = r, float(alpha), bool(rslora)
        self.scale = lora_scale(self.alpha, r, self.rslora)
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=adapter_dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # uniform(-1/sqrt(in), 1/sqrt(in))
        self.order = next(_ORDER)

    @property
    def mixable(self) -> bool:
        """Whether `lowrank.mixed_batch` can stack this adapter with others (plain LoRA: yes; variants: no)."""
        return type(self) is LoRAAdapter

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scale * B @ A`` of shape (out_features, in_features) in ``dtype`` (default A's), differentiable."""
        dtype = dtype or self.lora_A.dtype
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scale  # (out, r) @ (r, in)

    def forward(self, x: torch.Tensor, base=None, base_out: torch.Tensor | None = None) -> torch.Tensor:
        """The term added to the base output: ``scale * dropout(x) A^T B^T``, (..., in) -> (..., out), in x.dtype.

        ``base`` (the layer's `BaseView`) and ``base_out`` (its output) are unused here; variants need them.
        """
        return self.update(self.dropout(x))

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * x A^T B^T`` (..., in) -> (..., out) in x.dtype, on an input already through dropout.

        Normally in x's dtype. On the CPU, a 16-bit x of at most `SMALL_ROWS` rows with float32 A and B is
        multiplied in float32 and the result rounded once: oneDNN's bf16 matmuls of decode sizes are slow (two
        rank-16 products, 576 -> 1536, one row: 95 us in bf16 against 26 us in float32; at 64 rows float32 is
        slower: 299 vs 191 us; 2-core AMD EPYC, torch 2.13). Float32 is also what PEFT computes in.
        """
        if self.wide_update(x):
            return F.linear(F.linear(x.float(), self.lora_A) * self.scale, self.lora_B.float()).to(x.dtype)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        # Scale the (..., r) intermediate: r is the smallest dimension, so this is the cheapest place.
        return F.linear(F.linear(x, a) * self.scale, b)  # (..., in) -> (..., r) -> (..., out)

    def add_to(self, result: torch.Tensor, x: torch.Tensor, base, base_out: torch.Tensor) -> torch.Tensor:
        """``result + forward(x, base, base_out)`` in result's dtype: the layer's running sum over its active
        adapters (``result`` is ``base_out`` for the first). A variant may combine the two in fewer passes."""
        return result + self(x, base, base_out).to(result.dtype)

    def wide_update(self, x: torch.Tensor) -> bool:
        """Whether `update` multiplies this x in float32 (CPU, 16-bit x, at most `SMALL_ROWS` rows, float32 A)."""
        return (x.device.type == "cpu" and x.dtype in _HALF and self.lora_A.dtype == torch.float32
                and _rows(x) <= SMALL_ROWS)  # fmt: skip

    def merge_weight(self, w0: torch.Tensor) -> torch.Tensor:
        """The dense weight with this adapter folded in: ``W0 + scale * B @ A``, (out, in), in w0's dtype."""
        return w0 + self.delta_weight(w0.dtype)

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}, rslora={self.rslora}, dropout={self.dropout_p:g}"
        )
