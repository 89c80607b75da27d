"""NF4 kernel benchmark: dequantize GB/s, matmul time and TFLOP/s against bf16 torch.matmul and the roofline.

    python benchmarks/bench_nf4.py --out DIR            # CUDA: the issue-4 shapes (~3 min on an H100/H200)
    python benchmarks/bench_nf4.py --smoke --out DIR    # CPU: tiny shapes in Triton's interpreter (checks the code)

Ceilings are measured in the same run, not taken from a datasheet: device-to-device copy bandwidth (a 2 GiB
clone, bytes read + written) and a bf16 8192^3 torch.matmul on random data. The roofline floor of each case is
``max(flop / matmul_rate, bytes / copy_bandwidth)`` with bytes = NF4 weight (packed + scales) + activations in
and out, each once. Times are the median of ``triton.testing.do_bench`` (it flushes L2 before every call);
weights are also rotated among enough copies to exceed 3x the L2 (a 4096x4096 NF4 weight is 8.4 MB: it would sit
in the 50-60 MB L2 of an H100/H200). Inputs are random normal (never zeros: they can run faster).

Providers: ``torch_bf16`` (dense bf16 weight, cuBLAS), ``fused`` (our in-register dequant matmul: split-K for
M <= 16, tiled above), ``dequant`` (our dequantize kernel, then torch.matmul), ``bnb`` (bitsandbytes
``matmul_4bit``, when installed); ``*_load``: ours with the code-book lookup as a global load instead of
``tl.gather`` (the two variants of ``nf4_dequant._decode``, to pick the default by measurement). Writes
``bench_nf4.json`` and ``bench_nf4.md`` into ``--out``.

Entry ``lora_decode`` (op column): one NF4 layer plus a LoRA adapter (r = 16, bf16 A and B) at decode sizes,
``y + scale * (x A^T) B^T``. Providers: ``unfused`` (NF4 matmul, then ``x @ A^T``, then ``@ B^T``: three launches
reading x twice) and ``fused`` (``nf4_lora.matmul_lora``: base matmul and ``x A^T`` in one pass, then ``@ B^T``).
Both finish with the same scale, ``@ B^T`` and add; ``speedup_vs_unfused`` decides LOWRANK_FUSED_LORA's default.

A case that raises is recorded and the run goes on (the other rows are still measured and written); the failures
are listed in ``bench_nf4.md`` and the exit status is 1 when there was any.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ARGS.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
ARGS.add_argument("--smoke", action="store_true", help="tiny shapes; on a CPU-only machine via TRITON_INTERPRET=1")
ARGS.add_argument("--quick", action="store_true", help="fewer shapes (the M = 1 and M = 8192 headline cases)")
ARGS.add_argument("--no-backward", action="store_true", help="skip the grad_x = grad_y @ W cases")
OPTS = ARGS.parse_args() if __name__ == "__main__" else ARGS.parse_args([])

import torch

if OPTS.smoke and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (lowrank.kernels imports it)

import common
import triton

from lowrank import dispatch, nf4
from lowrank.kernels import nf4_dequant, nf4_lora, nf4_matmul

CUDA = torch.cuda.is_available()
if not CUDA and not OPTS.smoke and __name__ == "__main__":
    sys.exit("bench_nf4.py needs a CUDA device (use --smoke for a CPU dry run through the Triton interpreter)")
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16
# (N, K) weight shapes: a 4096x4096 projection and the Llama-70B-sized MLP up (28672x8192) and down (8192x28672).
SHAPES = [(4096, 4096), (28672, 8192), (8192, 28672)]
M_VALUES = [1, 16, 8192]
if OPTS.quick:
    SHAPES, M_VALUES = SHAPES[:2], [1, 8192]
# LoRA decode: (N, K) of the Llama-3-8B attention projection and MLP down projection (K = 14336: the longest x).
LORA_SHAPES, LORA_M, LORA_R = [(4096, 4096), (4096, 14336)], [1, 16], 16
if OPTS.smoke:
    SHAPES, M_VALUES = [(48, 128)], [1, 17]
    LORA_SHAPES = [(48, 128)]
try:  # the peer, only where installed and usable on this device
    import bitsandbytes as bnb

    HAVE_BNB = CUDA
except Exception:  # noqa: BLE001 - any import failure means "not available"
    bnb, HAVE_BNB = None, False


# "case: error" of every measurement that raised; main() lists them in the results and exits 1 when any.
FAILURES: list[str] = []


def bench(fn) -> float:
    """Median milliseconds of ``fn()``: do_bench on CUDA (L2 flushed per call), wall clock on CPU."""
    if CUDA:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return 1e3 * common.median_time(fn, warmup=1, repeats=3)


def measure(case: str, fn) -> float | None:
    """``bench(fn)`` and a progress line; on an exception, None and an entry in FAILURES (the run goes on)."""
    try:
        ms = bench(fn)
    except Exception as e:  # noqa: BLE001 - any failure is recorded; the other cases still run
        FAILURES.append(f"{case}: {type(e).__name__}: {e}")
        common.progress(f"{case} FAILED: {type(e).__name__}: {e}")
        return None
    common.progress(f"{case}: {ms:.4f} ms")
    return ms


def ceilings() -> dict:
    """Measured copy bandwidth (bytes read + written per second) and bf16 matmul rate (FLOP/s)."""
    if not CUDA:
        return {"copy_GBps": None, "bf16_TFLOPs": None, "l2_bytes": 0}
    src = torch.randn(2**29 // 2, device=DEVICE, dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE)
    mm_ms = bench(lambda: a @ b)
    props = torch.cuda.get_device_properties(DEVICE)
    return {"copy_GBps": 2 * 2**29 / copy_ms / 1e6, "bf16_TFLOPs": 2 * 8192**3 / mm_ms / 1e9,
            "l2_bytes": getattr(props, "L2_cache_size", 0), "sm_count": props.multi_processor_count}  # fmt: skip


def failure_notes() -> list[str]:
    """The markdown section listing FAILURES (empty when nothing failed); one line each, whitespace collapsed and
    cut at 300 characters (a Triton compile error runs to pages; the json keeps it whole)."""
    if not FAILURES:
        return []
    lines = [f"- {' '.join(f.split())[:300]}" for f in FAILURES]
    return [f"## FAILED: {len(FAILURES)} case(s), not in the table\n\n" + "\n".join(lines)]


def rotation(make, nbytes: int, l2: int):
    """Copies enough to exceed 3x the L2 (at most 16); returns a function giving the next copy each call."""
    copies = [make() for _ in range(max(1, min(16, math.ceil(3 * l2 / max(nbytes, 1)))))]
    state = {"i": 0}

    def next_copy():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]

    return next_copy


def _clone(q: nf4.NF4Tensor) -> nf4.NF4Tensor:
    return nf4.NF4Tensor(q.shape, q.dtype, q.block_size, **{name: t.clone() for name, t in q.tensors().items()})


def lookup(kind: str, fn):
    """``fn`` run with the kernels' code-book lookup set to ``kind`` (the two variants of nf4_dequant._decode)."""

    def run():
        with dispatch.override_settings(nf4_lookup=kind):
            return fn()

    return run


