"""merge_quantized and the error-minimising NF4 quantizers (lowrank.nf4_search), against independent references:
bitsandbytes' dequantizer for the bytes, float64 brute force for the scale search, the float64 sum
deq(Q0) + s B A for the merge target, and float64 output errors from the captured layer inputs."""

import bitsandbytes as bnb  # a `test` extra: missing it is an error, not a skip
import bitsandbytes.functional as F
import pytest
import torch
from _helpers import assert_unchanged, randomize_adapters, snapshot, tiny_llama

import lowrank
from lowrank import nf4
from lowrank.nf4_linear import NF4Linear
from lowrank.nf4_search import FACTORS, quantize_gptq, quantize_search

SHAPES = [(6, 40), (7, 33), (64, 192), (3, 70)]  # partial last blocks, rows crossing blocks, one exact fit


def _weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.05 + 0.01  # non-zero mean


def _block_sse(deq: torch.Tensor, w: torch.Tensor, block: int) -> torch.Tensor:
    """float64 squared error per block of the flattened tensors (the last block may be partial)."""
    d = (deq.double() - w.double()).reshape(-1).square()
    n_blocks = -(-d.numel() // block)
    return torch.nn.functional.pad(d, (0, n_blocks * block - d.numel())).view(n_blocks, block).sum(1)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_search_bytes_read_by_bitsandbytes_and_never_worse_than_round(shape, double_quant):
    w = _weight(shape)
    ours = quantize_search(w, 32, double_quant)
    n_blocks = -(-w.numel() // 32)
    assert ours.packed.shape == ((w.numel() + 1) // 2,) and ours.n_blocks == n_blocks
    # bitsandbytes dequantizes our bytes through its own prequantized loader: the same values, bit for bit.
    layer = NF4Linear(shape[-1], w.numel() // shape[-1], bias=False, block_size=32, double_quant=double_quant)
    if len(shape) == 2:
        layer._store(ours)
        sd = layer.state_dict()
        stats = {k[len("weight.") :]: v for k, v in sd.items() if k.startswith("weight.")}
        param = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, requires_grad=False, device="cpu")
        assert torch.equal(F.dequantize_4bit(param.data, param.quant_state), ours.dequantize())
    # Per block, the search's candidates include round's own scale (factor 1.0, same 8-bit code), so its squared
    # error cannot exceed round's: 1e-12 relative slack for float32 products summed in float64.
    plain = nf4.quantize(w, 32, double_quant)
    ours_sse, round_sse = _block_sse(ours.dequantize(), w, 32), _block_sse(plain.dequantize(), w, 32)
    assert bool((ours_sse <= round_sse * (1 + 1e-12) + 1e-30).all())
    assert ours_sse.sum() < 0.97 * round_sse.sum()  # measured 0.86-0.90 of round's on these shapes


def test_search_picks_the_float64_brute_force_minimum():
    """Without double quantization the candidates are exactly absmax * f: brute force in float64 (nearest code by
    argmin, not the midpoint table) finds the same per-block minimum."""
    w = _weight((16, 64), seed=3)
    q = quantize_search(w, 64, double_quant=False)
    blocks = w.double().view(-1, 64)
    code = nf4.NF4_CODE.double()
    best = torch.full((blocks.shape[0],), float("inf"), dtype=torch.float64)
    for f in FACTORS:
        s = (w.view(-1, 64).abs().amax(1) * f).double()  # the float32 candidate, then exact float64 math
        idx = (blocks / s[:, None]).clamp(-1, 1).unsqueeze(-1).sub(code).abs().argmin(-1)
        best = torch.minimum(best, (code[idx] * s[:, None] - blocks).square().sum(1))
    got = _block_sse(q.dequantize(), w, 64)
    torch.testing.assert_close(got, best, rtol=1e-6, atol=0)  # float32 product code * s vs float64: 1e-7 rel


@pytest.mark.parametrize("double_quant", [True, False])
def test_search_like_keeps_unchanged_bytes(double_quant):
    """Re-quantizing deq(Q0) with like=Q0 gives Q0's bytes back exactly (plain rounding drifts under double
    quantization: its new offset is the mean of the dequantized absmax)."""
    w = _weight((24, 64), seed=1)
    q0 = nf4.quantize(w, 64, double_quant)
    again = quantize_search(q0.dequantize(), 64, double_quant, like=q0)
    for name, t in q0.tensors().items():
        assert torch.equal(again.tensors()[name], t), name


def test_search_like_widens_the_nested_range_for_large_updates():
    """An update that doubles some block maxima does not fit the base's nested range: the search then also tries
    fresh nested statistics and keeps the better, so it stays no worse than round."""
    w = _weight((32, 64), seed=2)
    q0 = nf4.quantize(w, 64)
    bigger = q0.dequantize() * torch.linspace(1.0, 2.0, 32).unsqueeze(1)
    q = quantize_search(bigger, 64, like=q0)
    err = (q.dequantize() - bigger).norm() / bigger.norm()
    ref = (nf4.quantize(bigger, 64).dequantize() - bigger).norm() / bigger.norm()
    assert err <= ref * (1 + 1e-6)  # per block never worse (see above); float32 sums: 1e-6


def _correlated_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    return (torch.randn(n, d, generator=g) @ mix + 0.3 * torch.randn(n, d, generator=g)).double()


def test_gptq_with_identity_hessian_is_the_scale_search():
    """H = I: no feedback between columns, so GPTQ's bytes (blocks assembled column by column) equal the
    scale search's (blocks taken whole from the flat tensor)."""
    w = _weight((12, 128), seed=4)
    for dq in (True, False):
        a, b = quantize_gptq(w, torch.eye(128), 64, dq), quantize_search(w, 64, dq)
        assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in b.tensors())


def test_gptq_lowers_the_output_error():
    w = _weight((48, 128), seed=5)
    x = _correlated_inputs(512, 128)
    h = x.T @ x

    def out_err(q):
        return float(((q.dequantize().double() - w.double()) @ x.T).norm() / (w.double() @ x.T).norm())

    r, s, g = out_err(nf4.quantize(w)), out_err(quantize_search(w)), out_err(quantize_gptq(w, h))
    assert g < 0.9 * r and g < s  # measured: round 0.092, search 0.087, gptq 0.072


def _qlora(seed=0, std_b=0.02, **kw):
    torch.manual_seed(seed)
    model = tiny_llama().eval()
    lowrank.quantize(model)
    lowrank.inject(model, ["q_proj", "v_proj"], r=4, alpha=8, **kw)
    return randomize_adapters(model, std_b, generator=torch.Generator().manual_seed(seed + 1))


def _calib(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (4, 24), generator=g)} for _ in range(n)]


