"""DDP and FSDP2 with LoRA and QLoRA: 2 gloo processes on CPU against one process on the global batch.

One launch of tests/dist_worker.py (2 ranks, all scenarios, 20-30 s on 2 cores) feeds the tests; the single-process
references are computed here with the worker's own model/batch builders, so parallelism is the only difference.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dist_worker as W
import pytest
import torch
from _helpers import TINY_LLAMA, tiny_llama
from safetensors.torch import load_file
from torch import nn

import lowrank
from lowrank.distributed import gathered_adapters

pytestmark = pytest.mark.slow  # multi-process: 2 gloo ranks (see pyproject's markers)

EXAMPLE = Path(__file__).parents[1] / "examples" / "distributed_finetune.py"

WORLD = 2
# float32 on CPU: DDP/FSDP average two half-batch gradients where one process reduces the whole batch, so sums are
# rounded in a different order. After 3 SGD steps the parameters (|p| < 0.25) differ by at most 2.7e-8 (LoRA) and
# 2.1e-8 (QLoRA), i.e. 1-2 float32 ulps (2^-24 * 0.25 = 1.5e-8); 6e-8 = 4 ulps. The smallest move of any adapter
# tensor in those steps is 2e-4 (test_training_moved_the_adapters): a wrong gradient average would be far over it.
PARAM_ATOL = 6e-8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, args: list[str], log_dir: Path, timeout: float = 240.0) -> list[tuple[int, str]]:
    """Start WORLD ranks of ``script`` (env:// rendezvous on a free port); return [(exit code, log)] per rank.

    Each rank runs in its own session; whatever happens (timeout, test interrupted), every rank's process group is
    killed in ``finally`` so no worker outlives the test.
    """
    # No empty PYTHONPATH entry: one would put the working directory (the repo root, whose kernels/ folder
    # shadows Hugging Face's `kernels` package) on the ranks' sys.path.
    path = os.pathsep.join(p for p in [str(script.parent), *os.environ.get("PYTHONPATH", "").split(os.pathsep)] if p)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(WORLD),
               OMP_NUM_THREADS="1", PYTHONPATH=path)  # fmt: skip
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as files:
        try:
            for rank in range(WORLD):
                log = files.enter_context(open(log_dir / f"rank{rank}.log", "w"))
                rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
                cmd = [sys.executable, str(script), *args]
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=rank_env,
                                              start_new_session=True))  # fmt: skip
            deadline = time.monotonic() + timeout
            for p in procs:
                p.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
    return [(p.returncode, (log_dir / f"rank{r}.log").read_text()) for r, p in enumerate(procs)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    results = launch(Path(W.__file__), [str(out)], out)
    return out, results


def load(out: Path, scenario: str) -> list[dict]:
    missing = [r for r in range(WORLD) if not (out / f"{scenario}.rank{r}.pt").exists()]
    if missing:
        logs = "\n".join((out / f"rank{r}.log").read_text()[-2000:] for r in missing)
        pytest.fail(f"ranks {missing} wrote no result for {scenario}:\n{logs}")
    found = [torch.load(out / f"{scenario}.rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(found):
        assert "error" not in res, f"rank {r} failed in {scenario}:\n{res['error']}"
    return found


_REFERENCES: dict = {}


def reference(kind: str, dtype: torch.dtype = torch.float32):
    """One process, the whole global batch: (model, losses); kind is "lora", "qlora" or "skippy"."""
    if (kind, dtype) not in _REFERENCES:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the workers' setting, so matmuls block the same way
        try:
            model = W.Skippy() if kind == "skippy" else W.build_llama(qlora=kind == "qlora")
            losses = W.train(model.to(dtype), W.skippy_loss if kind == "skippy" else W.llama_loss)
        finally:
            torch.set_num_threads(threads)
        _REFERENCES[kind, dtype] = (model, losses)
    return _REFERENCES[kind, dtype]


def assert_adapters_close(got: dict, want_model: nn.Module, atol: float = PARAM_ATOL):
    want = lowrank.adapter_state_dict(want_model)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == torch.float32, k
        diff = (got[k].double() - want[k].double()).abs().max().item()
        assert diff <= atol, f"{k}: max |diff| {diff:.3g} > {atol}"


def test_all_ranks_exit_cleanly(runs):
    # The worker ends with barrier -> destroy_process_group; both ranks must exit 0 with nothing on stderr that
    # looks like a torn-down peer (gloo reports "Connection closed by peer" when one rank leaves early).
    _, results = runs
    for rank, (code, log) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{log[-3000:]}"
        assert "Connection closed" not in log and "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_matches_one_process_on_the_global_batch(runs, engine, kind):
    out, _ = runs
    model, losses = reference(kind)
    exact, _ = reference(kind, torch.float64)
    ranks = load(out, f"{engine}_{kind}")
    for res in ranks:
        assert_adapters_close(res["adapters"], model)
        # Against the float64 run the sharded result is as good as one float32 process: measured 4.5e-8 (one
        # float32 process: 3.8e-8), so ~1e-9 is not reachable in float32 here; 1e-7 = 7 ulps at |p| < 0.25.
        assert_adapters_close(res["adapters"], exact, atol=1e-7)
    # Each rank's loss is the mean over its half of the tokens; their average is the global-batch loss.
    avg = [sum(r["losses"][i] for r in ranks) / WORLD for i in range(W.STEPS)]
    assert avg == pytest.approx(losses, rel=1e-6)  # float32 loss, summed in a different order


def test_training_moved_the_adapters():
    # Guards the comparison above against a vacuous pass: 3 steps move each adapter far beyond PARAM_ATOL.
    model, _ = reference("lora")
    fresh = W.build_llama(qlora=False)
    start = lowrank.adapter_state_dict(fresh)
    for k, v in lowrank.adapter_state_dict(model).items():
        assert (v - start[k]).abs().max().item() > 1000 * PARAM_ATOL, k


def test_nf4_parameters_are_sharded(runs):
    out, _ = runs
    ranks = [r["nf4_bytes"] for r in load(out, "fsdp_qlora")]
    assert ranks[0], "no NF4 parameters found under FSDP2"
    assert ranks[0].keys() == ranks[1].keys()
    names = ranks[0].keys()
    # 4 tensors per NF4Linear: packed codes (uint8), absmax codes (uint8), nested absmax and offset (int32 bits).
    assert {ranks[0][n][2] for n in names} == {"torch.uint8", "torch.int32"}
    total = sum(ranks[0][n][0] for n in names)
    # The NF4 format's size at block 64: n/2 packed bytes + n/64 absmax codes + 4 per 256 blocks + 4 (the offset).
    cfg = TINY_LLAMA
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]  # width of k_proj / v_proj
    sizes = [h * h, kv * h, kv * h, h * h, i * h, i * h, h * i]  # q k v o gate up down
    per_layer = sum(n // 2 + n // 64 + 4 * -(-n // (64 * 256)) + 4 for n in sizes)
    assert total == cfg["num_hidden_layers"] * per_layer
    held = [sum(r[n][1] for n in names) for r in ranks]
    for n in names:
        assert ranks[0][n][1] + ranks[1][n][1] == ranks[0][n][0], n  # the shards partition the tensor
    for h in held:
        # Each rank holds half, up to torch.chunk's rounding: one row of each tensor (one byte or one int32).
        assert abs(h - total / 2) <= 4 * len(names), (held, total)


def test_saved_adapter_equals_one_process(runs, tmp_path):
    out, _ = runs
    model, _ = reference("qlora")
    lowrank.save_adapter(model, tmp_path / "single")
    single = load_file(tmp_path / "single" / "adapter_model.safetensors")
    sharded = load_file(out / "fsdp_qlora_adapter" / "adapter_model.safetensors")
    assert sorted(sharded) == sorted(single)
    for k in single:
        assert (sharded[k] - single[k]).abs().max().item() <= PARAM_ATOL, k
    config = json.loads((out / "fsdp_qlora_adapter" / "adapter_config.json").read_text())
    assert config == json.loads((tmp_path / "single" / "adapter_config.json").read_text())
    # Rank 1 read the file after the barrier: it must see exactly what rank 0 gathered and wrote.
    rank0, rank1 = load(out, "fsdp_qlora")
    for k, v in rank0["adapters"].items():
        assert torch.equal(rank1["reloaded"][k], v), k


def test_load_before_or_after_sharding(runs):
    # Before: load_adapter, then fully_shard. After: load_adapter on rank 0 inside gathered_adapters(writeback=True),
    # and the shards of both ranks get the file. Both give the single-process model's logits.
    out, _ = runs
    model = W.build_llama(qlora=False)
    lowrank.load_adapter(model, out / "fsdp_lora_adapter")
    with torch.no_grad():
        want = model(input_ids=W.global_batch(0)).logits.chunk(WORLD)
    for rank, res in enumerate(load(out, "load_sharded")):
        # float32 logits (|x| < 1) of a model with the same weights; only the batch split of the matmuls differs.
        torch.testing.assert_close(res["logits"], want[rank], rtol=0, atol=1e-5)
        torch.testing.assert_close(res["logits_loaded_before"], want[rank], rtol=0, atol=1e-5)


def test_mixed_precision_does_not_cast_nf4_parameters(runs):
    out, _ = runs
    _, fp32_losses = reference("qlora")
    for res in load(out, "fsdp_qlora_bf16"):
        seen = res["seen"]
        assert len(seen) == 7 * TINY_LLAMA["num_hidden_layers"]  # q k v o gate up down per layer
        for name, (dtypes, diff, input_dtype) in seen.items():
            assert input_dtype == "torch.bfloat16", name  # the policy is active: activations are bf16
            assert dtypes == {"weight": "torch.uint8", "weight_absmax": "torch.uint8",
                              "weight_absmax2": "torch.int32", "weight_offset": "torch.int32"}, name  # fmt: skip
            assert diff == 0.0, f"{name}: dequantized weight changed by {diff} under the bf16 policy"
    losses = [r["losses"][0] for r in load(out, "fsdp_qlora_bf16")]
    # bf16 rounds to 4e-3 relative, but the loss of a random tiny model sits near ln(128) = 4.85 and barely moves:
    # measured 7e-5 from float32. 1e-3 still catches corrupted weights (a garbled layer moves it by ~1e-2 or more).
    assert sum(losses) / WORLD == pytest.approx(fp32_losses[0], rel=1e-3)


def test_unused_adapter_under_ddp(runs):
    out, _ = runs
    ranks = load(out, "unused")
    for res in ranks:
        # Default DDP: the skipped layer's adapter never reports a gradient, and the next step refuses to run.
        assert res["default_error"] is not None and "find_unused_parameters=True" in res["default_error"]
    model, losses = reference("skippy")
    for res in ranks:
        assert_adapters_close(res["adapters"], model)  # DDP(find_unused_parameters=True)
        assert_adapters_close(res["fsdp_adapters"], model)  # FSDP2 needs no flag
    assert [sum(r["losses"][i] for r in ranks) / WORLD for i in range(W.STEPS)] == pytest.approx(losses, rel=1e-6)


def test_launcher_kills_ranks_on_timeout(tmp_path):
    # A hung collective must not leave ranks behind: launch() kills every rank's process group when it gives up.
    script = tmp_path / "hang.py"
    script.write_text("import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(120)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        launch(script, [], tmp_path, timeout=3.0)  # python prints its pid well within 3 s, then sleeps
    for rank in range(WORLD):
        pid = int((tmp_path / f"rank{rank}.log").read_text().split()[0])
        with pytest.raises(ProcessLookupError):  # reaped: the pid no longer exists
            os.kill(pid, 0)


def test_gathered_adapters_without_sharding_is_a_no_op():
    model = W.Skippy()
    params = {k: v for k, v in model.named_parameters()}
    with gathered_adapters(model, writeback=True) as m:
        assert m is model
        assert all(v is params[k] for k, v in model.named_parameters())


def test_gathered_adapters_needs_adapters():
    model = nn.Sequential(nn.Linear(4, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no LoRA layers"), gathered_adapters(model):
        pass
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_example_under_torchrun(tmp_path):
    # The documented command, with the 70B recipe's features on the tiny model: FSDP2, QLoRA, bf16 policy,
    # activation checkpointing; --measure prints each rank's measured peak next to the memory model.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", str(EXAMPLE),
           "--steps", "3", "--bf16", "--checkpointing", "--measure", "--out", str(tmp_path / "adapter")]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # torchrun forwards SIGTERM to its workers and waits for them; then force
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, log[-4000:]
    base = tiny_llama(vocab_size=256)  # the example's "tiny" size (64, 128, 2 layers, 4 heads, 2 KV) and vocab
    model = lowrank.load_adapter(base, tmp_path / "adapter")  # the gathered file is complete: full shapes, r = 8
    assert len(list(lowrank.lora_layers(model))) == 7 * TINY_LLAMA["num_hidden_layers"]
    assert all(layer.r == 8 and layer.lora_A.shape[1] == layer.in_features for _, layer in lowrank.lora_layers(model))
    peaks = [line for line in log.splitlines() if "MiB measured" in line]
    assert len(peaks) == WORLD, log[-4000:]
    for line in peaks:
        measured, estimated = (float(x) for x in re.findall(r"peak ([\d.]+) MiB measured, ([\d.]+) MiB", line)[0])
        # The model sums transients at their worst moment, so it errs high: +0.6..+16 % in docs/distributed.md.
        # "Measured" is the peak of live tensor bytes (the example's dispatch-mode accountant), which also counts
        # small tensors the model leaves out (rotary caches, masks, collective buffers, optimizer-step scratch)
        # whose size at the peak shifts with torch / transformers versions: with the closest ratio at 1.006, an
        # estimate up to 5 % under the measurement is accepted as that noise, not as a wrong model.
        assert 0.95 * measured <= estimated <= 1.25 * measured, line