def roofline_ms(flop: float, nbytes: float, ceil: dict) -> float | None:
    if not ceil["copy_GBps"]:
        return None
    return max(flop / (ceil["bf16_TFLOPs"] * 1e9), nbytes / (ceil["copy_GBps"] * 1e6))


def result_row(ms: float, flop: float, nbytes: float, ceil: dict, **fields) -> dict:
    """``fields`` + ms, TFLOP/s (GB/s when ``flop`` is 0: a pure data movement) and the fraction of the roofline."""
    floor = roofline_ms(flop, nbytes, ceil)
    rate = {"TFLOPs": flop / ms / 1e9} if flop else {"GBps": nbytes / ms / 1e6}
    return {**fields, "ms": ms, **rate, "roofline_ms": floor, "of_roofline": floor / ms if floor else None}


def add_speedups(case: list[dict], ref: str, column: str) -> None:
    """``row[column]`` = time of provider ``ref`` / the row's time, in each row of a case (None if ``ref`` failed)."""
    base = next((r["ms"] for r in case if r["provider"] == ref), None)
    for row in case:
        row[column] = base / row["ms"] if base else None


def _dequant_providers(w: torch.Tensor, q: nf4.NF4Tensor, l2: int) -> dict:
    nxt = rotation(lambda: _clone(q), q.nbytes, l2)
    providers = {
        "ours": lambda: nf4_dequant.dequantize(nxt(), DTYPE),
        "ours_load": lookup("load", lambda: nf4_dequant.dequantize(nxt(), DTYPE)),
    }
    if HAVE_BNB:
        wb, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        providers["bnb"] = lambda: bnb.functional.dequantize_4bit(wb, state, quant_type="nf4")
    return providers


