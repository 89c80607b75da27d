"""Smoke test of benchmarks/bench_cpu_nf4.py --quick: every part runs, rows are well formed, ratios are consistent."""

import json
import sys
from pathlib import Path

import bitsandbytes  # noqa: F401  (a `test` extra: the peer rows must exist)
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_cpu_nf4


def test_quick_run_writes_every_part(tmp_path):
    out = bench_cpu_nf4.main(["--quick", "--out", str(tmp_path), "--decode-batches", "1"])
    rows = json.loads(Path(out["json"]).read_text())["rows"]
    parts = {r["part"] for r in rows}
    assert parts == {"dequantize", "matmul", "decode", "train"}
    decode = {r["provider"]: r for r in rows if r["part"] == "decode"}
    assert set(decode) == {"lowrank", "reference", "peft+bnb", "lowrank lora", "dense bf16"}
    ours = decode["lowrank"]
    assert ours["tokens_per_s"] == pytest.approx(4 / ours["median_s"], rel=1e-12)  # batch 1 x 4 new tokens
    assert ours["vs_bnb"] == pytest.approx(ours["tokens_per_s"] / decode["peft+bnb"]["tokens_per_s"], rel=1e-12)
    train = {r["provider"]: r for r in rows if r["part"] == "train"}
    assert set(train) == {"lowrank", "reference", "peft+bnb", "lowrank lora"}
    assert train["lowrank"]["vs_dense"] == pytest.approx(
        train["lowrank"]["median_s"] / train["lowrank lora"]["median_s"], rel=1e-12
    )
    assert all(r["median_ms" if r["part"] in ("dequantize", "matmul") else "median_s"] > 0 for r in rows)
    assert Path(out["plot"]).stat().st_size > 0


def test_quick_profile_part(tmp_path):
    out = bench_cpu_nf4.main(["--quick", "--out", str(tmp_path), "--parts", "profile"])
    rows = json.loads(Path(out["profile"][0]).read_text())["rows"]
    for provider in ("lowrank", "peft+bnb"):
        mine = [r for r in rows if r["provider"] == provider]
        assert mine and all(0.01 <= r["share"] <= 1 for r in mine)
        assert sum(r["share"] for r in mine) <= 1 + 1e-9  # shares of one total
    assert not (tmp_path / "cpu_nf4.json").exists()  # only the profile was asked for
