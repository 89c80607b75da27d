"""Helpers shared by the test modules: the tiny Llama, adapter randomisation, and the "model unchanged" check.

Imported as ``_helpers``: under pytest's default "prepend" import mode the folder of tests/conftest.py (this
one) is on sys.path; ``tests/dist_worker.py`` runs as a script from this folder, which puts it there too.
(tests/kernels/ has its own ``_kernel_helpers.py``: a second ``_helpers`` module name would shadow this one.)
Nothing here imports transformers at import time (tiny_llama does, when called).
"""

from __future__ import annotations

import torch
from torch import nn

# The tiny Llama of the HF, PEFT, checkpointing, examples and distributed tests: 2 layers, hidden 64, 4 heads of
# 16, 2 KV heads, vocab 128. max_position_embeddings only sizes rotary caches: default RoPE gives the same numbers.
TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip


def tiny_llama(**overrides) -> nn.Module:
    """A ``LlamaForCausalLM`` of ``TINY_LLAMA`` (``overrides`` change or add config fields), in train mode, with
    weights from the global RNG: seed before calling when the values matter."""
    import transformers

    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**(TINY_LLAMA | overrides)))


def randomize_adapters(model: nn.Module, std_b: float, std_a: float | None = None, generator=None) -> nn.Module:
    """Draw every adapter's B (and A, when ``std_a`` is given) from N(0, std), in parameter order.

    B starts at zero, which makes every adapter's update exactly zero (and A's gradient too): random values make
    each adapter change the output. Works on lowrank models, a single ``LoRALinear``, and PEFT models (whose
    adapter parameters are named ``...lora_A.default.weight``); names like ``lora_gate`` are not adapters.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            parts = name.split(".")
            if "lora_B" in parts:
                p.normal_(0.0, std_b, generator=generator)
            elif "lora_A" in parts and std_a is not None:
                p.normal_(0.0, std_a, generator=generator)
    return model


def snapshot(model: nn.Module):
    """Everything a refused operation must leave unchanged: the state dict (keys in order), every parameter and
    buffer (including ones a state-dict hook hides), module types and merge states, requires_grad flags."""
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]},
        [(n, type(m), getattr(m, "merged", None)) for n, m in model.named_modules()],
        [(n, p.requires_grad) for n, p in model.named_parameters()],
    )


def assert_unchanged(model: nn.Module, snap) -> None:
    state, tensors, modules, flags = snapshot(model)
    assert modules == snap[2]
    assert flags == snap[3]
    for old, new in ((snap[0], state), (snap[1], tensors)):
        assert list(new) == list(old)
        changed = [k for k in old if not _same_tensor(old[k], new[k])]
        assert not changed, f"changed: {changed}"


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal with dtypes compared and NaN equal to NaN (a model with a NaN weight must equal itself)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool((a == b).logical_or_(a.isnan() & b.isnan()).all())
