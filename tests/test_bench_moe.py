"""Smoke test of benchmarks/bench_moe.py --quick: same code path as the full run, tiny shapes."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_moe


def test_quick_run_rows(tmp_path):
    out = bench_moe.main(["--quick", "--no-memory", "--out", str(tmp_path), "--warmup", "0", "--repeats", "1"])
    rows = {r["provider"]: r for r in json.loads(Path(out["json"]).read_text())["rows"]}
    assert set(rows) == {"lowrank", "peft (eager)", "peft (grouped_mm)"}
    s = bench_moe.SHAPES["tiny"]
    e, h, i = s["num_local_experts"], s["hidden_size"], s["intermediate_size"]
    # r * (in + out) per expert, for gate_up (h -> 2i) and down (i -> h), per layer.
    expected = s["num_hidden_layers"] * e * bench_moe.R * ((h + 2 * i) + (i + h))
    for r in rows.values():
        assert r["trainable"] == expected and r["median_s"] > 0
        # B = 0 in every provider: the same model, so the same loss up to float32 op order.
        assert r["initial_loss"] == pytest.approx(rows["lowrank"]["initial_loss"], rel=1e-5)
    assert "| tiny | lowrank |" in Path(out["markdown"]).read_text()
