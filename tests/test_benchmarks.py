"""Smoke test of the training-step benchmark on a tiny Llama: the same code path as the full run, in seconds.

Checks the numbers a reader relies on: trainable-parameter counts against r * (in + out) per adapted layer,
frozen bytes against the NF4 size formula, every LoRA provider starting from the identical loss (B = 0), both
QLoRA providers training the same NF4 model, and the timing / memory / output helpers of `benchmarks/common.py`.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

# The peers are `test` extras (pyproject.toml): a missing one fails here, at import, instead of a benchmark that
# silently drops its rows (bench_train.available_entries skips the providers whose library is missing).
import bitsandbytes  # noqa: F401
import peft  # noqa: F401
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_train
import common

# The tiny shape of `--quick`: hidden 64, intermediate 128, 4 heads of 16, 2 kv heads, vocab 128, 2 layers.
H, I, KV, V, L = 64, 128, 32, 128, 2
LINEARS = {"q_proj": (H, H), "k_proj": (H, KV), "v_proj": (H, KV), "o_proj": (H, H),
           "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}  # fmt: skip
R = bench_train.LORA["r"]
EXPECTED_KEYS = set(bench_train.ENTRIES)  # every provider: the peers are installed (imported above)


def _lora_params(names) -> int:
    return L * sum(R * (LINEARS[n][0] + LINEARS[n][1]) for n in names)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--no-memory", "--out", str(out), "--warmup", "1", "--repeats", "1"]
    argv += ["--seqs", "8", "16", "--layer-counts", "1", "2"]
    return bench_train.main(argv)


def test_rows_are_well_formed(quick):
    payload = json.loads(Path(quick["json"]).read_text())
    rows = payload["rows"]
    assert {(r["scenario"], r["provider"]) for r in rows} == EXPECTED_KEYS
    for r in rows:
        assert (r["model"], r["layers"], r["seq"], r["batch"]) == ("tiny", L, 16, 2)
        assert r["median_s"] > 0 and math.isfinite(r["final_loss"])
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / r["median_s"], rel=1e-12)  # float round-off only
    env = payload["environment"]
    assert env["versions"]["torch"] == torch.__version__ and env["date_utc"] and "git_sha" in env
    md = Path(quick["markdown"]).read_text()
    assert md.count("\n| tiny |") == len(rows)  # one table line per row
    for axis, values in (("seq", {8, 16}), ("layers", {1, 2})):
        scaling = payload["scaling"][axis]
        assert {r[axis] for r in scaling} == values
        assert len(scaling) == len(values) * len(bench_train.SCALING_ENTRIES)


def test_plots_are_png(quick):
    for name in ("train_step.png", "train_scaling_seq.png", "train_scaling_layers.png"):
        assert (Path(quick["json"]).parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trainable_and_frozen_counts(quick):
    by = {(r["scenario"], r["provider"]): r for r in quick["rows"]}
    n_base = V * H + L * (sum(a * b for a, b in LINEARS.values()) + 2 * H) + H  # tied head, 2 norms per layer
    assert by[("full", "torch")]["trainable"] == n_base
    dense_bytes = 2 * n_base + 4 * (16 // 2)  # bf16 weights + the float32 rotary inv_freq buffer (head_dim / 2)
    for provider in ("lowrank", "peft"):
        assert by[("lora_qv", provider)]["trainable"] == _lora_params(["q_proj", "v_proj"])
        assert by[("lora_all", provider)]["trainable"] == _lora_params(LINEARS)
        assert by[("lora_all", provider)]["frozen_mb"] * 2**20 == dense_bytes
    # NF4 with double quantization: n/2 packed + n/64 uint8 absmax + float32 nested absmax and offset per layer;
    # each library may also keep its 16- and 256-entry float32 code books per layer (at most 1088 bytes each).
    ns = [a * b for a, b in LINEARS.values()] * L
    nf4 = sum(n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 for n in ns)
    other = 2 * (n_base - sum(ns)) + 4 * 8
    for provider in ("lowrank", "peft+bnb"):
        frozen = by[("qlora_all", provider)]["frozen_mb"] * 2**20
        assert other + nf4 <= frozen <= other + nf4 + 1088 * len(ns)
        assert by[("qlora_all", provider)]["trainable"] == _lora_params(LINEARS)


def test_providers_train_the_same_model():
    """Adapters start at B = 0, so every LoRA provider's first loss is the base model's, bit for bit."""
    shape = bench_train.TINY_SHAPE
    first, changed = {}, {}
    for key in EXPECTED_KEYS:
        model, params = bench_train.build_provider(key, shape, "cpu")
        before = [p.detach().clone() for p in params]
        step = bench_train.make_step(model, params, shape, "cpu")
        first[key] = float(step())
        changed[key] = any(not torch.equal(b, p) for b, p in zip(before, params, strict=False))
    assert all(changed.values()), changed  # the optimizer moved some trainable parameter in every provider
    dense = {k: v for k, v in first.items() if k[0] != "qlora_all" and k != ("dora_all", "peft")}
    assert len(set(dense.values())) == 1, dense  # adding a zero update is exact in bf16 (our DoRA: m / n == 1)
    # PEFT's DoRA computes the norm in bf16 at init and again in the forward: m / n is 1 up to bf16 rounding.
    assert abs(first[("dora_all", "peft")] - first[("full", "torch")]) < 5e-3
    qlora = [v for k, v in first.items() if k[0] == "qlora_all"]
    # the same NF4 bytes and bf16 matmuls (measured: identical); allow one bf16 rounding apart in the loss of ~4.9
    assert max(qlora) - min(qlora) < 5e-3
    # the layers really are quantized (the loss moves), by NF4's small error (measured 2e-4 on this model)
    assert 0 < abs(qlora[0] - first[("full", "torch")]) < 2e-2


def test_memory_worker_counts_the_training_state():
    """A fresh process's training memory holds at least weights, gradients and two AdamW moments (bf16 each)."""
    shape = dict(bench_train.TINY_SHAPE, vocab=8192, hidden=256, intermediate=512)
    mem = bench_train.measure_memory(("full", "torch"), shape, "cpu", steps=1)
    n = 8192 * 256 + 2 * (256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 512 + 2 * 256) + 256
    assert mem["train_bytes"] >= 8 * n
    assert mem["peak_bytes"] > mem["train_bytes"]  # the peak also holds the interpreter and libraries
    assert math.isfinite(mem["losses"][0])


