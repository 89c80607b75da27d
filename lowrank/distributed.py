"""Adapters under FSDP2: see them whole for saving and loading, while the model stays sharded.

    fully_shard(layer) for each decoder layer; fully_shard(model)        # torch's FSDP2, nothing of ours
    ...train...
    with lowrank.distributed.gathered_adapters(model):                   # every rank enters (a collective)
        if dist.get_rank() == 0:
            lowrank.save_adapter(model, "out/adapter")
    dist.barrier()                                                       # the file is complete for everyone

    with lowrank.distributed.gathered_adapters(model, writeback=True):   # load into a sharded model
        if dist.get_rank() == 0:
            lowrank.load_adapter(model, "out/adapter")                    # rank 0's values are scattered on exit

Under FSDP2 every parameter is a ``DTensor`` holding one shard per rank, so ``save_adapter`` on rank 0 alone would
see a shard (and any reduction on it, such as the finiteness check, is a collective that the other ranks never
join: a hang). The context manager all-gathers the adapters alone (a LoRA model's adapters are ~0.1-1 % of its
bytes; the 4-bit base stays sharded) and puts them on the layers as plain tensors for the duration of the block.
Under DDP, or in one process, adapters are plain tensors already and the context manager does nothing.

Only the adapters' parameters (``lora_A``, ``lora_B``, ...) of LoRA layers are touched; FSDP2's own parameter
objects are put back on
exit, so training continues exactly as before. Do not run forward or backward inside the block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .adapters import lora_layers


def _dtensor_type():
    # Imported lazily: `import lowrank` must not import torch.distributed's tensor machinery.
    from torch.distributed.tensor import DTensor

    return DTensor


@contextmanager
def gathered_adapters(model: nn.Module, *, writeback: bool = False) -> Iterator[nn.Module]:
    """Temporarily replace sharded adapter parameters (DTensors) with full, plain tensors on every rank.

    Each sharded ``lora_A`` (r, in_features) and ``lora_B`` (out_features, r) is all-gathered with
    ``DTensor.full_tensor()`` and set on its layer as a plain ``nn.Parameter`` of the full shape, on the shard's
    device. Inside the block, ``lowrank.save_adapter``, ``lowrank.adapter_state_dict`` and ``lowrank.load_adapter``
    see an ordinary adapted model. On exit the original sharded parameters are restored; with ``writeback=True``
    rank 0's full values are first scattered back into every rank's shard (``distribute_tensor`` from rank 0),
    so a ``load_adapter`` done on rank 0 only reaches all ranks.

    Every rank of the mesh must enter the block (gather and scatter are collectives), in the same order.

    Args:
        model: a model adapted with ``lowrank.inject`` (before ``fully_shard``), sharded or not.
        writeback: copy the (possibly changed) full values back into the shards on exit. A block left by an
            exception restores the shards without writing anything back.

    Yields:
        ``model``.

    Raises:
        ValueError: the model has no LoRA layers.
    """
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers (call lowrank.inject before fully_shard)")
    DTensor = _dtensor_type()
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []  # (adapter, key, the sharded parameter)
    try:
        for _, layer in layers:
            for adapter in layer.adapters.values():
                for key, param in list(adapter.named_parameters(recurse=False)):
                    if isinstance(param, DTensor):
                        full = param.detach().full_tensor()  # all-gather: (r, in) or (out, r) on every rank
                        swapped.append((adapter, key, param))
                        setattr(adapter, key, nn.Parameter(full, requires_grad=param.requires_grad))
        yield model
        if writeback:
            _scatter_back(swapped)
    finally:
        for layer, key, param in swapped:
            setattr(layer, key, param)


def _scatter_back(swapped: list[tuple[nn.Module, str, nn.Parameter]]) -> None:
    """Copy rank 0's full value of each swapped adapter into the local shard of its DTensor parameter."""
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for layer, key, param in swapped:
            full = getattr(layer, key).detach().to(device=param.device, dtype=param.dtype)
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=0).to_local()
            local = param.to_local()
            if local.shape != shard.shape:  # FSDP2 and DTensor both chunk like torch.chunk; guard anyway
                raise RuntimeError(f"{key}: local shard {tuple(local.shape)} != scattered {tuple(shard.shape)}")
            local.copy_(shard)  # in place: FSDP2's sharded storage is a view of this tensor
