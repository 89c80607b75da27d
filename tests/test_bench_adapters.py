"""Smoke test of benchmarks/bench_adapters.py on the tiny shape: the same code path as the full run, in seconds.

Checks what a reader of the results relies on: every row is written, the 8 adapters are distinct functions (a
mixed batch of 8 differs from one adapter), and the ratios are computed from the medians in the file.
"""

import json
import sys
from pathlib import Path

import peft  # noqa: F401  (the peer of the inference rows: a test extra, required)
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_adapters  # noqa: E402
import train_models  # noqa: E402


def test_quick_run_writes_consistent_rows(tmp_path):
    assert bench_adapters.main(["--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    train = json.loads((tmp_path / "adapters_quick_train.json").read_text())["rows"]
    assert [r["case"] for r in train] == ["one adapter (set_adapter)"] + [f"mixed, {n} adapters" for n in (1, 2, 4, 8)]
    single = train[0]["median_s"]
    assert all(abs(r["vs_one_adapter"] - r["median_s"] / single) < 1e-12 for r in train)
    infer = json.loads((tmp_path / "adapters_quick_inference.json").read_text())["rows"]
    ours, theirs = infer
    assert abs(ours["adapter_part_s"] - (ours["mixed_s"] - ours["disabled_s"])) < 1e-12
    assert abs(ours["vs_peft"] - ours["adapter_part_s"] / theirs["adapter_part_s"]) < 1e-12
    assert (tmp_path / "adapters_quick.png").stat().st_size > 0


def test_the_eight_adapters_are_distinct_functions():
    import lowrank

    shape = dict(train_models.TINY_SHAPE, batch=8, seq=5)
    model = bench_adapters.build_lowrank(shape).eval()
    ids = torch.randint(0, shape["vocab"], (8, 5))
    with torch.no_grad():
        lowrank.set_adapter(model, "default")
        one = model(input_ids=ids).logits.float()
        with lowrank.mixed_batch(model, bench_adapters.rows_for(8, 8)):
            mixed = model(input_ids=ids).logits.float()
    # Row 0 uses "default" in both; bf16 logits of size ~1, different summation order: a few bf16 ulps.
    torch.testing.assert_close(mixed[0], one[0], rtol=0, atol=0.05)
    assert all((mixed[i] - one[i]).abs().amax() > 0.05 for i in range(1, 8))  # the other rows: other adapters
