"""`LoRAEmbedding`: a frozen ``nn.Embedding`` plus named low-rank updates of its table.

    y = E[ids] + sum over active adapters a of  scale_a * A_a^T[ids] B_a^T
    A: (r, num_embeddings), B: (embedding_dim, r)   (PEFT's ``lora_embedding_A`` / ``lora_embedding_B``)

The adapter is a plain `lowrank.adapter.LoRAAdapter` with ``in_features = num_embeddings`` and ``out_features =
embedding_dim``: its ``scale * B @ A`` (dim, num_embeddings) is the transposed table update, so the table counts
as a weight stored (in, out), like a Conv1D's, and `LoRALayer`'s merge / unmerge / merged_weight apply as they are.

Differences from a linear layer, each as in PEFT 0.21:

* the A^T lookup uses the base's ``padding_idx`` / ``max_norm`` / ``scale_grad_by_freq`` / ``sparse`` (no gradient
  reaches the padding column of A), and a base with an ``embed_scale`` attribute (Gemma's scaled embedding)
  scales the update by it too;
* dropout is not applied (the input is token ids; PEFT builds the dropout module and never calls it);
* a new adapter starts with A ~ N(0, 1) and B = 0, so the model is unchanged (PEFT draws B ~ N(0, 1) and A = 0;
  files are interchangeable). Kaiming-uniform A, the linear default, would give entries of 1 / sqrt(vocab).

Tied weights: when the table is also another module's weight (``tie_word_embeddings``), the adapter changes the
lookup only; see `lowrank.tied` for what merging does then.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter import LoRAAdapter, check_hyperparameters
from .base import BaseView
from .lora import DEFAULT, LoRALayer
from .moe_ops import embedding_update


class EmbeddingView(BaseView):
    """An ``nn.Embedding`` as a base: in_features = num_embeddings, out_features = embedding_dim, and the table
    (num_embeddings, embedding_dim) is the dense weight stored transposed."""

    fan_in_fan_out = True

    def __init__(self, module: nn.Embedding):
        self.module = module
        self.in_features, self.out_features = int(module.num_embeddings), int(module.embedding_dim)

    @property
    def bias(self) -> None:
        return None


class LoRAEmbedding(LoRALayer):
    """A frozen ``nn.Embedding`` plus adapters: ``y = E[ids] + sum_a scale_a * A_a^T[ids] B_a^T``.

    ids (any shape, integer) -> (*ids.shape, embedding_dim), in the table's dtype. ``LoRAEmbedding(base, r, alpha)``
    builds the layer with one adapter named "default"; `lowrank.inject` is the usual way in.

    Raises:
        TypeError: ``base`` is not an ``nn.Embedding``. ValueError: a bad hyper-parameter, or r > num_embeddings.
    """

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def __init__(self, base: nn.Module, r: int | None = 8, alpha: float = 8.0, dropout: float = 0.0,
                 rslora: bool = False, *, adapter_dtype: torch.dtype = torch.float32):  # fmt: skip
        if isinstance(base, LoRALayer):
            raise TypeError("base is already a LoRA layer: add adapters to it (inject with a new adapter_name)")
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"base must be an nn.Embedding, got {type(base).__name__}")
        if r is not None:
            check_hyperparameters(r, alpha, dropout, adapter_dtype)
            check_rank(base, r)
        super().__init__(base, EmbeddingView(base))
        if r is not None:
            adapter = LoRAAdapter(self.in_features, self.out_features, r, alpha, dropout, rslora,
                                  adapter_dtype=adapter_dtype, device=base.weight.device)  # fmt: skip
            self.add_adapter(DEFAULT, adapter)
            self.active = (DEFAULT,)

    def add_adapter(self, name: str, adapter: LoRAAdapter) -> None:
        """Add ``adapter`` (r <= num_embeddings); a fresh one (B == 0) gets A ~ N(0, 1) (see the module doc)."""
        check_rank(self.base, adapter.r)
        if not adapter.lora_B.any():
            with torch.no_grad():
                adapter.lora_A.normal_(0.0, 1.0)
        super().add_adapter(name, adapter)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) -> (..., embedding_dim)."""
        if self.merged:
            self._check_merged_forward()
            if not self.enabled:  # the base as it was before merging
                return self._lookup(ids, self._original_weight)
            return self.base(ids)  # the table holds E + delta
        result = self.base(ids)
        if not self.enabled:
            return result
        if self.mixed is not None:
            return result + self._mixed_update(ids, result.dtype)
        for n in self.active_adapters():
            adapter = self.adapters[n]
            a, b = adapter.lora_A.to(result.dtype), adapter.lora_B.to(result.dtype)
            result = result + self._embed_scaled(embedding_update(ids, a, b, adapter.scale, self.base))
        return result

    def _mixed_update(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Row i gets adapter ``mixed.names[i]`` only: ``(A_cat^T[ids] * mask_i) B_cat^T``, ids (batch, ...)."""
        # The plan reads only the batch size, dtype and device of its input: give it a float stand-in for ids.
        probe = torch.empty((ids.shape[0], 1) if ids.dim() else (), dtype=dtype, device=ids.device)
        plan = self.mixed.plan(self, probe)
        if not plan.names:
            return torch.zeros((), dtype=dtype, device=ids.device)
        adapters = [self.adapters[n] for n in plan.names]
        a = torch.cat([ad.lora_A for ad in adapters], 0).to(dtype)  # (R, num_embeddings)
        b = torch.cat([ad.lora_B for ad in adapters], 1).to(dtype)  # (dim, R)
        rows = embedding_update(ids, a, torch.eye(a.shape[0], dtype=dtype, device=a.device), 1.0, self.base)
        mask = plan.mask.view(ids.shape[0], *([1] * (ids.dim() - 1)), -1)  # (batch, 1, ..., R)
        return self._embed_scaled((rows * mask) @ b.T)  # (batch, ..., R) @ (R, dim)

    def _embed_scaled(self, update: torch.Tensor) -> torch.Tensor:
        scale = getattr(self.base, "embed_scale", None)
        return update if scale is None else update * scale.to(update.dtype)

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """The base's own lookup on another table (the original one, while merged)."""
        b = self.base
        out = nn.functional.embedding(
            ids, table, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse
        )
        return self._embed_scaled(out) if hasattr(b, "embed_scale") else out

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.in_features}, embedding_dim={self.out_features}, active={list(self.active)}, "
            f"merged={self.merged}, enabled={self.enabled}"
        )


def check_rank(base: nn.Embedding, r: int) -> None:
    """A rank above num_embeddings adds parameters and no expressive power: refuse it."""
    if r > base.num_embeddings:
        raise ValueError(
            f"r={r} exceeds num_embeddings={base.num_embeddings} of the embedding {base}: the update "
            "(num_embeddings, embedding_dim) has rank at most num_embeddings; use r <= num_embeddings"
        )
