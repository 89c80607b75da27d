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


def test_merged_weight_and_output_term_match_the_dense_formula():
    w0, a, b = _factors(dtype=torch.float64)
    scale = 0.8
    m = torch.rand(w0.shape[0], dtype=torch.float64) + 0.5
    x = torch.randn(4, 3, w0.shape[1], dtype=torch.float64)
    delta = scale * b @ a
    n = torch.linalg.vector_norm(w0 + delta, dim=1)
    w_prime = (m / n)[:, None] * (w0 + delta)  # the paper's W' = m (W0 + sBA) / ||W0 + sBA||
    torch.testing.assert_close(dora.merged_weight(w0, delta, m), w_prime, rtol=1e-12, atol=0)
    # The forward's decomposition: W' x = W0 x + (m/n - 1) W0 x + (m/n) s B A x.
    term = dora.output_term(x @ w0.T, x @ delta.T, m, n)
    torch.testing.assert_close(x @ w0.T + term, x @ w_prime.T, rtol=1e-12, atol=1e-14)


def test_output_term_gradient_reaches_magnitude_not_norm():
    w0, a, b = _factors(dtype=torch.float64)
    m = dora.magnitude_init(w0).clone().requires_grad_(True)
    x = torch.randn(6, w0.shape[1], dtype=torch.float64)
    n = dora.weight_norm(dora.row_norm_sq(w0), w0 @ a.T, a, b, 1.0)
    y0, lora = x @ w0.T, x @ (b @ a).T
    dora.output_term(y0, lora, m, n).sum().backward()
    # d/dm_i of sum over rows of (m_i/n_i)(y0 + lora)_i - y0_i = sum_rows (y0 + lora)_i / n_i.
    torch.testing.assert_close(m.grad, ((y0 + lora) / n).sum(0), rtol=1e-12, atol=1e-12)
