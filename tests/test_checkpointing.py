"""Gradient checkpointing with adapters: HF's `model.gradient_checkpointing_enable()`, reentrant and not.

The reference is the same model's backward without checkpointing: recomputing a layer in the backward must give
the adapters exactly the gradients that keeping its activations gives (dropout masks included: checkpoint
replays the RNG state). The classic trap, reentrant checkpointing whose inputs do not require grad (the frozen
embeddings' output), is tested in both of its forms: it fails loudly in backward when nothing outside the
checkpointed blocks trains, and the demo's training loop turns the silent form (a trainable layer outside the
blocks keeps the loss differentiable while every checkpointed adapter gets no gradient) into an error.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from _helpers import randomize_adapters, tiny_llama

import lowrank

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import qlora_demo  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")


def _adapted_llama(method: str, dropout: float, targets=("q_proj", "v_proj")) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_llama(tie_word_embeddings=False)
    if method == "qlora":
        lowrank.quantize(model)
    lowrank.inject(model, list(targets), r=4, alpha=8, dropout=dropout)
    # B = 0 at init would make every gradient of A exactly zero: nothing to compare
    return randomize_adapters(model, std_b=0.2, std_a=0.2).train()


def _adapter_grads(model, ids) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)  # the same dropout masks in every run
    model(input_ids=ids, labels=ids).loss.backward()
    return {
        f"{name}.{part}": getattr(layer, part).grad.clone()
        for name, layer in lowrank.lora_layers(model)
        for part in ("lora_A", "lora_B")
    }


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointed_adapter_gradients_equal_the_plain_run(method, reentrant, dropout):
    model = _adapted_llama(method, dropout)
    checkpointed = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(2))  # odd length, batch 2
    expected = _adapter_grads(model, ids)

    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert all(layer.gradient_checkpointing for layer in checkpointed.model.layers)
    got = _adapter_grads(checkpointed, ids)

    assert got.keys() == expected.keys() and len(got) == 8
    for key in expected:
        assert expected[key].abs().sum() > 0, key  # a real signal, so equality means something
        # No tolerance: the recompute repeats the forward's CPU ops on the same values and replays the RNG for
        # dropout, so the gradients are bit-identical (measured); any difference means a different computation.
        assert torch.equal(got[key], expected[key]), key
    # Only the adapters received gradients; the frozen base stays gradient-free under checkpointing too.
    frozen = [n for n, p in checkpointed.named_parameters() if not p.requires_grad]
    assert frozen and all(checkpointed.get_parameter(n).grad is None for n in frozen)


def test_reentrant_trap_fails_loudly_in_backward():
    """Reentrant checkpointing with inputs that do not require grad (transformers < 5 without PEFT did not call
    enable_input_require_grads; `disable_input_require_grads` recreates that): every block's output is cut from
    the graph. With only checkpointed adapters training, the loss has no grad_fn and backward raises."""
    model = _adapted_llama("qlora", 0.0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        loss = model(input_ids=ids, labels=ids).loss
    with pytest.raises(RuntimeError, match="does not require grad"):
        loss.backward()
    assert all(p.grad is None for p in lowrank.adapter_parameters(model))

    model.enable_input_require_grads()  # the fix: the embeddings' output requires grad again
    got = _adapter_grads(model, ids)
    assert all(g.abs().sum() > 0 for g in got.values())


class _ByteTokenizer:
    """The few tokenizer calls the demo's training loop makes: ids = bytes mod 120, eos 127, pad 126."""

    chat_template, eos_token_id, pad_token_id = None, 127, 126

    def __call__(self, text, add_special_tokens=True):
        return type("Encoding", (), {"input_ids": [b % 120 for b in text.encode()]})()


def test_silent_trap_is_caught_by_the_demo_training_loop():
    """An adapter on the output head (outside the checkpointed blocks) keeps the loss differentiable, so the
    backward runs and the q/v adapters silently get no gradient; the demo's `train` refuses to go on."""
    model = _adapted_llama("lora", 0.0, targets=("q_proj", "v_proj", "lm_head"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    records = [{"prompt": f"order {i}", "answer": f"{i}|x"} for i in range(8)]
    before = {k: v.clone() for k, v in lowrank.adapter_state_dict(model).items()}
    with pytest.warns(UserWarning, match="None of the inputs"):
        with pytest.raises(RuntimeError, match=r"4 adapters got no gradient \(first: model.layers.0.self_attn.q_proj"):
            qlora_demo.train(model, _ByteTokenizer(), records, steps=2, progress=False)
    after = lowrank.adapter_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # refused before the first optimizer step

    model.enable_input_require_grads()
    losses = qlora_demo.train(model, _ByteTokenizer(), records, steps=2, progress=False)
    assert len(losses) == 2
    q = model.model.layers[0].self_attn.q_proj
    assert not torch.equal(q.lora_A.detach(), before["model.layers.0.self_attn.q_proj.lora_A"])
