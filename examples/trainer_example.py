"""The article's flow with Hugging Face's Trainer, lowrank in place of PEFT, on a local text file.

    python examples/trainer_example.py                          # QLoRA, SmolLM2-135M, examples/sample_corpus.txt
    python examples/trainer_example.py --method lora --text my_notes.txt --steps 100
    python examples/trainer_example.py --gradient-checkpointing # activations recomputed in the backward

Tokenize a text file into fixed-length blocks, wrap the model with lowrank (quantize + inject instead of PEFT's
get_peft_model), train with `TrainingArguments` + `Trainer.train`, then `generate`. Trainer's optimizer takes the
parameters that require grad, and `lowrank.inject` froze everything but the adapters, so only the adapters
train. Saving: Trainer's own checkpoints would hold the whole model, so `save_strategy="no"` and
`SaveAdapterCallback` writes the adapter files instead (every --save-steps steps and at the end); outside a
callback the equivalent call is `lowrank.save_adapter(model, "out/adapter")`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import lowrank

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qlora_demo import ALPHA, DROPOUT, RANK, TARGETS, load_model  # noqa: E402

HERE = Path(__file__).resolve().parent


def build_dataset(tokenizer, text: str, block_size: int) -> list[dict]:
    """Concatenate the tokens of `text` and cut them into blocks of `block_size` (the last partial block is
    dropped, as in the article's group_texts); labels equal the inputs (the model shifts them)."""
    ids = tokenizer(text).input_ids
    if len(ids) < block_size:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one block of {block_size}")
    blocks = [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
    return [
        {
            "input_ids": torch.tensor(b),
            "attention_mask": torch.ones(len(b), dtype=torch.long),
            "labels": torch.tensor(b),
        }
        for b in blocks
    ]


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class SaveAdapterCallback(_callback_base()):
    """Trainer callback that writes only the adapter (`lowrank.save_adapter`): every `every` optimizer steps to
    <path>/checkpoint-<step>/ (0: never) and at the end of training to <path>/."""

    def __init__(self, path: str | Path, every: int = 0):
        self.path, self.every = Path(path), every

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            lowrank.save_adapter(model, self.path / f"checkpoint-{state.global_step}")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        lowrank.save_adapter(model, self.path)


def _checkpointing_argument(enabled: bool) -> dict:
    """TrainingArguments' checkpointing switch: `activation_checkpointing` in transformers 5 (where
    `gradient_checkpointing` is a deprecated alias), `gradient_checkpointing` before."""
    if not enabled:
        return {}
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": True}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--text", default=str(HERE / "sample_corpus.txt"), help="the text file to train on")
    p.add_argument("--method", choices=["qlora", "lora"], default="qlora")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--loraplus-ratio", type=float, default=None, help="LoRA+: B learns this many times faster")
    p.add_argument("--save-steps", type=int, default=0, help="also save the adapter every N steps (0: at the end only)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--prompt", default="The lighthouse at Saint Aldric")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/trainer-example")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Train with Trainer; returns {"losses", "adapter", "generated", "generated_base", "optimized_parameters"
    (what Trainer's optimizer holds), "model"}."""
    from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

    args = parse_args(argv)
    set_seed(args.seed)
    cuda = torch.cuda.is_available()
    model, tokenizer = load_model(
        args.model,
        "cuda" if cuda else "cpu",
        torch.bfloat16 if cuda else torch.float32,
        quantize=args.method == "qlora",
    )  # NF4 while loading for a safetensors folder
    lowrank.inject(model, TARGETS, r=RANK, alpha=ALPHA, dropout=DROPOUT)  # in place of peft.get_peft_model
    print(lowrank.summary(model))
    dataset = build_dataset(tokenizer, Path(args.text).read_text(encoding="utf-8"), args.block_size)

    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=max(1, args.steps // 10),
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",  # the adapter callback saves; Trainer's checkpoints would hold the whole model
        report_to="none",
        bf16=cuda,
        use_cpu=not cuda,
        seed=args.seed,
        **_checkpointing_argument(args.gradient_checkpointing),
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=default_data_collator,
        callbacks=[SaveAdapterCallback(Path(args.out) / "adapter", args.save_steps)],
        # Our parameter groups (LoRA+ with --loraplus-ratio); None: Trainer builds its usual schedule around them.
        optimizers=(torch.optim.AdamW(lowrank.param_groups(model, args.lr, loraplus_ratio=args.loraplus_ratio)), None),
    )
    trainer.train()

    model.eval()
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
        with lowrank.disabled(model):
            out_base = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    generated = tokenizer.decode(out[0], skip_special_tokens=True)
    generated_base = tokenizer.decode(out_base[0], skip_special_tokens=True)
    print(f"\nwith the adapter: {generated!r}\nbase model:       {generated_base!r}")
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print(f"adapter written to {Path(args.out) / 'adapter'}")
    optimized = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    return {
        "losses": losses,
        "adapter": str(Path(args.out) / "adapter"),
        "generated": generated,
        "generated_base": generated_base,
        "optimized_parameters": optimized,
        "model": model,
    }


if __name__ == "__main__":
    main()
