"""NF4 on CPU: per-weight dequantize / matmul, greedy decode and the QLoRA training step, lowrank vs bitsandbytes.

    python benchmarks/bench_cpu_nf4.py            # SmolLM2-135M shapes, 30 layers (~10 min on 2 busy cores)
    python benchmarks/bench_cpu_nf4.py --quick    # tiny model and shapes: checks the code path in seconds

Three parts, each timed with its providers alternating in one process (``common.time_alternating``, medians):

* ``micro``: one weight of each SmolLM2-135M shape (576x576 q/o, 192x576 k/v, 1536x576 gate/up, 576x1536 down),
  bf16, at M = 1 (decode), 4 and 512 (training batch 4 x 128) rows: ``dequantize`` alone and ``x W^T``, for
  lowrank's CPU path (``lowrank.nf4_cpu``), the torch reference (``LOWRANK_REFERENCE=1``), bitsandbytes
  (``dequantize_4bit`` / ``matmul_4bit``, and its packed AVX-512 GEMV that ``Linear4bit`` switches to in eval
  mode) and the dense bf16 ``F.linear``.
* ``decode``: greedy ``generate`` (KV cache) of ``--new-tokens`` tokens after an 8-token prompt, batch 1 and 4,
  on the SmolLM2-135M-shaped Llama (30 layers, random weights, bf16): lowrank QLoRA (NF4 + LoRA r=16 on every
  linear layer), the same model on the reference path, PEFT + bitsandbytes, lowrank LoRA on the dense bf16 base,
  and the dense bf16 model without adapters. tokens/s = batch * new tokens / time of the whole call.
* ``train``: one QLoRA step (zero_grad, forward, backward, AdamW; batch 4 x 128) with the models of
  ``train_models.py``: lowrank QLoRA (and the same model on the reference path), PEFT + bitsandbytes, and
  lowrank LoRA on the dense base.

The machine is shared: the load average before and after each part is recorded with the results.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import train_models  # noqa: E402

from lowrank import dispatch, nf4, nf4_cpu  # noqa: E402

SHAPES = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "gate/up 1536x576": (1536, 576),
          "down 576x1536": (576, 1536)}  # fmt: skip
TINY_SHAPES = {"tiny 64x128": (64, 128)}


def _load() -> float:
    return os.getloadavg()[0]


def _reference(fn):
    """``fn`` on the torch reference path (LOWRANK_REFERENCE=1 for the duration of the call)."""

    def run():
        with dispatch.override_settings(reference=True):
            return fn()

    return run


# ---- micro: one weight ----------------------------------------------------------------------------------------


def _bnb_weight(w: torch.Tensor):
    """bitsandbytes' NF4 of ``w`` (block 64, double quantization): (training layout, its state, eval layout,
    its state); the eval layout is what ``Linear4bit.forward`` converts to on CPU in eval mode."""
    import bitsandbytes.functional as BF

    packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    gemv_packed, gemv_state = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    gemv_packed, gemv_state = BF._convert_weight_packed_for_cpu(gemv_packed, gemv_state)
    return packed, state, gemv_packed, gemv_state


def _dequantizers(q, scratch, packed, state) -> dict:
    import bitsandbytes.functional as BF

    return {
        "lowrank": lambda: nf4_cpu._decode_into(q, scratch),
        "reference": lambda: nf4.dequantize(q, torch.bfloat16),
        "bnb": lambda: BF.dequantize_4bit(packed, state),
    }


def _matmuls(x, w, q, packed, state, gemv_packed, gemv_state) -> dict:
    import bitsandbytes as bnb

    return {
        "lowrank": lambda: dispatch.nf4_linear(x, q),
        "reference": _reference(lambda: dispatch.nf4_linear(x, q)),
        "bnb": lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state),
        "bnb gemv (eval)": lambda: bnb.matmul_4bit(x, gemv_packed, quant_state=gemv_state),
        "dense bf16": lambda: F.linear(x, w),
    }


def micro(shapes: dict, rows_m: list[int], args) -> list[dict]:
    rows = []
    for label, (n, k) in shapes.items():
        torch.manual_seed(0)
        w = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
        q = nf4.quantize(w, 64, True)
        packed, state, gemv_packed, gemv_state = _bnb_weight(w)
        scratch = nf4_cpu._scratch("bench", n * k, torch.bfloat16)
        times = common.time_alternating(_dequantizers(q, scratch, packed, state), args.warmup, args.micro_repeats)
        load = _load()
        for name, t in times.items():
            rows.append({"part": "dequantize", "weight": label, "M": None, "provider": name,
                         "median_ms": 1e3 * statistics.median(t), "load": load})  # fmt: skip
        for m in rows_m:
            x = torch.randn(m, k).to(torch.bfloat16)
            mm = _matmuls(x, w, q, packed, state, gemv_packed, gemv_state)
            with torch.no_grad():
                times = common.time_alternating(mm, warmup=args.warmup, repeats=args.micro_repeats)
            load = _load()
            for name, t in times.items():
                rows.append({"part": "matmul", "weight": label, "M": m, "provider": name,
                             "median_ms": 1e3 * statistics.median(t), "load": load})  # fmt: skip
        common.progress(f"micro {label}: done (load {load:.1f})")
    _ratios(rows, ("part", "weight", "M"), "median_ms", {"vs_bnb": "bnb", "vs_dense": "dense bf16"})
    return rows


def _ratios(rows: list[dict], group: tuple, value: str, peers: dict) -> None:
    """``peers`` {column: provider}: lowrank's ``value`` over that provider's in the same group (time: < 1 is
    faster)."""
    by = {}
    for r in rows:
        by.setdefault(tuple(r[g] for g in group), {})[r["provider"]] = r
    for providers in by.values():
        ours = providers.get("lowrank")
        for column, peer in peers.items():
            if ours is not None and peer in providers and providers[peer][value]:
                ours[column] = ours[value] / providers[peer][value]


# ---- decode and train: whole models ---------------------------------------------------------------------------


def _models(shape: dict, kinds: list[str]) -> dict:
    """name -> model for the decode part (eval mode, KV cache on)."""
    models = {}
    for name in kinds:
        model = train_models.build_base(shape, "cpu")
        if name in ("lowrank", "peft+bnb"):
            kind = "lowrank" if name == "lowrank" else "peft"
            train_models.quantize(model, kind, "cpu")
            model, _ = train_models.add_lora(model, kind, "all-linear")
        elif name == "lowrank lora":
            model, _ = train_models.add_lora(model, "lowrank", "all-linear")
        model.config.use_cache = True
        models[name] = model.eval()
    return models


def _generate(model, ids, attention, new_tokens: int):
    def run():
        with torch.no_grad():
            # use_cache: the models are built for training (config.use_cache False); without the KV cache every
            # step would recompute the whole sequence (what the 2026-12-01 results measured by mistake).
            return model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                  use_cache=True)  # fmt: skip

    return run


def decode(shape: dict, args) -> list[dict]:
    models = _models(shape, ["lowrank", "peft+bnb", "lowrank lora", "dense bf16"])
    rows = []
    for batch in args.decode_batches:
        ids = torch.randint(0, shape["vocab"], (batch, 8), generator=torch.Generator().manual_seed(1))
        attention = torch.ones_like(ids)

        fns = {name: _generate(model, ids, attention, args.new_tokens) for name, model in models.items()}
        fns["reference"] = _reference(fns["lowrank"])
        before = _load()
        times = common.time_alternating(fns, warmup=1, repeats=args.decode_repeats)
        load = (before + _load()) / 2
        for name, t in times.items():
            med = statistics.median(t)
            rows.append({"part": "decode", "batch": batch, "provider": name, "median_s": med,
                         "tokens_per_s": batch * args.new_tokens / med, "load": load})  # fmt: skip
        common.progress(f"decode batch {batch}: " + ", ".join(f"{r['provider']} {r['tokens_per_s']:.1f} tok/s"
                                                              for r in rows if r["batch"] == batch))  # fmt: skip
    for r in rows:  # tokens/s: the ratio is ours over the peer's, > 1 is faster
        peers = {p["provider"]: p for p in rows if p["batch"] == r["batch"]}
        if r["provider"] == "lowrank":
            r["vs_bnb"] = r["tokens_per_s"] / peers["peft+bnb"]["tokens_per_s"]
            r["vs_dense"] = r["tokens_per_s"] / peers["dense bf16"]["tokens_per_s"]
    del models
    return rows


def profile(shape: dict, args) -> list[dict]:
    """Where a decode token's time goes: torch.profiler self CPU time per op of one batch-1 ``generate`` (after a
    warm-up call), for lowrank QLoRA and PEFT + bitsandbytes; the ops above 1 % of each provider's total."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    models = _models(shape, ["lowrank", "peft+bnb"])
    ids = torch.randint(0, shape["vocab"], (1, 8), generator=torch.Generator().manual_seed(1))
    rows = []
    for name, model in models.items():
        run = _generate(model, ids, torch.ones_like(ids), args.new_tokens)
        run()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total):
            if e.self_cpu_time_total < 0.01 * total:
                break
            rows.append({"provider": name, "op": e.key, "calls_per_token": e.count / args.new_tokens,
                         "ms_per_token": e.self_cpu_time_total / 1e3 / args.new_tokens,
                         "share": e.self_cpu_time_total / total})  # fmt: skip
        common.progress(f"profile {name}: {total / 1e3 / args.new_tokens:.1f} ms of self CPU time per token")
    return rows