def _inputs(model, batches):
    """The adapted layers' inputs (tokens, in) in float64, captured with hooks: the reference for output errors."""
    xs, hooks = {}, []

    def capture(name):
        return lambda m, a: xs.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]).double())

    for name, layer in lowrank.lora_layers(model):
        hooks.append(layer.register_forward_pre_hook(capture(name)))
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in xs.items()}


@pytest.mark.parametrize("method", ["round", "search", "gptq"])
def test_merge_quantized_report_against_float64_target(method):
    model = _qlora()
    layers = dict(lowrank.lora_layers(model))
    # The target, independently: deq(Q0) + (alpha / r) * B @ A in float64.
    target = {
        n: layer.base.dequantize_weight(torch.float64)
        + (8 / 4) * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
        for n, layer in layers.items()
    }
    bases = {n: layer.base for n, layer in layers.items()}
    calib = _calib()
    xs = _inputs(model, calib)
    report = lowrank.merge_quantized(model, method=method, calibration=calib)
    assert report.method == method and [r.name for r in report.layers] == list(layers)
    assert not list(lowrank.lora_layers(model))
    for row in report.layers:
        new = model.get_submodule(row.name)
        assert type(new) is NF4Linear and not new.weight.requires_grad
        old = bases[row.name]
        assert (new.block_size, new.double_quant, new.dtype, new.compute_dtype) == (
            old.block_size, old.double_quant, old.dtype, old.compute_dtype)  # fmt: skip
        w = target[row.name]
        d = new.dequantize_weight(torch.float64) - w
        # target rounded to float32 before quantizing: 1e-6 relative
        assert row.error == pytest.approx(float(d.norm() / w.norm()), rel=1e-5)
        assert row.update == pytest.approx(
            float((w - old.dequantize_weight(torch.float64)).norm() / w.norm()), rel=1e-5
        )
        x = xs[row.name]
        assert row.output_error == pytest.approx(float((d @ x.T).norm() / (w @ x.T).norm()), rel=1e-5)
    assert "merge_quantized(method=" in str(report) and "mean" in str(report)


