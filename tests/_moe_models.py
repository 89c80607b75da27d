"""Tiny Mixture-of-Experts models of several transformers families, for the experts and embedding tests.

Every family here keeps its experts in fused 3-D parameters (``gate_up_proj``, ``down_proj``) inside an experts
module built with transformers' ``@use_experts_implementation`` (gpt-oss: transposed (E, in, out) with biases).
Hidden 32, 4 experts, top-2, vocab 64, one decoder layer: small enough for the whole suite, and with 4 experts
and 2 of them per token every test batch routes tokens to several experts. Built with ``experts_implementation
="eager"``: transformers' per-expert loop, the reference our routed forward is compared with.
"""

from __future__ import annotations

from torch import nn

FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "gpt_oss")
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
_COMMON = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
           "num_key_value_heads": 2,
               "max_position_embeddings": 64}  # fmt: skip


def tiny_moe(family: str, **overrides) -> nn.Module:
    """A ``<Family>ForCausalLM`` with 4 experts of intermediate size 24, top-2; weights from the global RNG."""
    import transformers

    if family == "mixtral":
        cfg = transformers.MixtralConfig(**_COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    elif family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**_COMMON, moe_intermediate_size=24, intermediate_size=24, num_experts=4,
                                          num_experts_per_tok=2, head_dim=8, decoder_sparse_step=1)  # fmt: skip
    elif family == "olmoe":
        cfg = transformers.OlmoeConfig(**_COMMON, intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                       eos_token_id=None, pad_token_id=None)  # fmt: skip
    elif family == "gpt_oss":
        cfg = transformers.GptOssConfig(**_COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                        head_dim=8, layer_types=["full_attention"])  # fmt: skip
        cfg.max_position_embeddings = 4096  # YaRN's original context: a smaller one only triggers a warning
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cls = {"mixtral": transformers.MixtralForCausalLM, "qwen3_moe": transformers.Qwen3MoeForCausalLM,
           "olmoe": transformers.OlmoeForCausalLM, "gpt_oss": transformers.GptOssForCausalLM}[family]  # fmt: skip
    model = cls(cfg)
    model.set_experts_implementation("eager")
    return model


def experts_of(model: nn.Module) -> nn.Module:
    """The (only) experts module of a `tiny_moe` model."""
    return model.model.layers[0].mlp.experts
