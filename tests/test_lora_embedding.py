"""LoRA on nn.Embedding (lowrank/lora_embedding.py) and tied embeddings (lowrank/tied.py).

References: the dense merged table ``E + scale * (B @ A)^T`` in float64 (an independent re-parametrisation), and
PEFT 0.21 (files and logits both ways, gradients). float32 model vs float64 reference through a 2-layer tiny
Llama: 1e-5 covers float32 rounding of O(1) activations (the update is O(1) too, so the check is not vacuous).
"""

import copy
import warnings

import peft
import pytest
import torch
import transformers
from _helpers import assert_unchanged, snapshot, tiny_llama
from torch import nn

import lowrank

TOL = {"atol": 1e-5, "rtol": 1e-5}  # float32 vs float64 through the tiny Llama


def _ids(vocab=128):
    return torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(5))


def _randomize(model):
    """Random A and B in every lowrank embedding adapter (B starts at 0), in parameter order."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lowrank.lora_layers(model):
            for adapter in layer.adapters.values():
                adapter.lora_A.normal_(0, 1, generator=g)
                adapter.lora_B.normal_(0, 0.3, generator=g)
    return model


def _dense(base, model, names=("default",), modules=("model.embed_tokens",)):
    """The float64 base model with each adapted table replaced by E + sum scale * (B A)^T (the head untouched)."""
    ref = copy.deepcopy(base).double()
    layers = dict(lowrank.lora_layers(model))
    for m in modules:
        emb = ref.get_submodule(m)
        table = emb.weight.detach().clone()
        for n in names:
            a = layers[m].adapters[n]
            table += a.scale * (a.lora_B.double() @ a.lora_A.double()).T
        emb.weight = nn.Parameter(table)  # a new Parameter: a tied head keeps the base table
    return ref


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


def test_forward_merge_unmerge_disable_eject_match_the_dense_table():
    base = tiny_llama()
    model = copy.deepcopy(base)
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    lowrank.inject(model, ["embed_tokens"], r=3, alpha=6)
    ids = _ids()
    torch.testing.assert_close(_logits(model, ids), _logits(base, ids).double(), **TOL)  # B = 0: unchanged
    _randomize(model)
    ref = _logits(_dense(base, model), ids)
    assert (ref - _logits(base, ids)).abs().max() > 0.1  # the update matters at this tolerance
    torch.testing.assert_close(_logits(model, ids), ref, **TOL)
    unmerged = _logits(model, ids)
    lowrank.merge(model)
    torch.testing.assert_close(_logits(model, ids), ref, **TOL)
    with lowrank.disabled(model):
        torch.testing.assert_close(_logits(model, ids), _logits(base, ids), rtol=0, atol=0)
    lowrank.unmerge(model)
    assert torch.equal(_logits(model, ids), unmerged)  # the original table came back
    lowrank.eject(model)
    assert all(torch.equal(v, sd0[k]) for k, v in model.state_dict().items())


def test_gradients_equal_the_dense_reparametrisation():
    base = tiny_llama()
    model = _randomize(lowrank.inject(copy.deepcopy(base), ["embed_tokens"], r=3, alpha=6))
    ids = _ids()
    adapter = model.model.embed_tokens.adapters["default"]
    model(ids).logits.square().mean().backward()
    # Reference: autograd on E + scale * (B A)^T in float64, through the same (frozen) model.
    ref = copy.deepcopy(base).double().requires_grad_(False)
    a = adapter.lora_A.detach().double().requires_grad_()
    b = adapter.lora_B.detach().double().requires_grad_()
    table = ref.model.embed_tokens.weight + adapter.scale * (b @ a).T
    h = nn.functional.embedding(ids, table)
    ref(inputs_embeds=h).logits.square().mean().backward()
    torch.testing.assert_close(adapter.lora_A.grad.double(), a.grad, **TOL)
    torch.testing.assert_close(adapter.lora_B.grad.double(), b.grad, **TOL)
    assert a.grad.abs().max() > 1e-4 and b.grad.abs().max() > 1e-4


def test_several_adapters_and_mixed_batch():
    base = tiny_llama()
    model = lowrank.inject(copy.deepcopy(base), ["embed_tokens"], r=2, alpha=4)
    lowrank.inject(model, ["embed_tokens"], r=3, alpha=3, adapter_name="b")
    _randomize(model)
    ids = _ids()
    lowrank.set_adapter(model, ["default", "b"])
    torch.testing.assert_close(_logits(model, ids), _logits(_dense(base, model, ("default", "b")), ids), **TOL)
    with lowrank.mixed_batch(model, ["b", None, "default"]):
        mixed = _logits(model, ids)
    for row, names in enumerate([("b",), (), ("default",)]):
        torch.testing.assert_close(mixed[row], _logits(_dense(base, model, names), ids)[row], **TOL)


def test_round_trip_and_peft_loads_our_file(tmp_path):
    base = tiny_llama()
    model = _randomize(lowrank.inject(copy.deepcopy(base), ["embed_tokens", "q_proj"], r=2, alpha=4))
    ids = _ids()
    expected = _logits(model, ids)
    lowrank.save_adapter(model, tmp_path)
    ours = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    assert type(ours.model.embed_tokens).__name__ == "LoRAEmbedding"
    torch.testing.assert_close(_logits(ours, ids), expected, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert isinstance(theirs.base_model.model.model.embed_tokens, peft.tuners.lora.Embedding)
    torch.testing.assert_close(_logits(theirs, ids), expected, **TOL)


def _peft_embedding_model(base, targets, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, **kw))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:  # PEFT's own layers, named by PEFT
                p.normal_(0, 0.5, generator=g)
    return pm


@pytest.mark.parametrize("tied", [False, True])
def test_peft_file_with_embedding_and_head_loads_with_same_logits_and_gradients(tmp_path, tied):
    base = tiny_llama(tie_word_embeddings=tied)
    theirs = _peft_embedding_model(base, ["embed_tokens", "lm_head", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path)  # save_embedding_layers="auto": also the base tables
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    stored = {"base_model.model.model.embed_tokens.base_layer.weight", "base_model.model.lm_head.base_layer.weight"}
    assert stored <= keys
    ours = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    ids = _ids()
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), **TOL)
    if tied:  # each module sees its own update only: the head's base matrix is still the embedding's table
        assert ours.lm_head.base.weight is ours.model.embed_tokens.base.weight
    ours(ids).logits.square().mean().backward()
    theirs(ids).logits.square().mean().backward()
    emb = theirs.base_model.model.model.embed_tokens
    torch.testing.assert_close(ours.model.embed_tokens.lora_A.grad, emb.lora_embedding_A["default"].grad, **TOL)
    torch.testing.assert_close(ours.model.embed_tokens.lora_B.grad, emb.lora_embedding_B["default"].grad, **TOL)


def test_stored_base_weight_must_equal_the_model(tmp_path):
    base = tiny_llama()
    theirs = _peft_embedding_model(base, ["embed_tokens"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path)
    other = tiny_llama()  # another random base: its table differs from the stored one
    snap = snapshot(other)
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.base_layer\.weight .*differs from the model's"):
        lowrank.load_adapter(other, tmp_path)
    assert_unchanged(other, snap)


def test_tied_llama_embedding_only_head_sees_base_and_merge_is_refused():
    base = tiny_llama(tie_word_embeddings=True)
    model = _randomize(lowrank.inject(copy.deepcopy(base), ["embed_tokens"], r=3, alpha=6))
    ids = _ids()
    ref = _dense(base, model)  # new table for the lookup only; the reference's head keeps the base matrix
    assert ref.lm_head.weight is not ref.model.embed_tokens.weight
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), **TOL)
    snap = snapshot(model)
    tie = r"model\.embed_tokens: its weight is the same Parameter as \['lm_head\.weight'\]"
    with pytest.raises(ValueError, match=tie):
        lowrank.merge(model)
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="tied weights"):
        lowrank.save_merged(model, "unused.safetensors")
    lowrank.eject(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_gpt2_wte_both_ways(tmp_path):
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=96,
                                                                n_positions=32)).eval()  # fmt: skip
    model = _randomize(lowrank.inject(copy.deepcopy(base), ["wte"], r=2, alpha=2))
    ids = _ids(96)
    lowrank.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_logits(theirs, ids), _logits(model, ids), **TOL)
    lowrank.eject(model)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_rank_above_vocab_is_refused_and_model_unchanged():
    model = tiny_llama(vocab_size=6)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="r=8 exceeds num_embeddings=6"):
        lowrank.inject(model, ["embed_tokens", "q_proj"], r=8)
    assert_unchanged(model, snap)
