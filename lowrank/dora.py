"""DoRA (weight-decomposed LoRA, arXiv 2402.09353): the math, without building the dense update in the forward.

    W' = m * (W0 + s B A) / ||W0 + s B A||_row        m: (out,) trainable, initialised to ||W0||_row
    y  = W' x + b = base(x) + (m / n - 1) * (W0 x) + (m / n) * s B A x,     n = ||W0 + s B A||_row (detached)

"row" is the norm over the input dimension, one value per output feature (what the paper calls the column norm
of W^T; PEFT's ``torch.linalg.norm(W, dim=1)``). n is a constant in backward (the paper's section 4.3; PEFT
detaches it too), so it is computed under ``no_grad`` and needs no (out, in) tensor:

    n^2 = ||W0||^2 + 2 s <W0, B A> + s^2 ||B A||^2          (per output row i)
    <W0, B A>_i = sum_k B[i, k] (W0 A^T)[i, k]             W0 A^T: (out, r), one pass over W0
    ||B A||_i^2 = sum_k (B (A A^T))[i, k] B[i, k]            A A^T: (r, r)

``||W0||^2`` is cached (W0 is frozen), and ``W0 A^T`` is the base layer applied to the r rows of A, so an NF4
base computes it with its own matmul (no separate dense dequantized copy). PEFT instead forms the dense
``W0 + s B A`` (out, in) in every forward.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import LoRAAdapter


def row_norm_sq(w0: torch.Tensor) -> torch.Tensor:
    """``||W0[i, :]||^2`` for a dense (out, in) weight, summed in float32 (float64 for float64): (out,)."""
    wide = torch.promote_types(w0.dtype, torch.float32)
    return w0.detach().to(wide).square().sum(dim=1)


def magnitude_init(w0: torch.Tensor) -> torch.Tensor:
    """DoRA's initial magnitude: the row norms ``||W0[i, :]||`` (out,), so ``W' = W0`` at B = 0."""
    return row_norm_sq(w0).sqrt()


def weight_norm(
    w0_norm_sq: torch.Tensor, w0_at: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``n = ||W0 + s B A||_row`` (out,) from the cached ``||W0||^2`` and ``W0 A^T``, detached.

    Args:
        w0_norm_sq: (out,) ``||W0[i, :]||^2``. w0_at: (out, r) ``W0 A^T``. lora_a: (r, in). lora_b: (out, r).
        scale: s.

    Returns:
        (out,) in the dtype of ``w0_norm_sq`` (float32 or wider); every product is taken in that dtype.
    """
    with torch.no_grad():
        dtype = w0_norm_sq.dtype
        a, b, w0_at = lora_a.detach().to(dtype), lora_b.detach().to(dtype), w0_at.detach().to(dtype)
        cross = (b * w0_at).sum(dim=1)  # <W0, B A> per row: (out, r) * (out, r)
        ba_sq = ((b @ (a @ a.T)) * b).sum(dim=1)  # ||B A||^2 per row: (out, r) @ (r, r)
        # Rounding can push a (mathematically >= 0) tiny square below zero: clamp before the square root.
        return (w0_norm_sq + (2 * scale) * cross + (scale * scale) * ba_sq).clamp_min(0).sqrt()


