"""PiSSA and LoftQ as functions of one weight, against float64 references (lowrank/init_svd.py)."""

from __future__ import annotations

import pytest
import torch

from lowrank import nf4
from lowrank.init_svd import loftq, pissa, top_r_svd


def _weight(out, inp, kind="gaussian", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        w = torch.randn(out, inp, generator=g, dtype=torch.float64) * 0.05 + 0.01  # non-zero mean
    elif kind == "heavy":  # Student-t with 3 degrees of freedom: the outliers NF4 blocks suffer from
        w = torch.distributions.StudentT(3.0).sample((out, inp)).double() * 0.02
    else:  # "decaying": a trained-weight-like spectrum, s_k = 1 / (1 + k)
        u, _ = torch.linalg.qr(torch.randn(out, min(out, inp), generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(inp, min(out, inp), generator=g, dtype=torch.float64))
        w = (u * (1.0 / (1 + torch.arange(min(out, inp), dtype=torch.float64)))) @ v.T
    return w.to(dtype)


@pytest.mark.parametrize("dtype, tol", [
    (torch.float64, 1e-12),  # float64 throughout: SVD round-off only
    (torch.float32, 2e-6),   # float32 SVD and product, ~10 ulp of |W| ~ 0.2
    (torch.bfloat16, 4e-3),  # residual rounded once to bf16: half an ulp (2^-9 relative) of |W| <= 0.25
])  # fmt: skip
def test_pissa_reconstructs_and_takes_the_top_singular_part(dtype, tol):
    w = _weight(37, 53, dtype=dtype)  # sizes that are not powers of two
    r, scale = 5, 2.0
    a, b, residual = pissa(w, r, scale)
    assert a.shape == (r, 53) and b.shape == (37, r) and residual.dtype == dtype
    w64 = w.double()
    # Output unchanged at init: residual + s B A == W.
    torch.testing.assert_close(residual.double() + scale * b.double() @ a.double(), w64, atol=tol, rtol=0)
    # s B A is the best rank-r approximation (Eckart-Young) computed here in float64.
    u, s, vh = torch.linalg.svd(w64, full_matrices=False)
    best = (u[:, :r] * s[:r]) @ vh[:r]
    torch.testing.assert_close(scale * b.double() @ a.double(), best, atol=tol, rtol=0)
    # The two factors share sqrt(S / s): A A^T == B^T B == diag(S_r) / s.
    torch.testing.assert_close(a.double() @ a.double().T, torch.diag(s[:r]) / scale, atol=tol, rtol=0)
    torch.testing.assert_close(b.double().T @ b.double(), torch.diag(s[:r]) / scale, atol=tol, rtol=0)


def test_pissa_randomized_matches_full_on_a_decaying_spectrum():
    w = _weight(96, 160, kind="decaying")
    full = pissa(w, 8, 1.0)
    fast = pissa(w, 8, 1.0, niter=4)
    # Subspace iteration on s_k = 1/(1+k), q = 2r: the rank-8 product agrees with the exact one to ~1e-4 of
    # its norm (|s_9 / s_17|^(2*4+1) = (10/18)^9 ~ 5e-3 per direction, squared by the projection).
    exact, approx = full[1] @ full[0], fast[1] @ fast[0]
    assert torch.linalg.norm(approx - exact) / torch.linalg.norm(exact) < 1e-3
    # The residual still reconstructs W exactly (the split is exact whatever the subspace).
    torch.testing.assert_close(fast[2] + fast[1] @ fast[0], w, atol=2e-6, rtol=0)  # float32 round-off


def test_randomized_svd_is_reproducible_and_leaves_the_rng_alone():
    w = _weight(40, 30)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = top_r_svd(w, 4, niter=2)
    after = torch.rand(3)
    second = top_r_svd(w, 4, niter=2)
    assert torch.equal(before, after)
    for x, y in zip(first, second, strict=False):
        assert torch.equal(x, y)


@pytest.mark.parametrize("r", [8, 30])
def test_pissa_rank_at_the_limit(r):
    w = _weight(30, 50)
    a, b, residual = pissa(w, r, 0.5)
    torch.testing.assert_close(residual + 0.5 * b @ a, w, atol=2e-6, rtol=0)  # float32 round-off
    if r == 30:  # the full rank: the residual is round-off
        assert residual.abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["gaussian", "heavy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loftq_beats_nf4_alone(kind, dtype):
    w = _weight(64, 96, kind=kind, dtype=dtype)
    r, scale = 8, 2.0
    res = loftq(w, r, scale, iters=3)
    w64 = w.double()
    # Independent float64 recomputation of the reported errors, with the weight the NF4 layer multiplies by:
    # dequantized to W's dtype (a bf16 layer computes with bf16 W, nf4.rounding_dtype).
    deq = nf4.dequantize(res.base, dtype).double()
    err = torch.linalg.norm(w64 - deq - scale * res.B.double() @ res.A.double()).item()
    err_nf4 = torch.linalg.norm(w64 - nf4.dequantize(nf4.quantize(w), dtype).double()).item()
    assert res.error == pytest.approx(err, rel=1e-4)  # float32 vs float64 accumulation of the same residual
    assert res.error_nf4 == pytest.approx(err_nf4, rel=1e-4)
    assert res.ratio < 1.0
    assert res.error == min(res.errors)
    assert res.base.dtype == dtype and res.base.shape == w.shape
    # First iterate by hand: Q = nf4(W), the adapter is the rank-r SVD of the NF4 error (Eckart-Young bound).
    e = w64 - nf4.dequantize(nf4.quantize(w), dtype).double()
    s = torch.linalg.svdvals(e)
    assert res.errors[0] == pytest.approx(s[r:].square().sum().sqrt().item(), rel=1e-4)


def test_loftq_iterations_are_deterministic_and_byte_reproducible():
    w = _weight(48, 64, kind="heavy")
    a = loftq(w, 4, 1.0, iters=2, niter=2)
    b = loftq(w, 4, 1.0, iters=2, niter=2)
    assert torch.equal(a.base.packed, b.base.packed) and torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


@pytest.mark.parametrize("fn", [pissa, loftq])
@pytest.mark.parametrize("kwargs, match", [
    ({"r": 31}, "r=31 is larger than min"),
    ({"r": 0}, "r must be an int >= 1"),
    ({"scale": 0.0}, "scale must be a finite number > 0"),
    ({"niter": -1}, "niter must be None"),
])  # fmt: skip
def test_bad_arguments(fn, kwargs, match):
    w = _weight(30, 40)
    args = {"r": 4, "scale": 1.0} | kwargs
    r, scale = args.pop("r"), args.pop("scale")
    with pytest.raises(ValueError, match=match):
        fn(w, r, scale, name="layers.0.q_proj", **args)


def test_bad_weights():
    w = _weight(30, 40)
    w[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"layers.0.q_proj: the weight holds 1 NaN/inf"):
        loftq(w, 4, 1.0, name="layers.0.q_proj")
    with pytest.raises(TypeError, match="2-D"):
        pissa(torch.ones(3, 4, 5), 2, 1.0)
    with pytest.raises(TypeError, match="floating-point dense weight"):
        pissa(torch.ones(3, 4, dtype=torch.uint8), 2, 1.0)
    with pytest.raises(ValueError, match="iters must be an int >= 1"):
        loftq(_weight(30, 40), 4, 1.0, iters=0)


def test_init_benchmark_quick_run(tmp_path):
    """bench_init.py --quick: the PiSSA rows reconstruct W and the LoftQ rows beat NF4 alone on a tiny Llama."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_init

    result = bench_init.main(["--quick", "--out", str(tmp_path)])
    lowrank_rows = [r for r in result["pissa"] if r["provider"].startswith("lowrank")]
    assert len(result["pissa"]) == 4 and len(lowrank_rows) == 2  # ours full / randomized, PEFT full / niter
    for row in lowrank_rows:
        assert row["median_s"] > 0
        assert row["max_rel_err"] < 1e-2  # bf16 residual: one rounding, 2^-9 relative
    assert lowrank_rows[0]["top_r_rel_err"] < 1e-5  # the full SVD is the exact top-r part (float32)
    assert all(0 < r["ratio_max"] < 1 for r in result["loftq"])
    assert (tmp_path / "init.md").read_text().startswith("# PiSSA init time")
