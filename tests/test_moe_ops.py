"""Routed-expert math (lowrank/moe_ops.py) against transformers' own per-expert loop on dense merged weights.

Reference: the experts module's eager forward (transformers' loop over experts) in float64, run through
``torch.func.functional_call`` with each adapted weight replaced by the dense ``W_e + scale * B_e A_e``; our path
never forms that product. float64 everywhere: the two differ only in summation order (1e-12 covers it).
"""

import pytest
import torch
from _moe_models import FAMILIES, experts_of, tiny_moe
from torch import nn

from lowrank.moe_ops import LowRank, embedding_update, experts_forward, route

TOL = {"rtol": 1e-12, "atol": 1e-12}  # float64, same products in another order


def _inputs(experts, tokens=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = experts.gate_up_proj.shape[2 if not experts.is_transposed else 1]
    x = torch.randn(tokens, hidden, generator=g, dtype=torch.float64) + 0.5  # non-zero mean
    logits = torch.randn(tokens, experts.num_experts, generator=g, dtype=torch.float64)
    w, idx = torch.topk(logits.softmax(-1), 2, dim=-1)
    return x, idx, w


def _updates(experts, r=3, seed=1, dropout=None):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in ("gate_up_proj", "down_proj"):
        e, d1, d2 = getattr(experts, name).shape
        fin, fout = (d1, d2) if experts.is_transposed else (d2, d1)
        a = torch.randn(e, r, fin, generator=g, dtype=torch.float64)
        b = torch.randn(e, fout, r, generator=g, dtype=torch.float64) * 0.1
        out[name] = (LowRank(a, b, 0.7, dropout or nn.Identity()),)
    return out


def _reference(experts, x, idx, w, updates, factor=1.0):
    """The module's own forward on dense W_e + factor * scale * B_e A_e (in the module's layout)."""
    replaced = {}
    for name, (u,) in updates.items():
        delta = factor * u.scale * (u.b @ u.a)  # (E, out, in)
        replaced[name] = getattr(experts, name) + (delta.transpose(1, 2) if experts.is_transposed else delta)
    return torch.func.functional_call(experts, replaced, (x, idx, w))


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_forward_equals_module_forward(family):
    experts = experts_of(tiny_moe(family)).double()
    x, idx, w = _inputs(experts)
    torch.testing.assert_close(experts_forward(experts, x, idx, w), experts(x, idx, w), **TOL)
    updates = _updates(experts)
    torch.testing.assert_close(
        experts_forward(experts, x, idx, w, updates), _reference(experts, x, idx, w, updates), **TOL
    )


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])  # both weight layouts
def test_experts_gradients_equal_dense_reparametrisation(family):
    experts = experts_of(tiny_moe(family)).double().requires_grad_(False)
    x, idx, w = _inputs(experts)
    updates = _updates(experts)
    params = [t.requires_grad_() for (u,) in updates.values() for t in (u.a, u.b)]
    x.requires_grad_()
    target = torch.randn(x.shape, dtype=torch.float64)
    ours = torch.autograd.grad((experts_forward(experts, x, idx, w, updates) * target).sum(), [x, *params])
    ref = torch.autograd.grad((_reference(experts, x, idx, w, updates) * target).sum(), [x, *params])
    for g1, g2 in zip(ours, ref, strict=True):
        torch.testing.assert_close(g1, g2, **TOL)
        assert g1.abs().sum() > 0  # every factor receives a gradient


class _Times(nn.Module):
    """A deterministic stand-in for dropout: multiplies its input by a constant."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return x * self.c


def test_dropout_acts_on_the_adapter_input_only():
    experts = experts_of(tiny_moe("mixtral")).double()
    x, idx, w = _inputs(experts)
    zero, double = _updates(experts, dropout=_Times(0.0)), _updates(experts, dropout=_Times(2.0))
    torch.testing.assert_close(experts_forward(experts, x, idx, w, zero), experts(x, idx, w), **TOL)
    # Only the update's input is scaled, so the result is the dense reference with twice the update.
    torch.testing.assert_close(
        experts_forward(experts, x, idx, w, double), _reference(experts, x, idx, w, double, factor=2.0), **TOL
    )


def test_real_dropout_draws_a_mask_per_routed_pair():
    experts = experts_of(tiny_moe("mixtral")).double()
    x, idx, w = _inputs(experts, tokens=64)
    plain = _updates(experts)
    # Dropout on down_proj's update only: the output is linear in it, so the mean over draws is the update
    # without dropout (inverted dropout keeps the expectation). gate_up's update would pass through SiLU.
    updates = {
        "gate_up_proj": plain["gate_up_proj"],
        "down_proj": _updates(experts, dropout=nn.Dropout(0.5))["down_proj"],
    }
    draws = torch.stack([experts_forward(experts, x, idx, w, updates) for _ in range(400)])
    assert not torch.allclose(draws[0], draws[1])  # a fresh mask per call
    full = _reference(experts, x, idx, w, plain)
    no_down = _reference(experts, x, idx, w, {"gate_up_proj": plain["gate_up_proj"]})
    # 400 draws put the Monte-Carlo error of the mean near 5% of the update (1 / sqrt(400)); 0.2 is 4 sigma.
    assert (draws.mean(0) - full).abs().max() < 0.2 * (full - no_down).abs().max()


def test_route_groups_pairs_and_counts_idle_experts():
    idx = torch.tensor([[2, 0], [0, 2], [1, 2]])
    order, counts = route(idx, 4)
    assert counts == [2, 1, 3, 0]
    assert idx.reshape(-1)[order].tolist() == [0, 0, 1, 2, 2, 2]
    assert order.tolist() == [1, 2, 4, 0, 3, 5]  # stable: tokens keep their order inside an expert
    with pytest.raises(ValueError, match="num_experts=2"):
        route(idx, 2)


def test_idle_experts_get_zero_gradient():
    experts = experts_of(tiny_moe("qwen3_moe")).double().requires_grad_(False)
    x, _, w = _inputs(experts)
    idx = torch.stack([torch.zeros(x.shape[0], dtype=torch.long), torch.ones(x.shape[0], dtype=torch.long)], 1)
    updates = _updates(experts)
    a = updates["down_proj"][0].a.requires_grad_()
    (grad,) = torch.autograd.grad(experts_forward(experts, x, idx, w, updates).sum(), [a])
    assert grad[2:].abs().max() == 0 and grad[:2].abs().min() > 0  # experts 2 and 3 received no token


def test_embedding_update_equals_dense_merged_table():
    g = torch.Generator().manual_seed(0)
    emb = nn.Embedding(13, 6, padding_idx=0).double()
    a = torch.randn(3, 13, generator=g, dtype=torch.float64)
    b = torch.randn(6, 3, generator=g, dtype=torch.float64)
    ids = torch.tensor([[0, 5, 12, 5], [7, 1, 0, 3]])
    merged = emb.weight + 0.5 * (b @ a).T  # (num_embeddings, dim)
    torch.testing.assert_close(emb(ids) + embedding_update(ids, a, b, 0.5, emb), merged[ids], **TOL)
    # padding_idx: like the base lookup, no gradient reaches that column of A.
    a.requires_grad_()
    embedding_update(ids, a, b, 0.5, emb).sum().backward()
    assert a.grad[:, 0].abs().max() == 0 and a.grad[:, 5].abs().min() > 0
