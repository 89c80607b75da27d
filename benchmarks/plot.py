"""PNG plots of the training-step benchmark: the headline bars and the two scaling sweeps.

    python benchmarks/plot.py [benchmarks/results/train.json]

Writes next to the JSON: `train_step.png` (step time and training memory per scenario and provider),
`train_scaling_seq.png` and `train_scaling_layers.png` (step time and memory against sequence length and layer
count, one line per scenario/provider).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on benchmark machines
import matplotlib.pyplot as plt

DEFAULT = Path(__file__).resolve().parent / "results" / "train.json"
# lowrank solid, peers dashed; one colour per scenario so a reader pairs the lines at a glance
COLOURS = {"lora_qv": "tab:blue", "lora_all": "tab:green", "qlora_all": "tab:red", "full": "tab:gray"}


def _memory_key(rows: list[dict]) -> tuple[str, str]:
    if any("train_mem_mb" in r for r in rows):
        return "train_mem_mb", "training memory (MB, fresh process)"
    return "step_delta_mb", "step peak above start (MB)"


def _title(payload: dict) -> str:
    env = payload["environment"]
    return f"{env['device']} ({env['cpu']}, {env['torch_threads']} threads), {env['date_utc'][:10]}"


def plot_scaling(payload: dict, axis: str, path: Path) -> Path | None:
    """Two panels (step time, memory) against `axis` ("seq" or "layers"); None when there is nothing to plot."""
    rows = payload.get("scaling", {}).get(axis) or []
    if not rows:
        return None
    mem_key, mem_label = _memory_key(rows)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key in sorted({(r["scenario"], r["provider"]) for r in rows}):
        pts = sorted((r[axis], r) for r in rows if (r["scenario"], r["provider"]) == key)
        xs = [x for x, _ in pts]
        style = {
            "color": COLOURS.get(key[0], "black"),
            "linestyle": "-" if key[1] == "lowrank" else "--",
            "marker": "o",
        }
        ax_t.plot(xs, [r["median_s"] for _, r in pts], label=f"{key[0]} / {key[1]}", **style)
        ax_m.plot(xs, [r.get(mem_key) for _, r in pts], label=f"{key[0]} / {key[1]}", **style)
    xlabel = "sequence length (tokens)" if axis == "seq" else "decoder layers"
    for ax, ylabel in ((ax_t, "median step time (s)"), (ax_m, mem_label)):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if axis == "seq":
            ax.set_xscale("log", base=2)
    ax_t.legend(fontsize=8)
    fixed = "layers" if axis == "seq" else "seq"
    fig.suptitle(f"Training step vs {xlabel} ({fixed} = {rows[0][fixed]}); {_title(payload)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_headline(payload: dict, path: Path) -> Path | None:
    """Grouped bars: step time and memory per scenario, one bar per provider, for the synthetic model."""
    rows = [r for r in payload["rows"] if r["model"] != "smollm2-135m"]
    if not rows:
        return None
    mem_key, mem_label = _memory_key(rows)
    labels = [f"{r['scenario']}\n{r['provider']}" for r in rows]
    colours = [COLOURS.get(r["scenario"], "black") for r in rows]
    hatches = ["" if r["provider"] in ("lowrank", "torch") else "//" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, ylabel in ((axes[0], "median_s", "median step time (s)"), (axes[1], mem_key, mem_label)):
        bars = ax.bar(range(len(rows)), [r.get(key) or 0 for r in rows], color=colours)
        for bar, hatch in zip(bars, hatches, strict=False):
            bar.set_hatch(hatch)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    r0 = rows[0]
    fig.suptitle(
        f"Training step, {r0['model']} Llama, {r0['layers']} layers, batch {r0['batch']} x {r0['seq']}; "
        f"{_title(payload)}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_results(json_path: Path | str) -> list[Path]:
    """All plots of one `train.json`; returns the PNG paths written."""
    json_path = Path(json_path)
    payload = json.loads(json_path.read_text())
    out = json_path.parent
    paths = [
        plot_headline(payload, out / "train_step.png"),
        plot_scaling(payload, "seq", out / "train_scaling_seq.png"),
        plot_scaling(payload, "layers", out / "train_scaling_layers.png"),
    ]
    return [p for p in paths if p is not None]


if __name__ == "__main__":
    for p in plot_results(sys.argv[1] if len(sys.argv) > 1 else DEFAULT):
        print(p)
