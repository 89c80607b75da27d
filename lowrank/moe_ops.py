"""Routed-expert math: the forward of a transformers experts module with low-rank updates on its 3-D weights.

A Mixture-of-Experts layer in transformers >= 5 keeps all experts' weights in fused parameters,
``gate_up_proj`` (E, 2 * inter, hidden) and ``down_proj`` (E, hidden, inter) (gpt-oss stores them transposed,
(E, in, out), and adds per-expert biases). With LoRA on such a parameter, expert e computes

    y_e(x) = x W_e^T + scale * dropout(x) A_e^T B_e^T,   A_e: (r, in), B_e: (out, r)

for the tokens routed to it. This module evaluates that on the routed tokens only, never forming the dense
per-expert update ``B_e @ A_e`` (E * out * in numbers, as large as the expert stack itself): the (token, expert)
pairs are sorted by expert, and each expert's contiguous segment goes through the base matmul and the two thin
low-rank matmuls (segment, in) @ (in, r) @ (r, out). Dropout draws an independent mask for every
(token, expert) pair.

The segments are walked with one loop over the experts that received tokens (one host sync for the counts), as
transformers' own eager and CPU grouped-mm paths do: ``torch._grouped_mm`` would do it in one call, but in torch
2.13 it has no CPU backward (measured: "Invalid strides/sizes" on ``.backward()``), and float64 (the test
reference dtype) is not accepted at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LowRank:
    """One low-rank update of a 3-D expert weight: ``scale * B_e @ A_e`` for every expert e.

    Attributes:
        a: (E, r, in), the per-expert down-projections.
        b: (E, out, r), the per-expert up-projections.
        scale: the adapter's multiplier (alpha / r or alpha / sqrt(r)).
        dropout: module applied to the adapter's input (``nn.Identity`` for none).
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    dropout: nn.Module


def route(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """Sort the (token, expert) pairs by expert.

    Args:
        top_k_index: (T, K) expert ids chosen for each of T tokens.
        num_experts: E; every id must be in [0, E).

    Returns:
        ``order``: (T * K,) indices into the flattened pairs, grouped by expert (stable, so tokens keep their
        order inside a segment); ``counts``: E Python ints, the segment lengths.
    """
    flat = top_k_index.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts)
    if counts.numel() != num_experts:  # an id >= E (expert parallel sentinels are refused by the caller)
        raise ValueError(f"expert ids must be < num_experts={num_experts}, got max id {int(flat.max())}")
    return torch.argsort(flat, stable=True), counts.tolist()


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    counts: list[int],
    *,
    transposed: bool = False,
    updates: tuple[LowRank, ...] = (),
) -> torch.Tensor:
    """Per-expert linear map of expert-sorted rows, plus low-rank updates.

    ``out[s] = x[s] W_e^T + sum_u u.scale * u.dropout(x[s]) A_e^T B_e^T`` for the rows s of segment e.

    Args:
        x: (S, in), rows sorted by expert; ``sum(counts) == S``.
        weight: (E, out, in), or (E, in, out) when ``transposed``.
        counts: E segment lengths (from `route`).
        transposed: the weight layout (gpt-oss stores (E, in, out)).
        updates: low-rank updates, A (E, r, in) and B (E, out, r) each; computed in x's dtype.

    Returns:
        (S, out) in x's dtype.
    """
    pieces = []
    for e, seg in enumerate(torch.split(x, counts)):
        if seg.shape[0] == 0:
            continue
        w = weight[e].to(x.dtype)
        y = seg @ w if transposed else seg @ w.T  # (n, in) @ (in, out)
        for u in updates:
            # Scale the (n, r) intermediate: r is the smallest dimension.
            xa = (u.dropout(seg) @ u.a[e].to(x.dtype).T) * u.scale  # (n, in) @ (in, r)
            y = y + xa @ u.b[e].to(x.dtype).T  # (n, r) @ (r, out)
        pieces.append(y)
    out_features = weight.shape[2] if transposed else weight.shape[1]
    return torch.cat(pieces) if pieces else x.new_zeros(0, out_features)


def experts_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    updates: dict[str, tuple[LowRank, ...]] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The forward of a transformers experts module (``@use_experts_implementation``) with low-rank updates.

    Same result as the module's own forward (up to float summation order): for each token t,
    ``y_t = sum_k w_tk * down_e(gate(up_e(x_t)))`` with e = top_k_index[t, k], where up/down are `grouped_linear`
    over ``gate_up_proj`` (or ``up_proj`` when the module has no gate) and ``down_proj``.

    Args:
        experts: the experts module; read for its weights, biases and the protocol flags ``has_gate``,
            ``has_bias``, ``is_transposed``, ``has_post_expert_norm``, ``_apply_gate`` / ``act_fn``.
        hidden_states: (T, hidden).
        top_k_index: (T, K) expert ids.
        top_k_weights: (T, K) routing weights.
        updates: parameter name (``"gate_up_proj"``, ``"up_proj"``, ``"down_proj"``) -> its low-rank updates.
        weights: parameter name -> a tensor to use instead of the module's parameter (a merged weight).

    Returns:
        (T, hidden) in hidden_states' dtype.
    """
    updates, weights = updates or {}, weights or {}
    num_tokens, top_k = top_k_index.shape
    order, counts = route(top_k_index, int(experts.num_experts))
    x = hidden_states[order // top_k]  # (S, hidden), S = T * K, grouped by expert
    sorted_ids = top_k_index.reshape(-1)[order]

    def project(name: str, inp: torch.Tensor) -> torch.Tensor:
        weight = weights.get(name, getattr(experts, name))
        y = grouped_linear(inp, weight, counts, transposed=experts.is_transposed, updates=updates.get(name, ()))
        if experts.has_bias:  # (E, out) -> one bias row per sorted pair
            y = y + getattr(experts, name + "_bias")[sorted_ids].to(y.dtype)
        return y

    up = "gate_up_proj" if experts.has_gate else "up_proj"
    h = project(up, x)
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    y = project("down_proj", h)
    if experts.has_post_expert_norm:
        y = experts.post_expert_norm(y)
    y = y * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
    # Back to (token, k) order, then sum over k (a sum, not index_add_: same order as transformers' reduction).
    unsorted = torch.empty_like(y).index_copy(0, order, y)
    return unsorted.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def embedding_update(
    ids: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, base: nn.Embedding
) -> torch.Tensor:
    """The LoRA term of an embedding lookup: ``scale * A^T[ids] B^T``, shape (*ids.shape, embedding_dim).

    Args:
        ids: integer token ids, any shape.
        a: (r, num_embeddings), PEFT's ``lora_embedding_A``.
        b: (embedding_dim, r), PEFT's ``lora_embedding_B``.
        scale: the adapter's multiplier.
        base: the embedding; its ``padding_idx`` (no gradient to that row), ``max_norm`` and friends are honoured
            as for the base lookup.
    """
    rows = F.embedding(
        ids, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
    )  # (..., r)
    return (rows * scale) @ b.T  # (..., r) @ (r, dim)
