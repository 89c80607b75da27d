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

import torch


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


def output_term(
    base_out_nobias: torch.Tensor, lora_out: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor
) -> torch.Tensor:
    """The term DoRA adds to ``base(x)``: ``(m / n - 1) * (W0 x) + (m / n) * lora_out`` (..., out).

    Args:
        base_out_nobias: (..., out) ``W0 x`` (PEFT, under dropout in training: ``W0 dropout(x)``).
        lora_out: (..., out) ``s B A dropout(x)``. magnitude: (out,) m, trainable. norm: (out,) n, detached.
    """
    factor = (magnitude / norm).to(lora_out.dtype)  # (out,): m's gradient flows through here
    return (factor - 1) * base_out_nobias + factor * lora_out