def dequant_rows(ceil: dict) -> list[dict]:
    rows = []
    for n, k in SHAPES:
        w = (torch.randn(n, k, device=DEVICE) * 0.02).to(DTYPE)
        q = nf4.quantize(w, 64, True)
        nbytes = q.nbytes + w.numel() * w.element_size()  # read packed + scales, write bf16
        for name, fn in _dequant_providers(w, q, ceil["l2_bytes"]).items():
            ms = measure(f"dequant {n}x{k} {name}", fn)
            if ms is not None:
                rows.append(result_row(ms, 0, nbytes, ceil, op="dequant", N=n, K=k, provider=name))
    return rows


def _matmul_providers(op: str, x: torch.Tensor, w_dense, w_nf4, bnb_w) -> dict:
    """name -> call for one case; ``w_dense`` / ``w_nf4`` give the next rotated copy of the weight."""
    if op == "grad_x":
        return {
            "torch_bf16": lambda: x @ w_dense(),  # (M, N) @ (N, K)
            "fused": lambda: nf4_matmul.matmul_grad_x(x, w_nf4(), method="fused"),
            "dequant": lambda: nf4_matmul.matmul_grad_x(x, w_nf4(), method="dequant"),
        }
    providers = {
        "torch_bf16": lambda: x @ w_dense().T,  # (M, K) @ (K, N)
        "fused": lambda: nf4_matmul.matmul(x, w_nf4(), method="fused"),
        "dequant": lambda: nf4_matmul.matmul(x, w_nf4(), method="dequant"),
    }
    if x.shape[0] <= nf4_matmul.SMALL_M:
        providers["fused_load"] = lookup("load", lambda: nf4_matmul.matmul(x, w_nf4(), method="fused"))
    if bnb_w is not None:
        providers["bnb"] = lambda: bnb.matmul_4bit(x, bnb_w[0].t(), quant_state=bnb_w[1])
    return providers


def matmul_rows(ceil: dict, backward: bool, flush) -> list[dict]:
    rows = []
    for n, k in SHAPES:
        w = (torch.randn(n, k, device=DEVICE) * 0.02).to(DTYPE)
        q = nf4.quantize(w, 64, True)
        w_nf4 = rotation(lambda q=q: _clone(q), q.nbytes, ceil["l2_bytes"])
        w_dense = rotation(lambda q=q: nf4.dequantize(q, DTYPE), w.numel() * 2, ceil["l2_bytes"])
        bnb_w = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4") if HAVE_BNB else None
        for m in M_VALUES:
            ops = [("forward", k, n)] + ([("grad_x", n, k)] if backward else [])
            for op, red, out_cols in ops:
                x = torch.randn(m, red, device=DEVICE, dtype=DTYPE)
                flop = 2.0 * m * n * k
                act = 2 * m * (red + out_cols)
                case = []
                for name, fn in _matmul_providers(op, x, w_dense, w_nf4, bnb_w).items():
                    ms = measure(f"{op} M={m} {n}x{k} {name}", fn)
                    if ms is not None:
                        weight_bytes = q.nbytes if name != "torch_bf16" else 2 * n * k
                        case.append(result_row(ms, flop, weight_bytes + act, ceil, op=op, M=m, N=n, K=k, provider=name))
                add_speedups(case, "torch_bf16", "speedup_vs_bf16")
                rows += case
        if CUDA:
            torch.cuda.empty_cache()
        flush(rows)  # partial results survive a timeout
    return rows


def _lora_providers(x, w_nf4, a, b, scale) -> dict:
    """unfused vs fused LoRA decode step; ``w_nf4`` gives the next rotated copy of the NF4 weight."""

    def unfused():
        y = nf4_matmul.matmul(x, w_nf4())  # (M, K) @ (K, N): the base layer
        return y + ((x @ a.T) * scale) @ b.T  # (M, K) @ (K, r) @ (r, N): a second read of x

    def fused():
        y, xa = nf4_lora.matmul_lora(x, w_nf4(), a)  # one pass over x; xa (M, r) float32
        return y + (xa.to(x.dtype) * scale) @ b.T

    return {"unfused": unfused, "fused": fused}