def train(shape: dict, args) -> list[dict]:
    keys = {"lowrank": ("qlora_all", "lowrank"), "peft+bnb": ("qlora_all", "peft+bnb"),
            "lowrank lora": ("lora_all", "lowrank")}  # fmt: skip
    steps = {}
    for name, key in keys.items():
        model, params = train_models.build_provider(key, shape, "cpu")
        steps[name] = train_models.make_step(model, params, shape, "cpu")
    steps["reference"] = _reference(steps["lowrank"])
    before = _load()
    times = common.time_alternating(steps, warmup=1, repeats=args.train_repeats)
    load = (before + _load()) / 2
    tokens = shape["batch"] * shape["seq"]
    rows = []
    for name, t in times.items():
        med = statistics.median(t)
        rows.append({"part": "train", "provider": name, "median_s": med, "tokens_per_s": tokens / med,
                     "spread": (max(t) - min(t)) / med, "load": load})  # fmt: skip
    _ratios(rows, ("part",), "median_s", {"vs_bnb": "peft+bnb", "vs_dense": "lowrank lora"})
    common.progress("train: " + ", ".join(f"{r['provider']} {r['median_s']:.2f} s" for r in rows))
    return rows


# ---- main -----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes and model, 1 repeat: checks the code path")
    p.add_argument(
        "--parts",
        nargs="+",
        default=["micro", "decode", "train"],
        choices=["micro", "decode", "train", "profile"],
        help="profile: writes cpu_nf4_profile.md",
    )
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 30, quick 2)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per call (default 32, quick 4)")
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--micro-repeats", type=int, default=None, help="default 15, quick 2")
    p.add_argument("--decode-repeats", type=int, default=None, help="default 3, quick 1")
    p.add_argument("--train-repeats", type=int, default=None, help="default 3, quick 1")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; quick: a temp dir)")
    args = p.parse_args(argv)
    q = args.quick
    args.layers = args.layers or (2 if q else train_models.SMOLLM2_LAYERS)
    args.new_tokens = args.new_tokens or (4 if q else 32)
    args.micro_repeats = args.micro_repeats or (2 if q else 15)
    args.decode_repeats = args.decode_repeats or (1 if q else 3)
    args.train_repeats = args.train_repeats or (1 if q else 3)
    args.warmup = 1 if q else args.warmup
    args.out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) if q else common.RESULTS_DIR)
    return args


