"""lowrank.load_quantized / lowrank.from_pretrained against the independent route: transformers' own
from_pretrained (or a dense model's load_state_dict), then lowrank.quantize. Every comparison is exact (same bytes):
both routes round the same checkpoint values to the same dtype and quantize them with the same function."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from _helpers import TINY_LLAMA
from safetensors.torch import save_file
from torch import nn

import lowrank
from lowrank import loading

transformers = pytest.importorskip("transformers")  # the `test` extra installs it: never skipped in CI


def _llama(tie: bool, dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY_LLAMA, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).to(dtype)


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def _assert_same_model(ours: nn.Module, ref: nn.Module) -> None:
    """Same module types and layer settings, same state dict (keys in order, dtypes, bytes), same buffers
    (non-persistent ones included), same requires_grad flags and same train/eval mode."""
    assert [(n, type(m)) for n, m in ours.named_modules()] == [(n, type(m)) for n, m in ref.named_modules()]
    for (name, a), (_, b) in zip(ours.named_modules(), ref.named_modules(), strict=True):
        if isinstance(a, lowrank.NF4Linear):
            settings = ("dtype", "compute_dtype", "block_size", "double_quant", "from_conv1d", "training")
            assert [getattr(a, s) for s in settings] == [getattr(b, s) for s in settings], name
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert list(sd_ours) == list(sd_ref)
    for key in sd_ref:
        assert sd_ours[key].dtype == sd_ref[key].dtype, key
        assert torch.equal(sd_ours[key], sd_ref[key]), key
    buffers_ours, buffers_ref = dict(ours.named_buffers()), dict(ref.named_buffers())
    assert list(buffers_ours) == list(buffers_ref)
    for key in buffers_ref:
        assert buffers_ours[key].dtype == buffers_ref[key].dtype and torch.equal(buffers_ours[key], buffers_ref[key])
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == [
        (n, p.requires_grad) for n, p in ref.named_parameters()
    ]
    assert ours.training == ref.training


def _meta_state(model: nn.Module):
    """What a refused load must leave as it was: module types, tensor objects, all still on meta."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [(n, type(m)) for n, m in model.named_modules()], [(n, id(t), t.device.type) for n, t in tensors]


@pytest.mark.parametrize("tie", [True, False], ids=["tied-head", "untied-head"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_from_pretrained_equals_transformers_then_quantize_sharded(tmp_path, tie, dtype):
    _llama(tie, dtype).save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > 10
    assert len(list(tmp_path.glob("*.safetensors"))) > 5  # really sharded
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype, local_files_only=True)
    lowrank.quantize(ref)

    ours = lowrank.from_pretrained(tmp_path, dtype=dtype)

    _assert_same_model(ours, ref)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie  # tied weights stay one Parameter
    assert ours.model.rotary_emb.inv_freq.device.type == "cpu"  # recomputed, not left on meta
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 7))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)


def test_from_pretrained_default_dtype_is_the_config_dtype_like_transformers(tmp_path):
    _llama(tie=True, dtype=torch.bfloat16).save_pretrained(tmp_path)  # config.json records dtype bfloat16
    ref = lowrank.quantize(transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True))
    ours = lowrank.from_pretrained(tmp_path)
    assert ours.model.embed_tokens.weight.dtype == torch.bfloat16
    _assert_same_model(ours, ref)


def test_from_pretrained_gpt2_conv1d(tmp_path):
    _gpt2().save_pretrained(tmp_path)
    ref = lowrank.quantize(transformers.GPT2LMHeadModel.from_pretrained(tmp_path, local_files_only=True))
    ours = lowrank.from_pretrained(tmp_path)
    _assert_same_model(ours, ref)
    assert ours.transformer.h[0].attn.c_attn.from_conv1d
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)


def test_from_pretrained_without_quantize_equals_transformers(tmp_path):
    _llama(tie=False).save_pretrained(tmp_path, max_shard_size="40KB")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    ours = lowrank.from_pretrained(tmp_path, quantize=False)
    assert not any(isinstance(m, lowrank.NF4Linear) for m in ours.modules())
    _assert_same_model(ours, ref)


