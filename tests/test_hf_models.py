"""inject on tiny Hugging Face models built from configs: Llama (nn.Linear q_proj/v_proj), GPT-2 (Conv1D c_attn)."""

import pytest
import torch
import torch.nn as nn
import transformers
from _helpers import TINY_LLAMA, randomize_adapters, tiny_llama

import lowrank
from lowrank.testing import assert_matches_dense

VOCAB = TINY_LLAMA["vocab_size"]


def llama():
    return tiny_llama().eval()


def gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, pad_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": (llama, ["q_proj", "v_proj"]), "gpt2": (gpt2, ["c_attn"])}


def clone_sd(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def randomise_b(model):
    randomize_adapters(model, std_b=0.05)


def greedy(model, ids, n=4):
    return model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("arch", MODELS)
def test_full_lifecycle(arch):
    make, targets = MODELS[arch]
    model = make()
    sd0 = clone_sd(model)
    ids = torch.randint(1, VOCAB, (2, 9))
    base_logits = model(ids).logits
    base_gen = greedy(model, ids)

    lowrank.inject(model, targets, r=4, alpha=8.0)
    expected_type = transformers.pytorch_utils.Conv1D if arch == "gpt2" else nn.Linear
    layers = dict(lowrank.lora_layers(model))
    assert len(layers) == 2 * len(targets) and all(type(m.base) is expected_type for m in layers.values())
    assert torch.equal(model(ids).logits, base_logits)  # B = 0: exactly the base model
    assert torch.equal(greedy(model, ids), base_gen)

    # One training step moves the adapters and nothing else.
    before_step = clone_sd(model)
    model.train()
    # No weight decay: decay alone would move A although its first gradient is exactly zero (B = 0).
    opt = torch.optim.AdamW(lowrank.adapter_parameters(model), lr=1e-2, weight_decay=0.0)
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith(("lora_A", "lora_B")))
    opt.step()
    model.eval()
    sd = model.state_dict()
    assert set(sd) == set(before_step)
    changed = {k for k in sd if not torch.equal(sd[k], before_step[k])}
    assert changed == {f"{n}.lora_B" for n in layers}  # first step: grad A = 0 since B = 0; B moves

    randomise_b(model)
    adapted = model(ids).logits
    assert (adapted - base_logits).abs().max() > 1e-3
    assert_matches_dense(model, {"input_ids": ids})  # float32 default: normwise 1e-4
    adapted_gen = greedy(model, ids)
    # Every greedy choice wins by more than 1e-4, so logits that move by < 1e-5 (merging, below) cannot flip it.
    chosen = model(adapted_gen).logits[:, ids.shape[1] - 1 : -1].topk(2, dim=-1).values  # (batch, new, 2)
    assert (chosen[..., 0] - chosen[..., 1]).min() > 1e-4
    lowrank.merge(model)
    # float32 logits of size ~1 through 2 blocks: merging changes rounding only (a few 1e-7).
    torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=1e-5)
    assert torch.equal(greedy(model, ids), adapted_gen)  # generation (KV cache) runs on the merged weights
    with lowrank.disabled(model):
        assert torch.equal(model(ids).logits, base_logits)
    lowrank.unmerge(model)
    assert torch.equal(model(ids).logits, adapted)
    with lowrank.disabled(model):
        assert torch.equal(model(ids).logits, base_logits)

    lowrank.merge(model)
    lowrank.eject(model)
    assert not list(lowrank.lora_layers(model))
    sd = model.state_dict()
    assert list(sd) == list(sd0) and all(torch.equal(sd[k], sd0[k]) for k in sd0)  # bit-identical
    assert torch.equal(greedy(model, ids), base_gen)


def test_gpt2_error_names_its_linear_layers():
    model = gpt2()
    sd0 = clone_sd(model)
    # The seed article's example targets q_proj / v_proj on GPT-2, which has neither.
    with pytest.raises(ValueError, match=r"matched no module of GPT2LMHeadModel.*'c_attn', 'c_proj', 'c_fc'"):
        lowrank.inject(model, ["q_proj", "v_proj"])
    assert list(model.state_dict()) == list(sd0) and not list(lowrank.lora_layers(model))


def test_all_linear_skips_the_head_unless_named():
    model = llama()
    lowrank.inject(model, "all-linear", r=2)
    names = [n for n, _ in lowrank.lora_layers(model)]
    assert len(names) == 2 * 7 and "lm_head" not in names  # q k v o gate up down per layer
    model = gpt2()  # tied head: merging would write into the input embedding or untie them: refused (lowrank.tied)
    wte = model.transformer.wte.weight.detach().clone()
    lowrank.inject(model, ["lm_head"])
    randomise_b(model)
    with pytest.raises(ValueError, match=r"lm_head: its weight is the same Parameter as \['transformer.wte.weight'\]"):
        lowrank.merge(model)
    assert torch.equal(model.transformer.wte.weight, wte) and not model.lm_head.merged
    lowrank.eject(model)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_checkpoint_names_survive_save_pretrained(tmp_path):
    model = llama()
    sd0 = clone_sd(model)
    lowrank.inject(model, ["q_proj", "v_proj"], r=4)
    model.save_pretrained(tmp_path)
    # A plain from_pretrained of the full checkpoint finds every base weight under its original name (nested
    # ".base." names would leave q_proj/v_proj missing and silently re-initialised).
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert all(torch.equal(loaded.state_dict()[k], sd0[k]) for k in sd0)


def test_bf16_llama_keeps_float32_adapters():
    model = llama().to(torch.bfloat16)
    lowrank.inject(model, ["q_proj", "v_proj"], r=4, alpha=8.0)
    randomise_b(model)
    assert all(p.dtype == torch.float32 for p in lowrank.adapter_parameters(model))
    ids = torch.randint(1, VOCAB, (2, 9))
    assert model(ids).logits.dtype == torch.bfloat16
    report = assert_matches_dense(model, {"input_ids": ids})  # bf16 default normwise 5e-2
    # bf16 through two blocks: the deviation is real but well under the tolerance.
    assert 0 < report.output_rel < 5e-2
