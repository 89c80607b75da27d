"""Adapter files are interchangeable with PEFT: lowrank -> PeftModel.from_pretrained and PEFT save_pretrained ->
lowrank.load_adapter give the same logits, on a tiny Llama (nn.Linear) and a tiny GPT-2 (Conv1D, fan_in_fan_out).

Models are built from configs (no downloads). Both libraries compute base(x) + scale * B(A(x)) in float32 with the
same weights; they differ only in where the scale is applied (PEFT after B, lowrank on the rank-r intermediate),
so logits agree to float32 rounding, not bit for bit.
"""

import copy
import json

import peft  # a `test` extra (pyproject.toml): missing it is an error, not a skip
import pytest
import torch
import torch.nn as nn
import transformers
from _helpers import randomize_adapters, tiny_llama

import lowrank

# PEFT calls a transformers API that transformers 5 deprecates; not ours to fix, and noise in every test here.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

# Float32 logits of magnitude ~1 after two blocks; the two scale placements differ by a few ulps per layer
# (measured max |diff| 1.8e-7 vs an adapter effect of 0.8): 1e-5 has margin and still catches any wrong scale.
ATOL = RTOL = 1e-5


def _llama():
    return tiny_llama().eval()


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def _tokens(vocab=128):
    return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model, tokens):
    return model(input_ids=tokens).logits.float()


def _randomize_adapters(model):
    """B starts at zero (adapter = identity); give A and B values that move the logits visibly (ours or PEFT's)."""
    return randomize_adapters(model, std_b=0.3, std_a=0.2)


def _lowrank_adapter(model):
    # Different r / alpha per layer: the file needs rank_pattern / alpha_pattern for PEFT to rebuild it.
    lowrank.inject(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8, rank_pattern={"down_proj": 2},
                   alpha_pattern={"down_proj": 6})  # fmt: skip
    _randomize_adapters(model)
    return model


@pytest.mark.parametrize("rslora", [False, True])
def test_lowrank_adapter_loads_in_peft_with_same_logits(tmp_path, rslora):
    base = _llama()
    ours = copy.deepcopy(base)
    if rslora:
        lowrank.inject(ours, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8, rslora=True,
                       rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 6})  # fmt: skip
        _randomize_adapters(ours)
    else:
        _lowrank_adapter(ours)
    tokens = _tokens()
    expected = _logits(ours, tokens)
    assert not torch.allclose(expected, _logits(base, tokens), atol=1e-2)  # the adapter matters
    lowrank.save_adapter(ours, tmp_path)

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    for name, layer in lowrank.lora_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert peft_layer.r["default"] == layer.r
        assert peft_layer.scaling["default"] == pytest.approx(layer.scale, rel=1e-12)
        torch.testing.assert_close(peft_layer.lora_A["default"].weight, layer.lora_A, rtol=0, atol=0)
        torch.testing.assert_close(peft_layer.lora_B["default"].weight, layer.lora_B, rtol=0, atol=0)
    n_peft = sum(1 for _, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert n_peft == len(list(lowrank.lora_layers(ours))) == 6  # 2 layers x (q, v, down), nothing more
    torch.testing.assert_close(_logits(theirs, tokens), expected, atol=ATOL, rtol=RTOL)


def test_peft_adapter_loads_in_lowrank_with_same_logits(tmp_path):
    base = _llama()
    config = peft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "gate_proj"],
        rank_pattern={"k_proj": 2}, alpha_pattern={"gate_proj": 3},
    )  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    _randomize_adapters(theirs)
    theirs.eval()
    tokens = _tokens()
    expected = _logits(theirs, tokens)
    theirs.save_pretrained(tmp_path)

    ours = lowrank.load_adapter(copy.deepcopy(base), tmp_path).eval()
    layers = dict(lowrank.lora_layers(ours))
    assert len(layers) == 6
    for name, layer in layers.items():
        leaf = name.rsplit(".", 1)[-1]
        assert (layer.r, layer.alpha) == {"q_proj": (4, 16), "k_proj": (2, 16), "gate_proj": (4, 3)}[leaf]
        assert layer.dropout_p == 0.1
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert layer.scale == pytest.approx(peft_layer.scaling["default"], rel=1e-12)
        torch.testing.assert_close(layer.lora_B, peft_layer.lora_B["default"].weight, rtol=0, atol=0)
    torch.testing.assert_close(_logits(ours, tokens), expected, atol=ATOL, rtol=RTOL)