def lora_rows(ceil: dict, flush) -> list[dict]:
    """Entry ``lora_decode``: unfused vs fused NF4 + LoRA (r = LORA_R) at M in LORA_M."""
    rows = []
    for n, k in LORA_SHAPES:
        q = nf4.quantize((torch.randn(n, k, device=DEVICE) * 0.02).to(DTYPE), 64, True)
        w_nf4 = rotation(lambda q=q: _clone(q), q.nbytes, ceil["l2_bytes"])
        a = (torch.randn(LORA_R, k, device=DEVICE) / k**0.5).to(DTYPE)
        b = (torch.randn(n, LORA_R, device=DEVICE) * 0.01).to(DTYPE)
        for m in LORA_M:
            x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
            flop = 2.0 * m * (n * k + LORA_R * (k + n))
            nbytes = q.nbytes + 2 * LORA_R * (k + n) + 2 * m * (k + n)  # NF4 W, bf16 A and B, x in and y out once
            case = []
            for name, fn in _lora_providers(x, w_nf4, a, b, 2.0).items():
                ms = measure(f"lora_decode M={m} {n}x{k} r={LORA_R} {name}", fn)
                if ms is not None:
                    fields = {"op": "lora_decode", "M": m, "N": n, "K": k, "r": LORA_R, "provider": name}
                    case.append(result_row(ms, flop, nbytes, ceil, **fields))
            add_speedups(case, "unfused", "speedup_vs_unfused")
            rows += case
        flush(rows)
    return rows


def main() -> None:
    torch.manual_seed(0)
    env = common.environment(DEVICE)
    env["interpreter"] = nf4_dequant.interpreting()
    ceil = ceilings()
    common.progress(f"device {env['device']}; ceilings {ceil}")
    cols = ["op", "M", "N", "K", "r", "provider", "ms", "TFLOPs", "GBps", "speedup_vs_bf16", "speedup_vs_unfused",
            "roofline_ms", "of_roofline"]  # fmt: skip
    out = OPTS.out or common.RESULTS_DIR

    def write(rows, notes=()):
        notes = [*notes, *failure_notes()]  # in the partial writes too: a timeout keeps them
        return common.write_results("bench_nf4", rows, cols, "NF4 kernels: dequantize and matmul", env=env,
                                    notes="\n\n".join(notes), extra={"ceilings": ceil, "failures": FAILURES},
                                    out_dir=out)  # fmt: skip

    rows = dequant_rows(ceil)
    write(rows)
    rows += matmul_rows(ceil, not OPTS.no_backward, lambda more: write(rows + more))
    rows += lora_rows(ceil, lambda more: write(rows + more))
    small = [r for r in rows if r["op"] == "forward" and r.get("M") == 1 and r["provider"] == "fused"]
    fused_lora = [r for r in rows if r["op"] == "lora_decode" and r["provider"] == "fused"]
    notes = [
        (
            f"Ceilings measured in this run: copy {ceil['copy_GBps'] or 0:.0f} GB/s (read + write), bf16 matmul "
            f"{ceil['bf16_TFLOPs'] or 0:.0f} TFLOP/s; L2 {ceil['l2_bytes'] / 2**20:.0f} MiB (weights rotated past 3x)."
        ),
        (
            "Targets (issue 4): dequant >= 85% of copy bandwidth; fused M=1 >= 3x torch_bf16 on 4096x4096 and "
            "28672x8192; large M within 1.10x of torch_bf16 at M = 8192."
        ),
        "M=1 fused speedups: " + ", ".join(f"{r['N']}x{r['K']}: {r['speedup_vs_bf16'] or 0:.2f}x" for r in small),
        f"LoRA decode (r = {LORA_R}), fused vs unfused: "
        + ", ".join(f"M={r['M']} {r['N']}x{r['K']}: {r['speedup_vs_unfused'] or 0:.2f}x" for r in fused_lora),
    ]
    if OPTS.smoke:
        notes.append(
            "SMOKE RUN (tiny shapes" + (", Triton CPU interpreter" if not CUDA else "") + "): not a measurement."
        )
    paths = write(rows, notes)
    print(common.markdown_table(rows, cols))
    print("\n".join(notes + failure_notes()))
    print(f"wrote {paths[0]} and {paths[1]}")
    fused = [r["ms"] for r in rows if r["provider"] == "fused" and r["op"] != "lora_decode"]
    fused_ms = statistics.median(fused) if fused else 0
    common.progress(f"done (median fused time {fused_ms:.4f} ms)")
    if FAILURES:
        sys.exit(f"bench_nf4: {len(FAILURES)} case(s) failed (listed in {paths[1]})")


if __name__ == "__main__":
    main()
