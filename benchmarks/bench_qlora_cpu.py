"""QLoRA on CPU: time to quantize a 135M-parameter model to NF4, and one QLoRA training step, against bitsandbytes.

    python benchmarks/bench_qlora_cpu.py                 # SmolLM2-135M-shaped Llama, 30 layers (~5 min, 2 cores)
    python benchmarks/bench_qlora_cpu.py --quick         # 2 layers, batch 2 x 32: checks the code path in seconds

The model is a Llama built from a SmolLM2-135M-shaped config (hidden 576, intermediate 1536, 30 layers, 9 heads,
3 kv heads, vocab 49152, tied embeddings; 134.5M parameters), random weights (no download). Every linear layer
but the head is quantized (NF4, block 64, double quantization), then LoRA r=16, alpha=32 goes on each of them.

Providers, side by side in one process (the models and their preparation are those of ``train_models.py``):
- ``lowrank``: ``lowrank.quantize`` then ``lowrank.inject``;
- ``bnb+peft`` (when bitsandbytes and peft are installed): each ``nn.Linear`` replaced by bitsandbytes'
  ``Linear4bit`` (quantized when moved to the device, as transformers does), then ``peft.get_peft_model``.
Quantize time is the median over ``--repeats`` fresh copies of the model. A step is zero_grad + forward (causal
LM loss on the batch's own tokens) + backward + AdamW over the adapters, batch 4 x 128 tokens; the providers'
steps alternate (A B A B ...) so machine noise hits both alike. Also reported: bytes of the quantized weights
(bits per weight) and the largest difference between the two providers' initial losses (same NF4 weights up
to bitsandbytes' native nested-absmax rounding, B = 0: the losses should agree closely).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import train_models  # noqa: E402

import lowrank  # noqa: E402

KIND = {"lowrank": "lowrank", "bnb+peft": "peft"}  # provider -> the library train_models quantizes / adapts with


def quantized_bytes(model) -> int:
    total = 0
    for module in model.modules():
        if isinstance(module, lowrank.NF4Linear):
            total += module.nf4_weight().nbytes
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 layers, batch 2 x 32")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and compute")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-peer", action="store_true", help="skip bitsandbytes + peft")
    p.add_argument("--out", default=str(common.RESULTS_DIR))
    args = p.parse_args(argv)
    layers = args.layers or (2 if args.quick else train_models.SMOLLM2_LAYERS)
    batch, seq = (2, 32) if args.quick else (args.batch, args.seq)
    dtype = getattr(torch, args.dtype)
    have_peer = not args.no_peer
    if have_peer:
        try:
            import bitsandbytes  # noqa: F401
            import peft  # noqa: F401
        except ImportError:
            have_peer = False

    common.progress(f"building a {layers}-layer SmolLM2-135M-shaped Llama ({args.dtype})")
    shape = dict(train_models.SMOLLM2_SHAPE, layers=layers)
    base = train_models.build_base(shape, "cpu", dtype)
    n_params = sum(p.numel() for p in base.parameters())
    n_quant = sum(
        m.weight.numel() for n, m in base.named_modules() if type(m) is torch.nn.Linear and "lm_head" not in n
    )
    providers = ["lowrank", "bnb+peft"] if have_peer else ["lowrank"]

    rows, models = [], {}
    for name in providers:
        times = []
        for _ in range(args.repeats):
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            train_models.quantize(model, KIND[name], "cpu", dtype)
            times.append(time.perf_counter() - t0)
        models[name] = model
        common.progress(f"{name}: quantize median {statistics.median(times):.2f} s")
        rows.append({"provider": name, "quantize_s": statistics.median(times)})
    del base

    torch.manual_seed(1)
    ids = torch.randint(0, shape["vocab"], (batch, seq))
    steps, first_loss = {}, {}
    for name in providers:
        model, params = train_models.add_lora(models[name], KIND[name], "all-linear")
        steps[name] = common.adamw_step(model, params, ids)
        with torch.no_grad():
            first_loss[name] = model(input_ids=ids, labels=ids).loss.item()
    common.progress(f"timing {len(steps)} provider(s): {args.warmup} warm-up + {args.repeats} steps each")
    times = common.time_alternating(steps, warmup=args.warmup, repeats=args.repeats)
    for row in rows:
        name = row["provider"]
        row["step_s"] = statistics.median(times[name])
        row["tokens_per_s"] = batch * seq / row["step_s"]
        row["initial_loss"] = first_loss[name]
    ours = quantized_bytes(models["lowrank"])
    rows[0]["nf4_MB"] = ours / 1e6
    rows[0]["bits_per_weight"] = ours * 8 / n_quant
    if have_peer:
        rows[1]["quantize_vs_lowrank"] = rows[1]["quantize_s"] / rows[0]["quantize_s"]
        rows[1]["step_vs_lowrank"] = rows[1]["step_s"] / rows[0]["step_s"]

    columns = ["provider", "quantize_s", "step_s", "tokens_per_s", "initial_loss", "nf4_MB", "bits_per_weight",
               "quantize_vs_lowrank", "step_vs_lowrank"]  # fmt: skip
    title = (
        f"QLoRA on CPU: {n_params / 1e6:.1f}M-parameter Llama ({layers} layers), batch {batch} x {seq}, {args.dtype}"
    )
    notes = (
        f"{n_quant / 1e6:.1f}M weights quantized (NF4, block 64, double quant); LoRA r={train_models.LORA['r']} on "
        f"every linear layer but the head. Medians of {args.repeats} (quantize: fresh copies; step: alternating)."
    )
    print(f"\n# {title}\n\n{common.markdown_table(rows, columns)}\n\n{notes}")
    if not args.quick:
        common.write_results("bench_qlora_cpu", rows, columns, title, notes=notes, out_dir=args.out)
    return rows


if __name__ == "__main__":
    main()