def test_peft_state_dict_keys_with_adapter_name_segment(tmp_path):
    """PEFT's in-memory state dict has '.default.' in the keys; files written from it must load too."""
    base = _llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"]))
    _randomize_adapters(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in theirs.state_dict().items() if "lora_" in k}
    assert all(".default.weight" in k for k in state)
    save_file(state, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    tokens = _tokens()
    ours = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_logits(ours, tokens), _logits(theirs, tokens), atol=ATOL, rtol=RTOL)


def test_gpt2_conv1d_both_ways(tmp_path):
    """GPT-2's Conv1D keeps W as (in, out); A and B are in the nn.Linear orientation in both libraries."""
    base = _gpt2()
    tokens = _tokens()
    ours = copy.deepcopy(base)
    lowrank.inject(ours, ["c_attn", "c_proj"], r=4, alpha=8)  # c_proj: attention and MLP output, both Conv1D
    _randomize_adapters(ours)
    lowrank.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    expected = _logits(ours, tokens)
    torch.testing.assert_close(_logits(theirs, tokens), expected, atol=ATOL, rtol=RTOL)

    # The other way: a PEFT adapter with fan_in_fan_out=True, loaded into a fresh GPT-2.
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    )
    _randomize_adapters(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = lowrank.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert all(layer.fan_in_fan_out for _, layer in lowrank.lora_layers(ours))
    torch.testing.assert_close(_logits(ours, tokens), _logits(theirs, tokens), atol=ATOL, rtol=RTOL)


def test_merged_export_matches_peft_merge_and_unload(tmp_path):
    """save_merged's dense weights equal PEFT's merge_and_unload state dict (both sum W + scale * B @ A)."""
    base = _llama()
    ours = _lowrank_adapter(copy.deepcopy(base))
    lowrank.save_adapter(ours, tmp_path / "adapter")
    file = lowrank.save_merged(ours, tmp_path / "merged.safetensors")
    from safetensors.torch import load_file

    merged = load_file(file)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").merge_and_unload()
    reference = theirs.state_dict()
    assert set(merged) == set(reference)
    for key, value in reference.items():
        # PEFT merges in the base dtype (float32) with scale applied after B @ A: float32 rounding apart.
        torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=1e-5)
    restored = copy.deepcopy(base)
    restored.load_state_dict(merged, strict=True)
    tokens = _tokens()
    torch.testing.assert_close(_logits(restored, tokens), _logits(ours, tokens), atol=ATOL, rtol=RTOL)


def test_peft_modules_are_real_linear_layers():
    """Guard for the comparisons above: the tiny models' targets are nn.Linear (Llama) and Conv1D (GPT-2)."""
    assert isinstance(_llama().model.layers[0].self_attn.q_proj, nn.Linear)
    assert type(_gpt2().transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_mixed_conv1d_and_linear_model_loads_in_peft(tmp_path):
    """One config flag for two layer types: we write fan_in_fan_out=True, PEFT corrects it per layer type."""
    Conv1D = transformers.pytorch_utils.Conv1D

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.lin = Conv1D(20, 12), nn.Linear(20, 7)

        def forward(self, x):
            return self.lin(torch.tanh(self.conv(x)))

    base = Mixed()
    ours = copy.deepcopy(base)
    lowrank.inject(ours, ["conv", "lin"], r=3, alpha=5)
    _randomize_adapters(ours)
    lowrank.save_adapter(ours, tmp_path)
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert theirs.base_model.model.conv.fan_in_fan_out and not theirs.base_model.model.lin.fan_in_fan_out
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=ATOL, rtol=RTOL)
        assert (ours(x) - base(x)).abs().max() > 0.1


def test_peft_adapter_on_nf4_llama(tmp_path):
    """PEFT adapter -> lowrank.quantize(model) + load_adapter equals PEFT on the dequantized dense weights."""
    base = _llama()
    theirs_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    trained = peft.get_peft_model(copy.deepcopy(base), theirs_cfg)
    _randomize_adapters(trained)
    trained.save_pretrained(tmp_path)

    ours = lowrank.load_adapter(lowrank.quantize(copy.deepcopy(base)), tmp_path).eval()
    dequantized = copy.deepcopy(base)  # the same model with every NF4 weight replaced by its dense float32 value
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, lowrank.NF4Linear):
                target = dequantized.get_submodule(name.removesuffix(".base"))
                target.weight.copy_(module.dequantize_weight(torch.float32))
    reference = peft.PeftModel.from_pretrained(dequantized, tmp_path).eval()
    tokens = _tokens()
    torch.testing.assert_close(_logits(ours, tokens), _logits(reference, tokens), atol=ATOL, rtol=RTOL)
