"""Training step of LoRA on MoE experts stored as 3-D parameters: lowrank vs PEFT's target_parameters, on CPU.

    python benchmarks/bench_moe.py            # small Mixtral: 8 experts, top-2 (about a minute on 2 cores)
    python benchmarks/bench_moe.py --quick    # tiny shapes, seconds (the smoke test runs this)

Both adapt ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj`` of every layer with r = 8 (nothing else),
same seed, same batch, AdamW on the adapters. lowrank runs the routed tokens through per-expert low-rank matmuls
(``lowrank.moe_ops``); PEFT swaps each weight for ``W + B @ A`` (the dense (E, out, in) stack) for the forward and
then runs transformers' experts forward, either its eager loop or the ``grouped_mm`` default. Timing: medians of
alternating calls (common.time_alternating); memory: resident-set peak of one step per provider (CPU VmHWM).
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS_DIR,
    adamw_step,
    environment,
    peak_memory_bytes,
    progress,
    release_freed_memory,
    reset_peak_memory,
    time_alternating,
    write_results,
)

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
SHAPES = {
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_local_experts=8, vocab_size=1024,
                  num_attention_heads=4, num_key_value_heads=2, seq=256, batch=2),
    "tiny": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_local_experts=8, vocab_size=64,
                 num_attention_heads=4, num_key_value_heads=2, seq=16, batch=2),
}  # fmt: skip
R, ALPHA = 8, 16


def _model(shape: dict, experts_implementation: str):
    import transformers

    cfg = {k: v for k, v in shape.items() if k not in ("seq", "batch")}
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**cfg, num_experts_per_tok=2, max_position_embeddings=shape["seq"])
    )
    model.set_experts_implementation(experts_implementation)
    return model


def _providers(shape: dict) -> dict:
    import peft

    import lowrank

    base = _model(shape, "eager")
    ids = torch.randint(
        0, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(1)
    )
    ours = lowrank.inject(copy.deepcopy(base), [], target_parameters=TARGETS, r=R, alpha=ALPHA)
    out = {"lowrank": (ours, lowrank.adapter_parameters(ours))}
    for impl in ("eager", "grouped_mm"):
        model = copy.deepcopy(base)
        model.set_experts_implementation(impl)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[],
                                                            target_parameters=TARGETS))  # fmt: skip
        out[f"peft ({impl})"] = (pm, [p for p in pm.parameters() if p.requires_grad])
    return {name: (model, params, ids) for name, (model, params) in out.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-provider peak-memory step")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    shape_name = "tiny" if args.quick else "small"
    shape = SHAPES[shape_name]
    providers = _providers(shape)
    steps, losses, trainable = {}, {}, {}
    for name, (model, params, ids) in providers.items():
        model.train()
        steps[name] = adamw_step(model, params, ids)
        with torch.no_grad():
            losses[name] = float(model(input_ids=ids, labels=ids).loss)  # B = 0: every provider starts here
        trainable[name] = sum(p.numel() for p in params)
    progress(f"timing {list(steps)} ({shape_name}, {args.repeats} rounds)")
    times = time_alternating(steps, warmup=args.warmup, repeats=args.repeats)
    peaks = {}
    if not args.no_memory:
        for name, step in steps.items():  # one step each, the peak of that step alone
            release_freed_memory()
            if reset_peak_memory():
                step()
                peaks[name] = peak_memory_bytes()
    tokens = shape["batch"] * shape["seq"]
    med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    rows = [
        {
            "shape": shape_name,
            "provider": name,
            "median_s": med[name],
            "tokens_per_s": tokens / med[name],
            "vs_lowrank": med[name] / med["lowrank"],
            "peak_rss_mib": peaks[name] / 2**20 if name in peaks else None,
            "trainable": trainable[name],
            "initial_loss": losses[name],
        }
        for name in steps
    ]
    notes = (
        f"Shape: Mixtral, hidden {shape['hidden_size']}, intermediate {shape['intermediate_size']}, "
        f"{shape['num_local_experts']} experts top-2, {shape['num_hidden_layers']} layers, batch {shape['batch']} x "
        f"seq {shape['seq']}; LoRA r={R} on gate_up_proj and down_proj only. median_s: one AdamW training step, "
        "median of alternating rounds; vs_lowrank: time / lowrank's time (> 1: lowrank faster). peak_rss_mib: the "
        "process's resident-set peak during one step (includes the model and everything else in the process, "
        "so differences between rows are what matters). The machine is shared (2 cores, other jobs running): "
        "read ratios, not absolute times."
    )
    json_path, md_path = write_results(
        "moe" if not args.quick else "moe_quick",
        rows,
        ["shape", "provider", "median_s", "tokens_per_s", "vs_lowrank", "peak_rss_mib", "trainable", "initial_loss"],
        "LoRA on MoE experts (3-D parameters): training step, lowrank vs PEFT target_parameters (CPU)",
        env=environment(),
        notes=notes,
        extra={"times": times},
        out_dir=args.out,
    )
    progress(f"wrote {md_path}")
    return {"rows": rows, "json": str(json_path), "markdown": str(md_path)}


if __name__ == "__main__":
    main()