def test_gptq_merge_keeps_the_function_better_than_round():
    """On held-out token batches (not the calibration ones): the gptq-merged model's logits are closer to the
    unmerged QLoRA model's than round's, and search's weight error is below round's."""
    model = _qlora(std_b=0.01)
    ids = _calib(3, seed=9)
    with torch.no_grad():
        ref = torch.cat([model(**b).logits for b in ids]).double()
    merged = {}
    for method in ("round", "search", "gptq"):
        m = _qlora(std_b=0.01)  # the same model again (same seeds)
        merged[method] = lowrank.merge_quantized(m, method=method, calibration=_calib())
        with torch.no_grad():
            out = torch.cat([m(**b).logits for b in ids]).double()
        merged[method] = (merged[method], float((out - ref).norm() / ref.norm()))
    assert merged["gptq"][1] < merged["round"][1]  # measured 0.0030 vs 0.0036
    assert merged["search"][0].mean("error") < merged["round"][0].mean("error")


def test_default_method():
    assert lowrank.merge_quantized(_qlora()).method == "round"
    assert lowrank.merge_quantized(_qlora(), calibration=_calib(2)).method == "gptq"


def test_quantize_method_search_lowers_the_error():
    torch.manual_seed(0)
    model = tiny_llama()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    searched = lowrank.quantize(tiny_llama_copy(model), method="search")
    rounded = lowrank.quantize(tiny_llama_copy(model))
    for name, w in dense.items():
        if name == "lm_head":
            continue
        e_s = (searched.get_submodule(name).dequantize_weight() - w).norm()
        e_r = (rounded.get_submodule(name).dequantize_weight() - w).norm()
        assert e_s < e_r, name


def tiny_llama_copy(model):
    import copy

    return copy.deepcopy(model)


def test_bad_input_leaves_the_model_unchanged():
    plain = tiny_llama().eval()
    snap = snapshot(plain)
    with pytest.raises(ValueError, match="no LoRA layers"):
        lowrank.merge_quantized(plain)
    assert_unchanged(plain, snap)
    with pytest.raises(ValueError, match="method must be one of"):
        lowrank.quantize(plain, method="gptq")
    assert_unchanged(plain, snap)

    dense = lowrank.inject(tiny_llama().eval(), ["q_proj"], r=2)
    snap = snapshot(dense)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: the base is a Linear, not an NF4Linear"):
        lowrank.merge_quantized(dense)
    assert_unchanged(dense, snap)

    model = _qlora()
    snap = snapshot(model)
    for kwargs, match in [
        ({"method": "nearest"}, "method must be one of"),
        ({"method": "gptq"}, "needs calibration batches"),
        ({"method": "gptq", "calibration": []}, r"calibration batches \(0\) never reached"),
    ]:
        with pytest.raises(ValueError, match=match):
            lowrank.merge_quantized(model, **kwargs)
        assert_unchanged(model, snap)


def test_several_active_adapters_and_mixed_batches_are_refused():
    model = _qlora()
    lowrank.inject(model, ["q_proj", "v_proj"], r=2, adapter_name="other")
    lowrank.set_adapter(model, ["default", "other"])
    snap = snapshot(model)
    match = r"q_proj: merge_quantized folds exactly one active adapter, .*'default', 'other'"
    with pytest.raises(ValueError, match=match):
        lowrank.merge_quantized(model)
    assert_unchanged(model, snap)
    lowrank.set_adapter(model, "default")
    snap = snapshot(model)
    with lowrank.mixed_batch(model, ["default", "other"]):
        with pytest.raises(ValueError, match="a lowrank.mixed_batch is active"):
            lowrank.merge_quantized(model)
    assert_unchanged(model, snap)
    lowrank.merge_quantized(model)  # one active adapter: fine (the other is dropped with the LoRA layer)
    assert not list(lowrank.lora_layers(model))


def test_bench_merge_quantized_quick(tmp_path):
    """The benchmark script's --quick run (tiny random Llama): every row present, finite, and the files written."""
    import json
    import math
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_merge_quantized

    result = bench_merge_quantized.main(["--quick", "--out", str(tmp_path)])
    labels = [r["model"] for r in result["rows"]]
    assert labels[0].startswith("(a)") and labels[-1].startswith("(d)") and len(labels) == 5
    assert all(math.isfinite(r["loss"]) for r in result["rows"])
    payload = json.loads(Path(result["json"]).read_text())
    assert set(payload["reports"]) == {"round", "search", "gptq"} and len(payload["perplexity"]) == 3
    assert "merge_quantized(method='gptq')" in Path(result["markdown"]).read_text()
