"""One rank of the distributed tests (tests/test_distributed.py): DDP and FSDP2 on CPU with gloo.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/dist_worker.py OUT_DIR   # or torchrun

Every scenario trains a tiny model for STEPS SGD steps on this rank's slice of the global batch and writes
``OUT_DIR/<scenario>.rank<r>.pt`` (the full adapter tensors and what the scenario observed). The test compares
these files with a single process trained on the whole global batch (`train` with world_size=1). The same
functions build the models and batches on both sides, so the only difference is the parallelism.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from _helpers import TINY_LLAMA, randomize_adapters, tiny_llama  # run as a script from tests/: sys.path[0]
from torch import nn

import lowrank
from lowrank.distributed import gathered_adapters

GLOBAL_BATCH, SEQ, STEPS, LR = 4, 16, 3, 0.5
SCENARIOS = ("ddp_lora", "ddp_qlora", "fsdp_lora", "fsdp_qlora", "fsdp_qlora_bf16", "load_sharded", "unused")


def build_llama(qlora: bool) -> nn.Module:
    """Tiny Llama (float32, seed 0), NF4-quantized for QLoRA, LoRA r=4 on every linear layer but the head.

    B starts at N(0, 0.02) instead of zero (a mid-training adapter), so that every A gets a gradient from the
    first step and each adapter tensor moves far beyond the comparison tolerance in 3 steps.
    """
    torch.manual_seed(0)
    model = tiny_llama(attn_implementation="eager")
    if qlora:
        lowrank.quantize(model)
    lowrank.inject(model, "all-linear", r=4, alpha=8.0)
    return randomize_adapters(model, std_b=0.02, generator=torch.Generator().manual_seed(1))


class Skippy(nn.Module):
    """Two adapted layers; ``second`` is skipped on even steps (its adapter gets no gradient there)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 8)
        lowrank.inject(self, ["first", "second"], r=2, alpha=4.0)

    def forward(self, x: torch.Tensor, use_second: bool) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        return self.second(h) if use_second else h