@pytest.mark.parametrize("as_list", [False, True], ids=["one-file", "list-of-files"])
def test_load_quantized_options_equal_load_then_quantize(tmp_path, as_list):
    """A user-built meta model, a plain safetensors file (or two), non-default targets / format / dtypes."""
    dense = _llama(tie=False)
    state = {k: v.contiguous() for k, v in dense.state_dict().items()}
    if as_list:
        keys = list(state)
        save_file({k: state[k] for k in keys[:10]}, tmp_path / "a.safetensors")
        save_file({k: state[k] for k in keys[10:]}, tmp_path / "b.safetensors")
        checkpoint = [tmp_path / "a.safetensors", str(tmp_path / "b.safetensors")]
    else:
        save_file(state, tmp_path / "w.safetensors")
        checkpoint = tmp_path / "w.safetensors"
    options = dict(targets=["q_proj", "down_proj", "lm_head"], exclude=r"model\.layers\.1\..*", block_size=128,
                   double_quant=False, compute_dtype=torch.float32)  # fmt: skip
    config = transformers.LlamaConfig(**TINY_LLAMA, tie_word_embeddings=False)
    ref = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)  # buffers stay float32
    ref.load_state_dict(state)  # copy_ rounds each float32 value to bfloat16
    ref = lowrank.quantize(ref, **options)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA, tie_word_embeddings=False))

    out = lowrank.load_quantized(model, checkpoint, dtype=torch.bfloat16, **options)

    assert out is model
    assert isinstance(model.lm_head, lowrank.NF4Linear) and isinstance(
        model.model.layers[1].self_attn.q_proj, nn.Linear
    )
    _assert_same_model(model, ref)


def test_load_quantized_tied_head_named_as_target_quantizes_head_keeps_embedding(tmp_path):
    """As lowrank.quantize does: the head becomes NF4 from the shared weight; the embedding stays dense."""
    _llama(tie=True).save_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    lowrank.quantize(ref, targets=["lm_head", "v_proj"])
    ours = lowrank.from_pretrained(tmp_path, targets=["lm_head", "v_proj"])
    assert isinstance(ours.lm_head, lowrank.NF4Linear) and isinstance(ours.model.embed_tokens, nn.Embedding)
    _assert_same_model(ours, ref)


def test_tied_weight_stored_twice_must_agree(tmp_path):
    state = {k: v.clone() for k, v in _llama(tie=True).state_dict().items()}  # holds lm_head.weight too
    assert "lm_head.weight" in state
    save_file(state, tmp_path / "same.safetensors")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA, tie_word_embeddings=True))
    lowrank.load_quantized(model, tmp_path / "same.safetensors")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])

    state["lm_head.weight"] = state["lm_head.weight"] + 1
    save_file(state, tmp_path / "differ.safetensors")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA, tie_word_embeddings=True))
    before = _meta_state(model)
    with pytest.raises(ValueError, match=r"lm_head\.weight .*differ\.safetensors.* tied to model\.embed_tokens"):
        lowrank.load_quantized(model, tmp_path / "differ.safetensors")
    assert _meta_state(model) == before


# ---- errors: named tensor and file, headers checked before data, the model left on meta ---------------------


def _meta_llama():
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA, tie_word_embeddings=False))


def _bad_checkpoint(tmp_path, change):
    state = {k: v.contiguous() for k, v in _llama(tie=False).state_dict().items()}
    change(state)
    save_file(state, tmp_path / "bad.safetensors")
    return tmp_path / "bad.safetensors"


def _set(key, value):
    return lambda state: state.__setitem__(key, value)


def _nan(key):
    def change(state):
        state[key] = state[key].clone()
        state[key].view(-1)[3] = float("nan")

    return change


HEADER_ERRORS = {
    "missing": (lambda s: s.pop("model.layers.0.mlp.up_proj.weight"), r"not in .*bad\.safetensors.*up_proj\.weight"),
    "unexpected": (_set("model.extra.weight", torch.ones(3)), r"not in the model: model\.extra\.weight \(.*bad"),
    "shape": (_set("model.layers.1.self_attn.k_proj.weight", torch.ones(32, 63)),
              r"k_proj\.weight in .*bad\.safetensors has shape \(32, 63\), the model expects \(32, 64\)"),
    "kind": (_set("model.norm.weight", torch.ones(64, dtype=torch.int32)), r"model\.norm\.weight in .*int32"),
}  # fmt: skip
DATA_ERRORS = {
    "nan-quantized": (_nan("model.layers.1.mlp.gate_proj.weight"), r"gate_proj\.weight in .*bad\.safetensors.*NaN"),
    "nan-dense": (_nan("model.embed_tokens.weight"), r"embed_tokens\.weight in .*bad\.safetensors holds 1 NaN"),
}


@pytest.mark.parametrize("case", [*HEADER_ERRORS, *DATA_ERRORS])
def test_bad_checkpoint_is_a_clear_error_and_the_model_stays_on_meta(tmp_path, monkeypatch, case):
    change, message = {**HEADER_ERRORS, **DATA_ERRORS}[case]
    path = _bad_checkpoint(tmp_path, change)
    opened = []
    real_open = loading._open
    monkeypatch.setattr(loading, "_open", lambda entry: opened.append(entry.name) or real_open(entry))
    model = _meta_llama()
    before = _meta_state(model)
    with pytest.raises(ValueError, match=message):
        lowrank.load_quantized(model, path)
    assert _meta_state(model) == before
    if case in HEADER_ERRORS:
        assert opened == []  # found from the header alone: no tensor data was read