def dense_weight_norm(w0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``||W0 + delta||_row`` (out,) from the dense tensors (what merge uses; the reference the tests check)."""
    wide = torch.promote_types(torch.promote_types(w0.dtype, delta.dtype), torch.float32)
    return torch.linalg.vector_norm(w0.detach().to(wide) + delta.detach().to(wide), dim=1)


def merged_weight(w0: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``W' = m / ||W0 + delta||_row * (W0 + delta)`` (out, in), in float32 or wider (the caller rounds)."""
    wide = torch.promote_types(torch.promote_types(w0.dtype, delta.dtype), torch.float32)
    w = w0.to(wide) + delta.to(wide)
    return (magnitude.to(wide) / dense_weight_norm(w0, delta))[:, None] * w


# --- the adapter ------------------------------------------------------------------------------------------------


def _signature(module: nn.Module) -> tuple:
    """Identity and version of every tensor of a base module: changes when a weight is replaced or written in
    place (``copy_``, ``load_state_dict``), so a cached ``||W0||^2`` is recomputed. (A write through ``.data``
    bypasses version counters; nothing in lowrank does that to a base.)"""
    return tuple(
        (t.data_ptr(), t._version, t.device, t.dtype) for t in itertools.chain(module.parameters(), module.buffers())
    )


class DoRAAdapter(LoRAAdapter):
    """LoRA with a learned magnitude: ``W' = m * (W0 + s B A) / ||W0 + s B A||_row`` (see the module docstring).

    ``lora_magnitude_vector`` (out,) is trainable, in ``adapter_dtype``, set by `init_magnitude` to the row norms
    of ``W0 + s B A`` (``||W0||_row`` for B = 0) once the base and the init are known. The norm is detached and
    computed without an (out, in) temporary: ``||W0||^2`` cached per base (recomputed when the base's tensors
    change), ``W0 A^T`` from the base's own matmul applied to A's rows. In eval without gradients the whole norm
    is cached until A, B or the base change.

    With dropout active (training, p > 0) the base term uses the dropped input, as PEFT does:
    ``y = base(x) + (m/n - 1) W0 dropout(x) + (m/n) s B A dropout(x)``: one extra base matmul.
    """

    def __init__(self, in_features: int, out_features: int, *args, **kwargs):
        super().__init__(in_features, out_features, *args, **kwargs)
        self.lora_magnitude_vector = nn.Parameter(
            torch.ones(self.out_features, device=self.lora_A.device, dtype=self.lora_A.dtype)
        )
        # Caches live in __dict__, not as buffers: nothing of them may reach a state dict or adapter file.
        self.__dict__["_w0_cache"] = None  # (base signature, ||W0||^2 (out,))
        self.__dict__["_norm_cache"] = None  # (full signature, n (out,)), eval only

    @staticmethod
    def supports(base) -> bool:
        """Whether a base (a `BaseView`) can carry DoRA: a linear layer with a dense or protocol weight."""
        return base is not None and hasattr(base, "dense_weight") and hasattr(base, "out_features")

    def _w0_norm_sq(self, base) -> torch.Tensor:
        key = _signature(base.module)
        if self._w0_cache is None or self._w0_cache[0] != key:
            with torch.no_grad():
                self.__dict__["_w0_cache"] = (key, row_norm_sq(base.dense_weight()))
        return self._w0_cache[1]

    def _base_nobias(self, base, x: torch.Tensor) -> torch.Tensor:
        """``W0 x`` (..., out) in x's dtype: a dense weight directly, a quantized one through its own forward."""
        if not base.quantized:
            return F.linear(x, base.dense_weight().to(x.dtype))
        out = base.module(x)
        return out if base.bias is None else out - base.bias.to(out.dtype)

    def weight_norm(self, base, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``n = ||W0 + s B A||_row`` (out,), float32 or wider, detached. ``dtype``: the matmul dtype of W0 A^T."""
        dtype = dtype or self.lora_A.dtype
        key = None
        if not self.training and not torch.is_grad_enabled():
            key = (_signature(base.module), _signature(self), dtype)
            if self._norm_cache is not None and self._norm_cache[0] == key:
                return self._norm_cache[1]
        with torch.no_grad():
            w0_at = self._base_nobias(base, self.lora_A.to(dtype)).T  # (r, in) -> (r, out) -> (out, r)
            n = weight_norm(self._w0_norm_sq(base), w0_at, self.lora_A, self.lora_B, self.scale)
        self.__dict__["_norm_cache"] = None if key is None else (key, n)
        return n

    @torch.no_grad()
    def init_magnitude(self, base) -> None:
        """m = ``||W0 + s B A||_row`` with the current A, B and base, so the layer's output starts unchanged."""
        wide = torch.promote_types(torch.float32, self.lora_A.dtype)
        self.lora_magnitude_vector.copy_(self.weight_norm(base, wide).to(self.lora_magnitude_vector.dtype))

    def _parts(self, x: torch.Tensor, base):
        """``(ratio, lora, xd, dropped)``: m / n (out,) in float32 or wider with the gradient to m,
        ``s B A dropout(x)`` (..., out) in x.dtype, the dropped input and whether dropout was applied."""
        norm = self.weight_norm(base, x.dtype)
        dropped = self.dropout_p > 0 and self.training
        xd = self.dropout(x) if dropped else x
        lora = self.update(xd)  # (..., in) -> (..., out)
        return self.lora_magnitude_vector / norm.to(self.lora_magnitude_vector.dtype), lora, xd, dropped

    def forward(self, x: torch.Tensor, base=None, base_out: torch.Tensor | None = None) -> torch.Tensor:
        """The term added to ``base(x)``: ``(m/n - 1) W0 x + (m/n) s B A dropout(x)`` (..., out), in x.dtype."""
        ratio, lora, xd, dropped = self._parts(x, base)
        if dropped:
            y0 = self._base_nobias(base, xd)
        else:
            y0 = base_out if base.bias is None else base_out - base.bias.to(base_out.dtype)
        # m / n - 1 in float32, then cast: in bf16 it would be a multiple of 2^-8 near 1 (PEFT's bf16 rounding).
        return (ratio - 1).to(x.dtype) * y0.to(x.dtype) + ratio.to(x.dtype) * lora

    def add_to(self, result: torch.Tensor, x: torch.Tensor, base, base_out: torch.Tensor) -> torch.Tensor:
        """The layer's output when this is its first adapter, over a base without bias, dropout inactive:
        ``y = (m/n) (W0 x + lora) = t + (m/n - 1) t`` with ``t = W0 x + lora``: one add and one ``addcmul``, forward
        and backward about half the (..., out) passes of ``base_out + forward(...)`` (10 -> 6). ``m/n - 1`` is taken
        in float32 before the cast, as in `forward`. Any other case: ``result + forward(...)``."""
        dropped = self.dropout_p > 0 and self.training  # the base term then needs W0 dropout(x), not base_out
        if dropped or result is not base_out or base.bias is not None or result.dtype != x.dtype:
            return super().add_to(result, x, base, base_out)
        ratio, lora, _, _ = self._parts(x, base)
        t = base_out + lora
        return torch.addcmul(t, t, (ratio - 1).to(x.dtype))

    def merge_weight(self, w0: torch.Tensor) -> torch.Tensor:
        """``m / ||W0 + s B A||_row * (W0 + s B A)``, (out, in), in w0's dtype (the norm from the dense sum)."""
        return merged_weight(w0, self.delta_weight(w0.dtype), self.lora_magnitude_vector).to(w0.dtype)
