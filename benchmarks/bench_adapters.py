"""Mixed-adapter batches: cost of 1 / 2 / 4 / 8 distinct adapters in one batch, training and inference, vs PEFT.

    python benchmarks/bench_adapters.py            # SmolLM2-shaped 6-layer Llama, bf16, batch 8 x 64 (~2 min)
    python benchmarks/bench_adapters.py --quick    # tiny shape, seconds (the smoke test runs this)

Model: the SmolLM2-shaped Llama of bench_train (hidden 576, 6 layers, 49152-word tied head), 8 adapters
("default", "a1" .. "a7") of LoRA r=8 on every linear layer. Batch 8 x 64 tokens; with n distinct adapters row i
uses adapter i mod n.

* training: a full step (zero_grad, forward, LM loss, backward, AdamW over all adapters) with one adapter
  (``set_adapter``, no mixed batch) and with ``lowrank.mixed_batch`` over 1, 2, 4, 8 adapters;
* inference: the *adapter part* of a forward, its time minus the same model's forward with adapters disabled
  (the head dominates the whole), for lowrank's 8-adapter mixed batch and PEFT's ``adapter_names=`` forward
  (minus ``disable_adapter()``), in the same run.

All timings alternate between providers (benchmarks/common.py), medians of the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import nullcontext

import common
import torch
import train_models

R, ALPHA = 8, 16.0
NAMES = ["default"] + [f"a{i}" for i in range(1, 8)]


def rows_for(n: int, batch: int) -> list[str]:
    return [NAMES[i % n] for i in range(batch)]


def build_lowrank(shape: dict) -> torch.nn.Module:
    import lowrank

    model = train_models.build_base(shape, "cpu")
    for name in NAMES:
        lowrank.inject(model, "all-linear", r=R, alpha=ALPHA, adapter_name=name)
    with torch.no_grad():  # B = 0 would make every adapter the same function; give each its own values
        for p in lowrank.adapter_parameters(model):
            p.normal_(0, 0.02)
    return model


def build_peft(shape: dict) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    model = train_models.build_base(shape, "cpu")
    config = dict(r=R, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(model, LoraConfig(**config))
    for name in NAMES[1:]:
        model.add_adapter(name, LoraConfig(**config))
    return model


def training(shape: dict, repeats: int) -> list[dict]:
    import lowrank

    model = build_lowrank(shape)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(lowrank.adapter_parameters(model), lr=1e-4)

    lowrank.set_adapter(model, "default")

    def step(n: int | None):
        def run():
            opt.zero_grad(set_to_none=True)
            with nullcontext() if n is None else lowrank.mixed_batch(model, rows_for(n, shape["batch"])):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            opt.step()

        return run

    fns = {"one adapter (set_adapter)": step(None)} | {f"mixed, {n} adapters": step(n) for n in (1, 2, 4, 8)}
    common.progress(f"training: {len(fns)} variants x {repeats} rounds")
    times = common.time_alternating(fns, warmup=2, repeats=repeats)
    single = statistics.median(times["one adapter (set_adapter)"])
    return [
        {
            "case": name,
            "median_s": statistics.median(t),
            "min_s": min(t),
            "vs_one_adapter": statistics.median(t) / single,
        }
        for name, t in times.items()
    ]


def inference(shape: dict, repeats: int) -> list[dict]:
    import lowrank

    ours, theirs = build_lowrank(shape).eval(), build_peft(shape).eval()
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(1))
    rows = rows_for(8, shape["batch"])

    @torch.no_grad()
    def ours_mixed():
        with lowrank.mixed_batch(ours, rows):
            ours(input_ids=ids)

    @torch.no_grad()
    def ours_base():
        with lowrank.disabled(ours):
            ours(input_ids=ids)

    @torch.no_grad()
    def peft_mixed():
        theirs(input_ids=ids, adapter_names=rows)

    @torch.no_grad()
    def peft_base():
        with theirs.disable_adapter():
            theirs(input_ids=ids)

    fns = {"lowrank mixed": ours_mixed, "lowrank disabled": ours_base, "peft mixed": peft_mixed,
           "peft disabled": peft_base}  # fmt: skip
    common.progress(f"inference: {len(fns)} variants x {repeats} rounds")
    t = {k: statistics.median(v) for k, v in common.time_alternating(fns, warmup=2, repeats=repeats).items()}
    ours_part, peft_part = t["lowrank mixed"] - t["lowrank disabled"], t["peft mixed"] - t["peft disabled"]
    return [
        {"provider": "lowrank", "mixed_s": t["lowrank mixed"], "disabled_s": t["lowrank disabled"],
         "adapter_part_s": ours_part, "vs_peft": ours_part / peft_part},
        {"provider": "peft", "mixed_s": t["peft mixed"], "disabled_s": t["peft disabled"],
         "adapter_part_s": peft_part, "vs_peft": 1.0},
    ]  # fmt: skip


def plot(train_rows: list[dict], infer_rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.bar([r["case"].replace(" (set_adapter)", "\n(set_adapter)") for r in train_rows],
          [r["median_s"] for r in train_rows], color=["gray"] + ["tab:blue"] * 4)  # fmt: skip
    a.set_ylabel("training step (s, median)")
    a.set_title("lowrank: step time vs distinct adapters per batch")
    a.tick_params(axis="x", labelsize=7)
    b.bar([r["provider"] for r in infer_rows], [1000 * r["adapter_part_s"] for r in infer_rows],
          color=["tab:blue", "tab:orange"])  # fmt: skip
    b.set_ylabel("adapter part of the forward (ms)")
    b.set_title("8-adapter mixed inference: lowrank vs PEFT")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape, a few rounds (smoke test)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=str(common.RESULTS_DIR))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    shape = dict(train_models.TINY_SHAPE if args.quick else train_models.SMOLLM2_SHAPE)
    shape |= {"batch": 8, "seq": 16 if args.quick else 64}
    repeats = args.repeats or (2 if args.quick else 7)
    train_rows = training(shape, repeats)
    infer_rows = inference(shape, repeats)
    notes = (
        f"Shape: {shape['model']}, {shape['layers']} layers, batch {shape['batch']} x {shape['seq']}, bf16, "
        f"LoRA r={R} alpha={ALPHA:g} on all linear layers, 8 adapters. Training goal: mixed 8 adapters <= 1.25x "
        "one adapter. Inference goal: lowrank's adapter part <= 0.5x PEFT's (vs_peft column)."
    )
    name = "adapters_quick" if args.quick else "adapters"
    common.write_results(name + "_train", train_rows, ["case", "median_s", "min_s", "vs_one_adapter"],
                         "Mixed-adapter batches: training step", notes=notes, out_dir=args.out)  # fmt: skip
    common.write_results(name + "_inference", infer_rows,
                         ["provider", "mixed_s", "disabled_s", "adapter_part_s", "vs_peft"],
                         "Mixed-adapter batches: inference, adapter part", notes=notes, out_dir=args.out)  # fmt: skip
    plot(train_rows, infer_rows, f"{args.out}/{name}.png")
    for row in train_rows + infer_rows:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