COLUMNS = ["part", "weight", "M", "batch", "provider", "median_ms", "median_s", "tokens_per_s", "vs_bnb",
           "vs_dense", "load"]  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    env = common.environment("cpu")
    env["load_before"] = _load()
    shape = dict(train_models.TINY_SHAPE if args.quick else train_models.SMOLLM2_SHAPE, layers=args.layers)
    rows = []
    if "micro" in args.parts:
        rows += micro(TINY_SHAPES if args.quick else SHAPES, [1, 4, 512] if not args.quick else [1, 8], args)
    if "decode" in args.parts:
        rows += decode(shape, args)
    if "train" in args.parts:
        rows += train(shape, args)
    paths = {}
    if "profile" in args.parts:
        prof = profile(shape, args)
        paths["profile"] = common.write_results(
            "cpu_nf4_profile", prof, ["provider", "op", "calls_per_token", "ms_per_token", "share"],
            "NF4 on CPU: where a decode token's time goes (batch 1)", env=env, out_dir=args.out,
            notes=f"torch.profiler self CPU time of one greedy generate call ({args.new_tokens} new tokens, KV cache) "
                  "after a warm-up call; ops above 1 % of the provider's total.")  # fmt: skip
        if not rows:
            return paths
    env["load_after"] = _load()
    notes = (
        f"Model: {shape['model']} Llama, {shape['layers']} layers, bf16, NF4 block 64 + double quantization, LoRA "
        f"r={train_models.LORA['r']} on every linear layer but the head. Decode: {args.new_tokens} new tokens after "
        f"an 8-token prompt. `vs_bnb`: lowrank / bitsandbytes (time: < 1 is faster; decode tokens/s: > 1 is faster); "
        f"`vs_dense` the same against our LoRA on the dense bf16 base (train) or the dense bf16 model (decode). "
        f"`load`: 1-minute load average of the machine during the part ({os.cpu_count()} cores). "
        f"Load before {env['load_before']:.1f}, after {env['load_after']:.1f}."
    )
    json_path, md_path = common.write_results("cpu_nf4", rows, COLUMNS, "NF4 on CPU: lowrank vs bitsandbytes",
                                              env=env, notes=notes, out_dir=args.out)  # fmt: skip
    paths.update({"json": json_path, "markdown": md_path, "rows": rows})
    if train_models.have("matplotlib"):
        paths["plot"] = plot(rows, args.out / "cpu_nf4.png")
    common.progress(f"wrote {json_path}, {md_path}")
    return paths


def plot(rows: list[dict], path: Path) -> Path:
    """Decode tokens/s and training step time per provider (one panel each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    dec = [r for r in rows if r["part"] == "decode"]
    batches = sorted({r["batch"] for r in dec})
    providers = list(dict.fromkeys(r["provider"] for r in dec))
    width = 0.8 / max(len(providers), 1)
    for i, prov in enumerate(providers):
        vals = [next((r["tokens_per_s"] for r in dec if r["batch"] == b and r["provider"] == prov), 0) for b in batches]
        axes[0].bar([b + i * width for b in range(len(batches))], vals, width, label=prov)
    axes[0].set_xticks([b + 0.4 - width / 2 for b in range(len(batches))], [f"batch {b}" for b in batches])
    axes[0].set_ylabel("tokens / s (higher is better)")
    axes[0].set_title("greedy decode")
    axes[0].legend(fontsize=8)
    tr = [r for r in rows if r["part"] == "train"]
    axes[1].bar([r["provider"] for r in tr], [r["median_s"] for r in tr], color="tab:gray")
    axes[1].set_ylabel("seconds / step (lower is better)")
    axes[1].set_title("QLoRA training step, batch 4 x 128")
    axes[1].tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
