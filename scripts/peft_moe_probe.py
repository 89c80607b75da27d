"""Probe what PEFT (installed version) does on tiny MoE models and embeddings (facts for docs/moe_and_embeddings.md).

Run: .venv/bin/python scripts/peft_moe_probe.py
"""

import sys
import warnings
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _moe_models import FAMILIES, tiny_moe  # noqa: E402  (the tests' tiny models of the four families)

warnings.filterwarnings("ignore")


print("peft", peft.__version__, "transformers", transformers.__version__, "torch", torch.__version__)
for family in FAMILIES:
    torch.manual_seed(0)
    model = tiny_moe(family)
    experts = next((n, m) for n, m in model.named_modules() if n.endswith("experts"))
    print(
        f"\n== {family}: experts module {experts[0]} ({type(experts[1]).__name__}), attrs",
        {k: getattr(experts[1], k, None) for k in ("is_transposed", "is_concatenated", "has_bias", "has_gate")},
    )
    for n, p in experts[1].named_parameters():
        print("   param", n, tuple(p.shape))
    print("   impl:", model.config._experts_implementation)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    print("   nn.Linear modules:", linear)
    pm = get_peft_model(tiny_moe(family), LoraConfig(r=2, target_modules="all-linear"))
    print("   all-linear adapts:", sorted(pm.targeted_module_names))
    names = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=[], target_parameters=names))
    for n, m in pm.named_modules():
        if isinstance(m, peft.tuners.lora.ParamWrapper):
            print(
                "   ParamWrapper",
                n,
                "param",
                m.parameter_name,
                "num_experts",
                m.num_experts,
                "in",
                m.in_features,
                "out",
                m.out_features,
                "A",
                tuple(m.lora_A["default"].weight.shape),
                "B",
                tuple(m.lora_B["default"].weight.shape),
            )
    for k, v in get_peft_model_state_dict(pm).items():
        print("   key", k, tuple(v.shape))

# embeddings and save_embedding_layers="auto"
cfg = transformers.LlamaConfig(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    tie_word_embeddings=True,
)
for targets in (["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]):
    model = transformers.LlamaForCausalLM(cfg)
    print("\n== tied llama, targets", targets, "tied:", model.lm_head.weight is model.model.embed_tokens.weight)
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    sd = get_peft_model_state_dict(pm, save_embedding_layers="auto")
    for k, v in sd.items():
        print("   key", k, tuple(v.shape))
    emb = pm.base_model.model.model.embed_tokens
    if hasattr(emb, "lora_embedding_A"):
        print(
            "   init: A std",
            emb.lora_embedding_A["default"].std().item(),
            "B std",
            emb.lora_embedding_B["default"].std().item(),
        )
    base = pm.get_base_model()

    def unwrap(m):
        return m.get_base_layer() if hasattr(m, "get_base_layer") else m

    ids = torch.arange(8)[None]
    with torch.no_grad():  # a non-zero update, so merging shows whether the head sees it
        for layer in pm.modules():
            if "default" in getattr(layer, "lora_embedding_A", {}):
                layer.lora_embedding_A["default"].normal_()
            elif "default" in getattr(layer, "lora_B", {}):
                layer.lora_B["default"].weight.normal_()
    with torch.no_grad():
        before = pm(ids).logits
        pm.merge_adapter()
        after = pm(ids).logits
    w_emb, w_head = unwrap(base.model.embed_tokens).weight, unwrap(base.lm_head).weight
    print(
        "   after merge: same tensor",
        w_emb is w_head,
        "| max |logits merged - unmerged|",
        (after - before).abs().max().item(),
    )
model = transformers.LlamaForCausalLM(cfg)
pm = get_peft_model(model, LoraConfig(r=2, target_modules=["embed_tokens"], ensure_weight_tying=True))
print("\n== ensure_weight_tying=True, targets ['embed_tokens']:", sorted(pm.targeted_module_names))
for k, v in get_peft_model_state_dict(pm).items():
    print("   key", k, tuple(v.shape))
