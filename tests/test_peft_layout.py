"""PEFT file layout helpers (lowrank/peft_layout.py): target_modules selects exactly the adapted layers in PEFT,
and refusals name the real reason."""

import copy
import json
import warnings

import peft
import pytest
import torch
from _helpers import assert_unchanged, snapshot
from torch import nn

import lowrank
from lowrank.peft_layout import explain_key


def _sequential():
    # Layer "0" and child "0" of layer "2" share the leaf name: PEFT's suffix rule on a list ["0", "3"] would
    # select "2.0" too.
    return nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 6)), nn.Linear(6, 4))


def test_peft_selects_exactly_our_layers_when_a_name_is_a_suffix_of_another(tmp_path):
    base = _sequential()
    model = lowrank.inject(copy.deepcopy(base), "0|3", r=2)  # a regex: full match, so "2.0" is not adapted
    assert [n for n, _ in lowrank.lora_layers(model)] == ["0", "3"]
    with torch.no_grad():
        for _, layer in lowrank.lora_layers(model):
            layer.lora_B.normal_()
    lowrank.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        listed = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["0", "3"]))
    assert sorted(theirs.targeted_module_names) == ["0", "3"], config["target_modules"]
    assert sorted(listed.targeted_module_names) == ["0", "2.0", "3"]  # what a plain list would have done
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), atol=1e-6, rtol=1e-6)  # float32, same products


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("base_model.model.q.lora_magnitude_vector.default.weight", "DoRA"),
        ("base_model.model.lm_head.modules_to_save.default.weight", "modules_to_save"),
        ("base_model.model.embed.token_adapter.trainable_tokens_delta", "trainable_token_indices"),
        ("base_model.model.q.lora_B.bias", "lora_bias"),
        ("base_model.model.q.something", "not a LoRA weight"),
    ],
)
def test_refusals_name_the_reason(key, reason):
    assert reason in explain_key(key)


def test_modules_to_save_file_is_refused_by_name(tmp_path):
    base = _sequential()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["3"], modules_to_save=["1"]))
        pm.save_pretrained(tmp_path)
    snap = snapshot(base)
    with pytest.raises(ValueError, match="modules_to_save"):
        lowrank.load_adapter(base, tmp_path)
    assert_unchanged(base, snap)
