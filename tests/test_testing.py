"""lowrank.testing: the helpers must pass correct models and catch wrong ones, naming the layer."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _helpers import randomize_adapters
from transformers.pytorch_utils import Conv1D

import lowrank
from lowrank import LoRALinear
from lowrank.testing import assert_matches_dense, compare_with_dense, dense_equivalent


def model_with_adapters(dtype=torch.float32) -> nn.Sequential:
    conv = Conv1D(11, 9)
    nn.init.normal_(conv.bias)
    model = nn.Sequential(nn.Linear(6, 9), nn.GELU(), conv, nn.Tanh(), nn.Linear(11, 5, bias=False)).to(dtype)
    lowrank.inject(model, "all-linear", r=3, alpha=5.0, adapter_dtype=torch.float32)
    return randomize_adapters(model, std_b=0.2)


def test_dense_equivalent_is_a_plain_copy_with_the_same_outputs():
    model = model_with_adapters()
    x = torch.randn(4, 6)
    dense = dense_equivalent(model)
    assert [type(m) for m in dense] == [nn.Linear, nn.GELU, nn.Linear, nn.Tanh, nn.Linear]
    assert len(list(lowrank.lora_layers(model))) == 3  # the original is untouched
    assert dense[2].weight.shape == (11, 9)  # Conv1D's (in, out) weight is transposed back to (out, in)
    # float32 both ways; the dense weight was computed in float64 and rounded once: a few ulps.
    torch.testing.assert_close(dense(x), model(x), rtol=0, atol=1e-5)
    dense64 = dense_equivalent(model, torch.float64)
    assert dense64[0].weight.dtype == torch.float64
    w = model[0].base.weight.double() + 5.0 / 3 * (model[0].lora_B.double() @ model[0].lora_A.double())  # alpha / r
    assert torch.equal(dense64[0].weight, w)  # exactly W0 + scale * B @ A in float64
    lowrank.merge(model)
    assert torch.equal(dense_equivalent(model, torch.float64)[0].weight, w)  # merge state does not matter


def test_correct_model_passes_with_small_deviations():
    model = model_with_adapters()
    report = assert_matches_dense(model, torch.randn(4, 6))
    assert set(report.layers) == {"0", "2", "4"}
    # float32 against float64 on widths <= 11: a few float32 ulps, far below the 1e-4 default.
    assert 0 < report.worst_rel < 1e-5
    assert "output: abs" in str(report) and "2: grad A abs" in str(report)


class ScaleTwice(LoRALinear):
    """A plausible bug: the update is scaled twice."""

    def forward(self, x):
        return self.base(x) + self.scale**2 * F.linear(F.linear(x, self.lora_A), self.lora_B)


class DetachedA(LoRALinear):
    """A bug invisible in the forward: A gets no gradient."""

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A.detach()), self.lora_B)


@pytest.mark.parametrize("bug,what", [(ScaleTwice, "output"), (DetachedA, "grad A")])
def test_a_wrong_layer_is_caught_and_named(bug, what):
    model = model_with_adapters()
    good = model[2]
    model[2] = bug(good.base, r=3, alpha=5.0)
    model[2].load_state_dict(good.state_dict())
    report = compare_with_dense(model, torch.randn(4, 6))
    with pytest.raises(AssertionError, match="deviates from its dense equivalent"):
        assert_matches_dense(model, torch.randn(4, 6))
    if what == "output":
        assert report.output_rel > 0.1
    else:
        assert report.output_rel < 1e-5  # forward is right...
        assert report.layers["2"].grad_A_rel == 1.0  # ...but its grad A is all zero (deviation = |ref|)
        assert report.layers["0"].worst_rel < 1e-5 and report.layers["4"].worst_rel < 1e-5
        assert str(report).splitlines()[2].startswith("  2: ")  # worst layer listed first


def test_user_grads_and_modes_are_left_alone_and_inputs_forms():
    model = model_with_adapters()
    model[0].lora_A.grad = torch.full_like(model[0].lora_A, 7.0)
    model.train()
    model[1].eval()
    x = torch.randn(3, 6)
    compare_with_dense(model, x)
    compare_with_dense(model, (x,))
    compare_with_dense(model, x, loss_fn=lambda out: out.pow(2).sum())
    assert torch.equal(model[0].lora_A.grad, torch.full_like(model[0].lora_A, 7.0))
    assert [m.training for m in model] == [True, False, True, True, True]


def test_notes_for_merged_and_zero_b():
    model = model_with_adapters().eval()
    lowrank.merge(model)
    report = compare_with_dense(model, torch.randn(2, 6))
    assert report.layers == {} and "merged" in report.notes[0]
    assert report.output_rel < 1e-5  # merged forward still matches the dense equivalent (float32)
    fresh = lowrank.inject(nn.Sequential(nn.Linear(4, 4)), ["0"])
    assert "B == 0 in 1 layer(s)" in compare_with_dense(fresh, torch.randn(2, 4)).notes[0]


def test_bf16_model_uses_the_bf16_default_tolerance():
    model = model_with_adapters(torch.bfloat16)
    report = assert_matches_dense(model, torch.randn(4, 6).to(torch.bfloat16))
    assert report.compute_dtype == torch.bfloat16
    # The deviation is bf16-sized (eps 7.8e-3): clearly above float32 noise, below the 5e-2 default.
    assert 1e-4 < report.worst_rel < 5e-2
    with pytest.raises(AssertionError, match="rtol=1e-06"):
        assert_matches_dense(model, torch.randn(4, 6).to(torch.bfloat16), rtol=1e-6)


def test_nf4_base_is_compared_with_its_dequantized_weight():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    lowrank.quantize(model)
    randomize_adapters(lowrank.inject(model, "all-linear", r=4, alpha=8.0), std_b=0.1)
    x = torch.randn(5, 64)
    report = assert_matches_dense(model, x)  # reference W0 = dequantize_weight(float64): only float32 rounding
    assert report.worst_rel < 1e-5
    dense = dense_equivalent(model)
    w = model[0].base.dequantize_weight(torch.float64) + 8.0 / 4 * (model[0].lora_B.double() @ model[0].lora_A.double())
    torch.testing.assert_close(dense[0].weight, w.float(), rtol=0, atol=0)  # one rounding of the float64 sum


def test_no_adapters_is_an_error():
    with pytest.raises(ValueError, match="has no LoRA layers"):
        compare_with_dense(nn.Linear(2, 2), torch.randn(1, 2))


def test_reference_does_not_trust_the_layer_scale():
    """The dense reference computes each scale from alpha, r and rslora: a layer whose stored scale is wrong (as a
    broken scale formula would make it) must fail the check, not pass against itself."""
    model = model_with_adapters()
    x = torch.randn(3, 6)
    lowrank.testing.assert_matches_dense(model, x)
    adapter = next(layer for _, layer in lowrank.lora_layers(model)).adapters["default"]
    adapter.scale *= 1.01
    with pytest.raises(AssertionError, match="deviates from its dense equivalent"):
        lowrank.testing.assert_matches_dense(model, x)
