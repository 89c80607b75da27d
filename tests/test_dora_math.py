"""DoRA's norm identity and output term (lowrank/dora.py functions) against dense float64 references."""

from __future__ import annotations

import pytest
import torch

from lowrank import dora


def _factors(out=37, inp=53, r=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(out, inp, generator=g, dtype=torch.float64) * 0.1 + 0.02).to(dtype)
    a = torch.randn(r, inp, generator=g, dtype=torch.float64).to(dtype) * 0.2
    b = torch.randn(out, r, generator=g, dtype=torch.float64).to(dtype) * 0.3
    return w0, a, b


@pytest.mark.parametrize("dtype, rtol", [
    (torch.float64, 1e-12),  # float64 identity vs float64 dense: round-off only
    (torch.float32, 1e-5),   # float32 sums of 53 terms and a square root; no cancellation at these sizes
])  # fmt: skip
def test_weight_norm_identity_equals_the_dense_row_norm(dtype, rtol):
    w0, a, b = _factors(dtype=dtype)
    scale = 1.7
    norm_sq = dora.row_norm_sq(w0)
    got = dora.weight_norm(norm_sq, w0 @ a.T, a, b, scale)  # W0 A^T: (out, r)
    want = torch.linalg.vector_norm(w0.double() + scale * b.double() @ a.double(), dim=1)
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0)
    assert not got.requires_grad


def test_weight_norm_is_detached_even_for_trainable_factors():
    w0, a, b = _factors()
    a.requires_grad_(True)
    b.requires_grad_(True)
    n = dora.weight_norm(dora.row_norm_sq(w0), w0 @ a.T, a, b, 2.0)
    assert n.grad_fn is None


def test_magnitude_init_is_the_row_norm():
    w0, _, _ = _factors(dtype=torch.bfloat16)
    want = torch.linalg.vector_norm(w0.double(), dim=1)
    # bf16 squares are exact in float32; the float32 sum of 53 of them rounds at ~1e-7 relative.
    torch.testing.assert_close(dora.magnitude_init(w0).double(), want, rtol=1e-6, atol=0)


def test_merged_weight_matches_the_papers_formula():
    w0, a, b = _factors(dtype=torch.float64)
    scale = 0.8
    m = torch.rand(w0.shape[0], dtype=torch.float64) + 0.5
    delta = scale * b @ a
    n = torch.linalg.vector_norm(w0 + delta, dim=1)
    w_prime = (m / n)[:, None] * (w0 + delta)  # the paper's W' = m (W0 + sBA) / ||W0 + sBA||
    torch.testing.assert_close(dora.merged_weight(w0, delta, m), w_prime, rtol=1e-12, atol=0)