def test_time_alternating_interleaves_providers():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = common.time_alternating(fns, warmup=1, repeats=3)
    assert calls == list("abc" + "abc" + "bca" + "cab")  # warm-up, then each round rotated by one
    assert [len(t) for t in times.values()] == [3, 3, 3] and min(min(t) for t in times.values()) >= 0


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak reset needs Linux /proc")
def test_peak_memory_window():
    common.reset_peak_memory()
    start = common.rss_bytes()
    x = torch.ones(16 * 2**20)  # 64 MiB, touched
    high = common.peak_memory_bytes()
    assert high - start >= 60 * 2**20  # 64 MiB minus slack for pages already mapped before the allocation
    del x
    assert common.reset_peak_memory()
    assert common.peak_memory_bytes() < high - 48 * 2**20  # torch unmaps a freed 64 MiB block; the window restarts


def test_write_results_round_trips(tmp_path):
    rows = [{"provider": "lowrank", "median_s": 0.5, "trainable": 1234567}, {"provider": "peft", "median_s": None}]
    json_path, md_path = common.write_results("x", rows, ["provider", "median_s", "trainable"], "T", out_dir=tmp_path)
    assert json.loads(json_path.read_text())["rows"] == rows
    md = md_path.read_text()
    assert "| lowrank | 0.5 | 1,234,567 |" in md and "| peft | - | - |" in md and md.startswith("# T\n")


def test_nf4_kernel_benchmark_smoke_run_in_the_interpreter(tmp_path):
    """`bench_nf4.py --smoke --quick` (what benchmarks/gpu_check.sh runs with GPU_CHECK_SMOKE=1) in Triton's CPU
    interpreter: every case runs (the script records a raising case and exits 1) and the results files hold one
    row per (op, M, provider) with a measured time. A fresh process: TRITON_INTERPRET must be set before triton
    is imported (see tests/kernels/_interpreter.py); run outside the repo root, whose kernels/ folder would
    shadow Hugging Face's `kernels` package."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(BENCH / "bench_nf4.py"), "--smoke", "--quick", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    payload = json.loads((tmp_path / "bench_nf4.json").read_text())
    assert payload["failures"] == [] and payload["environment"]["interpreter"] is True
    rows = payload["rows"]
    assert all((r["N"], r["K"]) == (48, 128) and r["ms"] > 0 and math.isfinite(r["ms"]) for r in rows)
    providers = {}
    for r in rows:
        providers.setdefault((r["op"], r.get("M")), set()).add(r["provider"])
    assert providers.pop(("dequant", None)) == {"ours", "ours_load"}  # the two code-book lookups
    assert providers.pop(("lora_decode", 1)) == providers.pop(("lora_decode", 16)) == {"unfused", "fused"}
    for op in ("forward", "grad_x"):  # the smoke shapes: M = 1 (split-K) and M = 17 (one row tile more)
        for m in (1, 17):
            assert {"torch_bf16", "fused", "dequant"} <= providers.pop((op, m)), (op, m)
    assert providers == {}, providers  # nothing else
    lora = [r for r in rows if r["op"] == "lora_decode" and r["provider"] == "fused"]
    assert all(r["r"] == 16 and r["speedup_vs_unfused"] > 0 for r in lora)
    md = (tmp_path / "bench_nf4.md").read_text()
    assert md.count("\n| lora_decode |") == 4 and "SMOKE RUN" in md
