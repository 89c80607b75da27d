"""QLoRA on CPU: time to quantize a 135M-parameter model to NF4, and one QLoRA training step, against bitsandbytes.

    python benchmarks/bench_qlora_cpu.py                 # SmolLM2-135M-shaped Llama, 30 layers (~5 min, 2 cores)
    python benchmarks/bench_qlora_cpu.py --quick         # 2 layers, batch 2 x 32: checks the code path in seconds

The model is a Llama built from a SmolLM2-135M-shaped config (hidden 576, intermediate 1536, 30 layers, 9 heads,
3 kv heads, vocab 49152, tied embeddings; 134.5M parameters), random weights (no download). Every linear layer
but the head is quantized (NF4, block 64, double quantization), then LoRA r=16, alpha=32 goes on each of them.

Providers, side by side in one process:
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

import lowrank  # noqa: E402

SHAPE = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "tie_word_embeddings": True,
}
LORA = {"r": 16, "alpha": 32}


def build_model(layers: int, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(**{**SHAPE, "num_hidden_layers": layers})
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


def quantize_lowrank(model, compute_dtype):
    return lowrank.quantize(model, block_size=64, double_quant=True, compute_dtype=compute_dtype)


def quantize_bnb(model, compute_dtype):
    """Replace every linear layer but the head by bitsandbytes' Linear4bit (NF4, block 64, double quant)."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child_name != "lm_head":
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                        quant_storage=torch.uint8)  # fmt: skip
                new.load_state_dict(child.state_dict())
                setattr(module, child_name, new.to("cpu"))  # .to(device) quantizes
    return model


def add_lora_lowrank(model):
    lowrank.inject(model, "all-linear", r=LORA["r"], alpha=LORA["alpha"])
    return model, lowrank.adapter_parameters(model)


def add_lora_peft(model):
    import peft

    config = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear", lora_dropout=0.0)
    model = peft.get_peft_model(model, config)
    return model, [p for p in model.parameters() if p.requires_grad]


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
    layers = args.layers or (2 if args.quick else SHAPE["num_hidden_layers"])
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
    base = build_model(layers, dtype)
    n_params = sum(p.numel() for p in base.parameters())
    n_quant = sum(
        m.weight.numel() for n, m in base.named_modules() if type(m) is torch.nn.Linear and "lm_head" not in n
    )
    providers = {"lowrank": (quantize_lowrank, add_lora_lowrank)}
    if have_peer:
        providers["bnb+peft"] = (quantize_bnb, add_lora_peft)

    rows, models = [], {}
    for name, (quantize_fn, _) in providers.items():
        times = []
        for _ in range(args.repeats):
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            quantize_fn(model, dtype)
            times.append(time.perf_counter() - t0)
        models[name] = model
        common.progress(f"{name}: quantize median {statistics.median(times):.2f} s")
        rows.append({"provider": name, "quantize_s": statistics.median(times)})
    del base

    torch.manual_seed(1)
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, seq))
    steps, first_loss = {}, {}
    for name, (_, add_lora) in providers.items():
        model, params = add_lora(models[name])
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
        f"{n_quant / 1e6:.1f}M weights quantized (NF4, block 64, double quant); LoRA r={LORA['r']} on every "
        f"linear layer but the head. Medians of {args.repeats} (quantize: fresh copies; step: alternating)."
    )
    print(f"\n# {title}\n\n{common.markdown_table(rows, columns)}\n\n{notes}")
    if not args.quick:
        common.write_results("bench_qlora_cpu", rows, columns, title, notes=notes, out_dir=args.out)
    return rows


if __name__ == "__main__":
    main()
