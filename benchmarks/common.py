"""Shared helpers for the benchmarks: timing, peak memory, the environment record, JSON + markdown output.

Every `benchmarks/bench_*.py` imports this one module (run them as `python benchmarks/bench_x.py`, which puts
`benchmarks/` on `sys.path`). Kept small and stable on purpose: other benchmark files code against it.

    from common import environment, time_alternating, write_results
    times = time_alternating({"lowrank": step_a, "peft": step_b}, warmup=2, repeats=5)
    write_results("bench_x", rows, columns=["provider", "median_s"], title="...")

Timing: the median of `repeats` calls after `warmup` calls; with several providers the calls alternate
(A B C, B C A, C A B, ...) so slow drift of the machine (thermal, a neighbour process) hits every provider alike.
Memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the resident-set high-water mark (VmHWM), which Linux
lets a process reset by writing "5" to /proc/self/clear_refs, so one process can measure the peak of one phase.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"


def adamw_step(model: torch.nn.Module, params, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A zero-argument training step on a fixed batch: zero_grad, forward + LM loss, backward, AdamW (lr 1e-4).

    Returns the loss as a detached tensor (no ``.item()``: a host sync inside the timed region on CUDA).
    """
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def progress(msg: str) -> None:
    """Print one progress line with the wall-clock time, flushed (benchmarks run for minutes)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sync(device: str | torch.device | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_alternating(
    fns: dict[str, Callable[[], object]],
    warmup: int = 2,
    repeats: int = 5,
    device: str | torch.device | None = None,
) -> dict[str, list[float]]:
    """Time several callables, interleaved: warm-up rounds, then `repeats` rounds of one call each, the order
    rotated by one each round (A B C, B C A, C A B, ...).

    Args:
        fns: name -> zero-argument callable (one training step, one kernel call, ...).
        warmup: untimed rounds first (allocator, autotuning, lazy init).
        repeats: timed rounds.
        device: synchronised around each call when it is a CUDA device.

    Returns:
        name -> list of `repeats` wall times in seconds; take `statistics.median` of it.
    """
    if not fns:
        return {}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats):
        # Rotate the order each round: a call runs after a different neighbour every time, so the cost one
        # leaves behind (freed memory to fault in again, a cold cache) is not always charged to the same one.
        for name in names[i % len(names) :] + names[: i % len(names)]:
            fn = fns[name]
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median_time(fn: Callable[[], object], warmup: int = 2, repeats: int = 5, device=None) -> float:
    """Median wall time in seconds of `fn()` over `repeats` calls after `warmup` calls."""
    return statistics.median(time_alternating({"f": fn}, warmup, repeats, device)["f"])


# ---- memory -------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def rss_bytes() -> int:
    """Current resident set size of this process in bytes (0 where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return (kib or 0) * 1024


def current_memory_bytes(device: str | torch.device | None = None) -> int:
    """Memory in use now: CUDA bytes allocated by tensors, or the CPU resident set size."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated()
    return rss_bytes()


def reset_peak_memory(device: str | torch.device | None = None) -> bool:
    """Start a new peak-memory window. Returns False when the platform cannot reset the CPU peak."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5": reset VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_memory_bytes(device: str | torch.device | None = None) -> int:
    """Peak memory since the last `reset_peak_memory`: CUDA max allocated, or the CPU RSS high-water mark.

    Without /proc (macOS) this falls back to `ru_maxrss`, the peak of the whole process life.
    """
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated()
    kib = _status_kib("VmHWM")
    if kib is None:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return kib * 1024


def tensor_bytes(tensors) -> int:
    """Total storage bytes of an iterable of tensors (parameters, buffers, optimizer states)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise), so the RSS reflects live tensors."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def frozen_bytes(model: torch.nn.Module) -> int:
    """Bytes of everything stored but not trained: frozen parameters, buffers, bitsandbytes quantization state.

    Shared storage (tied embeddings, the shared NF4 code book) counts once.
    """
    seen: set[int] = set()
    total = 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for p in model.parameters():
        if not p.requires_grad:
            add(p)
    for b in model.buffers():
        add(b)
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        while state is not None:  # bitsandbytes QuantState: absmax, code, offset, then the nested state2
            for field in ("absmax", "code", "offset"):
                add(getattr(state, field, None))
            state = getattr(state, "state2", None)
    return total


# ---- environment record -------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str | torch.device | None = None) -> dict:
    """Where and with what a benchmark ran: machine, device, versions, git SHA (and dirty flag), UTC date."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    status = _git("status", "--porcelain")
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "python": platform.python_version(),
        "versions": {
            name: _version(name)
            for name in ("torch", "triton", "transformers", "peft", "bitsandbytes", "lowrank", "numpy")
        },
    }


# ---- output -------------------------------------------------------------------------------------------------


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 999.5 else f"{value:,.0f}"  # 999.7 would print as "1e+03"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A GitHub markdown table of `rows` restricted to `columns` (missing values print as '-')."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def environment_markdown(env: dict) -> str:
    """The environment record as a short bullet list for the top of a results file."""
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    sha = (env["git_sha"] or "unknown")[:12] + (" (dirty)" if env.get("git_dirty") else "")
    return "\n".join(
        [
            f"- date (UTC): {env['date_utc']}",
            (
                f"- machine: {env['cpu']}, {env['cpu_cores']} cores ({env['torch_threads']} torch threads), "
                f"device {env['device']}"
            ),
            f"- versions: python {env['python']}, {versions}",
            f"- git: {sha}",
        ]
    )


def write_results(
    name: str,
    rows: list[dict],
    columns: Sequence[str],
    title: str,
    env: dict | None = None,
    notes: str = "",
    extra: dict | None = None,
    out_dir: Path | str = RESULTS_DIR,
) -> tuple[Path, Path]:
    """Write `<out_dir>/<name>.json` (env + rows + extra) and `<out_dir>/<name>.md` (env, table, notes).

    Returns:
        (json_path, markdown_path).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = env if env is not None else environment()
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    payload = {"name": name, "environment": env, "rows": rows, **(extra or {})}
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    parts = [f"# {title}", "", environment_markdown(env), "", markdown_table(rows, columns), ""]
    if notes:
        parts += [notes.strip(), ""]
    md_path.write_text("\n".join(parts))
    return json_path, md_path
