"""lowrank: LoRA and QLoRA fine-tuning for PyTorch models, from scratch.

    import lowrank
    lowrank.quantize(model)                                   # optional: frozen linear weights -> NF4 (QLoRA)
    lowrank.inject(model, targets=["q_proj", "v_proj"], r=8, alpha=32, dropout=0.1)
    ...train...
    lowrank.save_adapter(model, "out/adapter")                # PEFT-readable safetensors
    lowrank.eject(model)                                      # the original modules, untouched

Importing this package does no work: no CUDA initialisation, no triton import, no transformers import.
"""

from . import nf4, testing
from .adapter import LoRAAdapter
from .adapters import (
    active_adapters,
    adapter_names,
    delete_adapter,
    disabled,
    lora_layers,
    mixed_batch,
    set_adapter,
)
from .dora import DoRAAdapter
from .export import save_merged
from .gguf_export import save_gguf_adapter
from .init_export import loftq_report, save_pissa_as_lora
from .inject import adapter_parameters, adapter_state_dict, eject, inject, merge, summary, unmerge
from .io import load_adapter, save_adapter
from .loading import from_pretrained, load_quantized
from .lora import LoRALayer, LoRALinear
from .lora_embedding import LoRAEmbedding
from .lora_experts import ExpertsAdapter, LoRAExperts
from .merge_quantized import MergeReport, merge_quantized
from .nf4 import NF4Tensor
from .nf4_linear import NF4Linear, quantize
from .optim import param_groups

__version__ = "0.1.0"

__all__ = [
    "ExpertsAdapter",
    "DoRAAdapter",
    "LoRAAdapter",
    "LoRAEmbedding",
    "LoRAExperts",
    "LoRALayer",
    "LoRALinear",
    "MergeReport",
    "NF4Linear",
    "NF4Tensor",
    "__version__",
    "active_adapters",
    "adapter_names",
    "adapter_parameters",
    "adapter_state_dict",
    "delete_adapter",
    "disabled",
    "eject",
    "from_pretrained",
    "inject",
    "load_adapter",
    "load_quantized",
    "loftq_report",
    "lora_layers",
    "merge",
    "merge_quantized",
    "mixed_batch",
    "nf4",
    "param_groups",
    "quantize",
    "save_adapter",
    "save_gguf_adapter",
    "save_merged",
    "save_pissa_as_lora",
    "set_adapter",
    "summary",
    "testing",
    "unmerge",
]