def global_batch(step: int) -> torch.Tensor:
    """Token ids (GLOBAL_BATCH, SEQ) for a step, the same on every rank and in the single-process reference."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, TINY_LLAMA["vocab_size"], (GLOBAL_BATCH, SEQ), generator=g)


def llama_loss(model, step, rank, world_size):
    ids = global_batch(step).chunk(world_size)[rank]  # (GLOBAL_BATCH / world_size, SEQ)
    # Mean over this rank's tokens; DDP/FSDP average the gradients over ranks, which gives the mean over the
    # global batch because every rank holds the same number of tokens.
    return model(input_ids=ids, labels=ids).loss


def skippy_loss(model, step, rank, world_size):
    g = torch.Generator().manual_seed(2000 + step)
    x = torch.randn(GLOBAL_BATCH, 8, generator=g).chunk(world_size)[rank]
    return model(x, use_second=step % 2 == 1).pow(2).mean()


def train(model, loss_fn, rank: int = 0, world_size: int = 1, steps: int = STEPS) -> list[float]:
    """SGD with momentum on the adapters (created after wrapping: FSDP2 replaces the parameters by DTensors).

    SGD, not AdamW: its update is linear in the gradient, so a wrong averaging over ranks (a factor 2) shows in
    full, and float32 rounding stays at the parameters' last bit. AdamW divides by sqrt(v) per entry: it hides a
    gradient scale error and turns rounding in entries that nearly cancel into update errors of ~1e-5 (measured
    on this model: one float32 process vs float64 differ by 8.2e-6 after 3 AdamW steps at lr 1e-2).
    """
    opt = torch.optim.SGD(lowrank.adapter_parameters(_unwrap(model)), lr=LR, momentum=0.9)
    losses = []
    for step in range(steps):
        loss = loss_fn(model, step, rank, world_size)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_adapters(model) -> dict[str, torch.Tensor]:
    """The adapters as full CPU tensors (gathered under FSDP2; every rank must call)."""
    with gathered_adapters(_unwrap(model)):
        return {k: v.detach().cpu().clone() for k, v in lowrank.adapter_state_dict(_unwrap(model)).items()}


def shard(model, mp_policy=None):
    """FSDP2 the usual way: one unit per decoder layer, then the root (embeddings, norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mp_policy": mp_policy or MixedPrecisionPolicy()}
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    return fully_shard(model, **kw)


def nf4_params(model) -> dict[str, nn.Parameter]:
    return {
        f"{name}.{pname}": p
        for name, module in model.named_modules()
        if isinstance(module, lowrank.NF4Linear)
        for pname, p in module.named_parameters(recurse=False)
        if not p.dtype.is_floating_point
    }


def run_scenario(name: str, rank: int, world: int, out: Path) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.nn.parallel import DistributedDataParallel as DDP

    result: dict = {}
    if name.startswith("ddp_"):
        model = DDP(build_llama(qlora=name == "ddp_qlora"))
        result["losses"] = train(model, llama_loss, rank, world)
    elif name in ("fsdp_lora", "fsdp_qlora"):
        model = shard(build_llama(qlora=name == "fsdp_qlora"))
        local = {k: (p.numel() * p.element_size(), p.to_local().numel() * p.element_size(), str(p.dtype))
                 for k, p in nf4_params(model).items()}  # fmt: skip
        result["nf4_bytes"] = local  # name -> (global bytes, bytes held by this rank, dtype)
        result["losses"] = train(model, llama_loss, rank, world)
        with gathered_adapters(model):  # saving: gather on all ranks, write on rank 0, then a barrier
            if rank == 0:
                lowrank.save_adapter(model, out / f"{name}_adapter")
        dist.barrier()  # rank 1 must not read (or exit) before rank 0 has finished writing
        result["reloaded"] = lowrank.adapter_state_dict(lowrank.load_adapter(build_llama(name == "fsdp_qlora"),
                                                                             out / f"{name}_adapter"))  # fmt: skip
    elif name == "fsdp_qlora_bf16":
        model = build_llama(qlora=True)
        before = {n: m.dequantize_weight(torch.float32) for n, m in model.named_modules()
                  if isinstance(m, lowrank.NF4Linear)}  # fmt: skip
        seen = {}

        def record(module, args, name):  # runs inside FSDP2's forward: the parameters are all-gathered here
            dtypes = {k: str(p.dtype) for k, p in module.named_parameters(recurse=False)}
            diff = (module.dequantize_weight(torch.float32) - before[name]).abs().max().item()
            seen[name] = (dtypes, diff, str(args[0].dtype))

        for n, m in model.named_modules():
            if isinstance(m, lowrank.NF4Linear):
                m.register_forward_pre_hook(lambda mod, args, n=n: record(mod, args, n))
        shard(model, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        result["losses"] = train(model, llama_loss, rank, world, steps=1)
        result["seen"] = seen
    elif name == "load_sharded":
        ids = global_batch(0).chunk(world)[rank]
        # Before sharding: an ordinary load on every rank, then fully_shard.
        early = shard(lowrank.load_adapter(build_llama(qlora=False), out / "fsdp_lora_adapter"))
        with torch.no_grad():
            result["logits_loaded_before"] = early(input_ids=ids).logits
        # After sharding: rank 0 alone reads the file; writeback scatters its values into every rank's shard.
        model = shard(build_llama(qlora=False))
        with gathered_adapters(model, writeback=True):
            if rank == 0:
                lowrank.load_adapter(model, out / "fsdp_lora_adapter")
        with torch.no_grad():
            result["logits"] = model(input_ids=ids).logits
    elif name == "unused":
        try:
            train(DDP(Skippy()), skippy_loss, rank, world)
            result["default_error"] = None
        except RuntimeError as e:
            result["default_error"] = str(e)
        dist.barrier()
        model = DDP(Skippy(), find_unused_parameters=True)
        result["losses"] = train(model, skippy_loss, rank, world)
        fsdp = Skippy()
        from torch.distributed.fsdp import fully_shard

        fully_shard(fsdp)
        result["fsdp_losses"] = train(fsdp, skippy_loss, rank, world)
        result["fsdp_adapters"] = full_adapters(fsdp)
    result["adapters"] = full_adapters(model)
    return result


def _exit_with_parent() -> None:
    """Die when the launching test process dies, so that no rank outlives a failed or killed test."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def main(out: Path, scenarios: list[str]) -> int:
    start = time.perf_counter()
    _exit_with_parent()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a lost peer fails in 60 s, not 30 min
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"rank {rank}: started in {time.perf_counter() - start:.2f} s", flush=True)
    failed = 0
    for name in scenarios:
        start = time.perf_counter()
        try:
            result = run_scenario(name, rank, world, out)
        except Exception:  # noqa: BLE001 - reported to the test through the result file, with the traceback
            result, failed = {"error": traceback.format_exc()}, failed + 1
        torch.save(result, out / f"{name}.rank{rank}.pt")
        dist.barrier()
        print(f"rank {rank}: {name} {time.perf_counter() - start:.2f} s", flush=True)
    dist.barrier()  # all ranks done with collectives and files before any rank tears down
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:] or list(SCENARIOS)))
