"""Distributed LoRA / QLoRA fine-tuning with PyTorch's own engines (FSDP2 or DDP), launched by torchrun.

    torchrun --standalone --nproc_per_node=2 examples/distributed_finetune.py               # FSDP2 + QLoRA
    torchrun --standalone --nproc_per_node=2 examples/distributed_finetune.py --engine ddp --no-qlora
    torchrun --standalone --nproc_per_node=2 examples/distributed_finetune.py --size small --checkpointing --measure
    python examples/distributed_finetune.py --plan           # the memory table of docs/distributed.md

The backend follows the device: gloo on CPUs, nccl with one GPU per rank when CUDA is present (that path has not
been run on a GPU in this repository yet). The model is a Llama built from a config (no download; swap in
`LlamaForCausalLM.from_pretrained` in `build_model`), the data synthetic arithmetic token sequences (the tiny
model's loss falls from 5.56 to 5.16 in the default 30 steps). FSDP2 shards every decoder layer,
including the frozen NF4 integer parameters, which a bf16 MixedPrecisionPolicy leaves alone. The adapter is
gathered (`lowrank.distributed.gathered_adapters`) and written once, by rank 0, in PEFT's format. `--measure`
prints each rank's peak memory next to the memory model of docs/distributed.md (same function as `--plan`).
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import lowrank
from lowrank.distributed import gathered_adapters

SIZES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (64, 128, 2, 4, 2, 256),
    "small": (512, 1536, 4, 8, 8, 4096),
    "llama-2-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": (5120, 13824, 40, 40, 40, 32000),
    "llama-2-70b": (8192, 28672, 80, 64, 8, 32000),
}
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # 4.127 bits per weight: block 64, double-quantized absmax


def estimate_memory(size: str, *, ranks: int, tokens: int, r: int = 8, engine: str = "fsdp", qlora: bool = True,
                    checkpointing: bool = True, compute_bytes: int = 2) -> dict[str, float]:  # fmt: skip
    """Peak bytes per rank, by component (the memory model of docs/distributed.md).

    Llama shape, LoRA on all 7 linear layers of every decoder layer, AdamW, ``tokens`` = micro-batch x sequence
    per rank, SDPA attention (no tokens^2 term). ``engine="fsdp"`` shards everything persistent over ``ranks``;
    ``"ddp"`` replicates (with ``ranks=1``: plain single-device training). The transients are summed at their
    worst moment, so the estimate errs high: +1 to +16 % against the peaks measured on CPU (docs/distributed.md).
    Excludes the CUDA context and allocator fragmentation (add ~1 GB on a GPU).
    """
    h, i, n_layers, heads, kv_heads, vocab = SIZES[size]
    k = h * kv_heads // heads  # width of k_proj / v_proj outputs (grouped-query attention)
    c = compute_bytes
    layer = 2 * h * h + 2 * h * k + 3 * h * i  # q, o: h x h; k, v: h x k; gate, up, down: h x i
    adapter = n_layers * r * (9 * h + 2 * k + 3 * i)  # r * (in + out) summed over the 7 layers
    outer = 2 * vocab * h + (2 * n_layers + 1) * h  # embeddings, untied head, norms: kept in compute dtype
    shard = ranks if engine == "fsdp" else 1
    base = NF4_BYTES if qlora else c
    act = (7 * h + 2 * k + 4 * i) * c  # saved per token per layer (LoRA, frozen base, SDPA, no dropout)
    # Transients peak at one of two moments, not both: the loss (logits, their float32 copy when computing in
    # bf16, log-softmax and its gradient) or one decoder layer's backward (its dequantized weight, with
    # checkpointing its recomputed activations, and ~2 intermediate-sized gradient temporaries).
    loss_phase = tokens * vocab * (c + (4 if c < 4 else 0) + 4 + 4)
    layer_phase = (h * i * (4 + c) if qlora else 0) + (tokens * act if checkpointing else 0) + 2 * tokens * i * c
    out = {
        "base (sharded)": n_layers * layer * base / shard + outer * c / shard,
        # FSDP2 keeps the root unit (embeddings, head) gathered through forward and backward, and gathers two
        # decoder layers at a time (the current one and the prefetched next one).
        "gathered units": (outer * c + 2 * layer * base) if engine == "fsdp" else 0.0,  # (copies, also on 1 rank)
        "adapters + grads + AdamW": adapter * (4 + 4 + 8) / shard,  # float32 params, grads, m and v
        "saved activations": tokens * n_layers * (h * c if checkpointing else act),  # ckpt: each layer's input
        "loss or layer backward": max(loss_phase, layer_phase),
    }
    out["total"] = sum(out.values())
    return out


def plan() -> None:
    """Print the table of docs/distributed.md: GB per GPU, seq 2048 x micro-batch 1, bf16, r = 8, QLoRA."""
    print("| model | GPUs | FSDP2, checkpointing | FSDP2, no checkpointing | DDP, checkpointing | fits 24 / 80 GB |")
    print("|---|---|---|---|---|---|")
    for size in ("llama-2-7b", "llama-2-13b", "llama-2-70b"):
        for ranks in (1, 2, 8):
            engine = "fsdp" if ranks > 1 else "ddp"  # one GPU: no wrapper at all

            def gb(size=size, ranks=ranks, **kw) -> float:
                return estimate_memory(size, ranks=ranks, tokens=2048, **kw)["total"] / 1e9

            fsdp, no_ckpt, ddp = gb(engine=engine), gb(engine=engine, checkpointing=False), gb(engine="ddp")
            fits = f"{'yes' if fsdp + 1 <= 24 else 'no'} / {'yes' if fsdp + 1 <= 80 else 'no'}"
            print(f"| {size} | {ranks} | {fsdp:.1f} | {no_ckpt:.1f} | {ddp:.1f} | {fits} |")


def build_model(size: str, qlora: bool, r: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, n_layers, heads, kv_heads, vocab = SIZES[size]
    config = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=n_layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)  # every rank builds the same model; DDP would broadcast rank 0's anyway, FSDP2 does not
    model = LlamaForCausalLM(config)
    if qlora:
        lowrank.quantize(model)  # frozen NF4 integer parameters: shardable, never cast
    lowrank.inject(model, "all-linear", r=r, alpha=2.0 * r)
    return model


def batch(step: int, global_batch: int, seq: int, vocab: int, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of the step's global batch: arithmetic token sequences (next token = previous + stride)."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, vocab, (global_batch, 1), generator=g)
    stride = torch.randint(1, 4, (global_batch, 1), generator=g)
    ids = (start + stride * torch.arange(seq)) % vocab  # (global_batch, seq)
    return ids.chunk(world)[rank]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", choices=("fsdp", "ddp"), default="fsdp")
    p.add_argument("--no-qlora", dest="qlora", action="store_false", help="plain LoRA on a float base")
    p.add_argument("--size", choices=tuple(SIZES)[:2], default="tiny")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--global-batch", type=int, default=8, help="sequences per step over all ranks")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--bf16", action="store_true", help="bf16 compute (FSDP2 MixedPrecisionPolicy / DDP autocast)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    p.add_argument("--measure", action="store_true", help="peak memory per rank vs estimate_memory")
    p.add_argument("--out", default="out/distributed_adapter")
    p.add_argument("--plan", action="store_true", help="print the memory table and exit (no torchrun needed)")
    args = p.parse_args()
    if args.plan:
        return plan()

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of the {world} ranks")

    model = build_model(args.size, args.qlora, args.r)
    if args.checkpointing:  # before sharding; non-reentrant, so frozen inputs without grad are fine
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compute = torch.bfloat16 if args.bf16 else torch.float32
    if args.engine == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # param_dtype casts floating parameters only; the uint8/int32 NF4 tensors are all-gathered as they are.
        mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)  # one unit per decoder layer: all-gathered just for its use
        fully_shard(model, mp_policy=mp)  # the root: embeddings, final norm, head
        train_model = model
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model.to(device)
        train_model = DDP(model, device_ids=[local_rank] if cuda else None)
    # Optimizer after wrapping: FSDP2 replaces each parameter by a DTensor shard.
    opt = torch.optim.AdamW(lowrank.adapter_parameters(model), lr=args.lr, weight_decay=0.0)

    tracker = PeakTensorBytes() if args.measure and not cuda else None
    if tracker is not None:
        tracker.track([list(model.parameters()), list(model.buffers())])
        tracker.__enter__()
    elif args.measure:
        torch.cuda.reset_peak_memory_stats()
    vocab = SIZES[args.size][5]
    start = time.perf_counter()
    for step in range(args.steps):
        ids = batch(step, args.global_batch, args.seq, vocab, rank, world).to(device)
        with torch.autocast(device.type, dtype=compute, enabled=args.bf16 and args.engine == "ddp"):
            loss = train_model(input_ids=ids, labels=ids).loss  # mean over this rank's tokens
        loss.backward()  # DDP all-reduces / FSDP2 reduce-scatters the adapter gradients (averaged over ranks)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            total = loss.detach().clone()
            dist.all_reduce(total)  # SUM: gloo has no AVG
            if rank == 0:
                print(f"step {step:3d}  loss {total.item() / world:.4f}  {time.perf_counter() - start:.1f} s")
    if tracker is not None:
        tracker.__exit__(None, None, None)
    peak = tracker.peak if tracker is not None else torch.cuda.max_memory_allocated(device) if args.measure else 0

    with gathered_adapters(model):  # a collective: all ranks gather, then rank 0 writes the full adapter
        if rank == 0:
            lowrank.save_adapter(model, args.out)
            print(f"adapter written to {args.out}")
    if args.measure:
        tokens = args.global_batch // world * args.seq
        est = estimate_memory(args.size, ranks=world, tokens=tokens, r=args.r, engine=args.engine, qlora=args.qlora,
                              checkpointing=args.checkpointing, compute_bytes=compute.itemsize)  # fmt: skip
        parts = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in est.items() if k != "total")
        print(f"rank {rank}: peak {peak / 2**20:.2f} MiB measured, {est['total'] / 2**20:.2f} MiB estimated ({parts})",
              flush=True)  # fmt: skip
    dist.barrier()  # no rank tears down while another still uses the group (or reads what rank 0 wrote)
    dist.destroy_process_group()


class PeakTensorBytes:
    """Peak bytes of live tensor storage on the CPU: a TorchDispatchMode that sees every tensor an op creates.

    Storages are counted once (views share them), released when their last reference dies (a weakref
    finalizer) or shrunk by ``resize_`` (FSDP2 frees gathered parameters that way). Tensors that exist before
    the block (the model, the optimizer) are registered with ``track``. On a GPU use
    ``torch.cuda.max_memory_allocated`` instead, as `main` does.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.weak import WeakIdKeyDictionary

        self.live, self.now, self.peak = WeakIdKeyDictionary(), 0, 0
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outer.track(out)
                return out

        self.mode = Mode()

    def track(self, obj) -> None:
        import weakref

        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(obj):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            if hasattr(t, "__tensor_flatten__"):  # DTensor and friends: count the local tensors inside
                self.track([getattr(t, name) for name in t.__tensor_flatten__()[0]])
                continue
            st = t.untyped_storage()
            if st not in self.live:
                cell = self.live[st] = [st.nbytes()]  # a cell: resize_ updates it, the finalizer reads it
                self.now += cell[0]
                weakref.finalize(st, self._release, cell)
        self.peak = max(self.peak, self.now)

    def _release(self, cell: list[int]) -> None:
        self.now -= cell[0]

    def __enter__(self):
        original = self._resize = torch.UntypedStorage.resize_

        def resize(st, size):
            out = original(st, size)
            cell = self.live.get(st)
            if cell is not None:
                self.now += st.nbytes() - cell[0]
                cell[0] = st.nbytes()
                self.peak = max(self.peak, self.now)
            return out

        torch.UntypedStorage.resize_ = resize
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        torch.UntypedStorage.resize_ = self._resize


if __name__ == "__main__":
    main()