def test_checkpoint_paths_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        lowrank.load_quantized(_meta_llama(), tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors.index.json nor model.safetensors"):
        lowrank.load_quantized(_meta_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        lowrank.from_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in _llama(tie=False).state_dict().items()}
    save_file({"model.norm.weight": state["model.norm.weight"]}, tmp_path / "a.safetensors")
    save_file(state, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match=r"model\.norm\.weight is in both .*a\.safetensors and .*b\.safetensors"):
        lowrank.load_quantized(_meta_llama(), [tmp_path / "a.safetensors", tmp_path / "b.safetensors"])


class _WithBuffers(nn.Module):
    """A non-HF model: one linear layer, a persistent buffer, and a non-persistent one (built on `device`)."""

    def __init__(self, buffer_device=None):
        super().__init__()
        self.proj = nn.Linear(64, 32)
        self.register_buffer("scale", torch.ones(32))
        self.register_buffer("table", torch.arange(4.0, device=buffer_device), persistent=False)


def test_non_hf_model_buffers(tmp_path):
    torch.manual_seed(0)
    dense = _WithBuffers()
    dense.scale.normal_()
    save_file(dense.state_dict(), tmp_path / "w.safetensors")

    with torch.device("meta"):  # a buffer the model computes and the checkpoint lacks, built on a real device
        model = _WithBuffers(buffer_device="cpu")
    lowrank.load_quantized(model, tmp_path / "w.safetensors", targets=["proj"])
    expected = lowrank.quantize(_copy_of(dense), targets=["proj"])
    assert torch.equal(model.table, torch.arange(4.0)) and torch.equal(model.scale, dense.scale)
    for key, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    with torch.device("meta"):  # the same buffer on meta: nothing can recompute it, so refuse before reading
        model = _WithBuffers()
    before = _meta_state(model)
    with pytest.raises(ValueError, match=r"buffer\(s\) table are on the meta device .*no _init_weights"):
        lowrank.load_quantized(model, tmp_path / "w.safetensors", targets=["proj"])
    assert _meta_state(model) == before


def _copy_of(model: _WithBuffers) -> _WithBuffers:
    copy = _WithBuffers()
    copy.load_state_dict(model.state_dict())
    return copy


def test_progress_bar_for_long_loads(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tqdm")
    save_file({k: v.contiguous() for k, v in _llama(tie=False).state_dict().items()}, tmp_path / "w.safetensors")
    lowrank.load_quantized(_meta_llama(), tmp_path / "w.safetensors")
    assert "load_quantized" not in capsys.readouterr().err  # a small checkpoint: no bar
    monkeypatch.setattr(loading, "_PROGRESS_BYTES", 0)
    lowrank.load_quantized(_meta_llama(), tmp_path / "w.safetensors")
    assert "load_quantized: 100%" in capsys.readouterr().err


def test_bench_load_quick(tmp_path):
    """The benchmark's smoke run: a tiny tied Llama (vocab 512, hidden 64, 2 layers), one fresh process per provider."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_load

    result = bench_load.main(["--quick", "--out", str(tmp_path)])
    rows = {r["provider"]: r for r in result["rows"]}
    assert list(rows) == ["lowrank", "hf_then_quantize", "bnb"]
    assert result["check"]["bit_identical"] and not result["check"]["differ"]
    # The NF4 size formula per layer: n/2 packed + n/64 absmax codes + 4 per 256 blocks + 4 (offset), for
    # q, o 64x64; k, v 32x64; gate, up, down 128x64; plus bf16 embedding 512x64, norms 5x64 and two float32
    # RoPE buffers of 8: 65536 + 2 * (2 * 2120 + 2 * 1064 + 3 * 4232) + 5 * 128 + 2 * 32 bytes.
    expected = 65536 + 2 * (2 * 2120 + 2 * 1064 + 3 * 4232) + 5 * 128 + 2 * 32
    assert rows["lowrank"]["model_bytes"] == rows["hf_then_quantize"]["model_bytes"] == expected
    for r in rows.values():
        assert r["load_s"] > 0 and r["peak_mib"] > 0 and r["bound_mib"] > r["model_mib"]
    assert Path(result["markdown"]).read_text().count("| tiny-llama |") == 3


class _Shared(nn.Module):
    """One linear layer reachable under two names (weight sharing by module), and a second plain one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 96)
        self.b = self.a
        self.c = nn.Linear(96, 32, bias=False)


def test_module_shared_under_two_names_stays_shared(tmp_path):
    torch.manual_seed(0)
    dense = _Shared()
    save_file({k: v for k, v in dense.state_dict().items() if not k.startswith("b.")}, tmp_path / "w.safetensors")
    expected = lowrank.quantize(dense)
    with torch.device("meta"):
        model = _Shared()
    lowrank.load_quantized(model, tmp_path / "w.safetensors", targets="all-linear")
    assert isinstance(model.a, lowrank.NF4Linear) and model.a is model.b  # as lowrank.quantize leaves it
    assert list(model.state_dict()) == list(expected.state_dict())
    for key, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
