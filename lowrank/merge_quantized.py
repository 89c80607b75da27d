"""Merge trained adapters into their NF4 bases, keeping a 4-bit model: ``lowrank.merge_quantized``.

For every adapted NF4 layer the function the trained model computes is ``W' = deq(Q0) + s B A`` (the adapter was
trained against the dequantized base, not the original float weights). It is re-quantized to NF4 with the base's
block size and double quantization, and the ``LoRALinear`` is replaced by a plain ``NF4Linear`` holding the new
bytes (bitsandbytes-readable, see ``docs/NF4_FORMAT.md``).

Why plain rounding loses what was learned: ``deq(Q0)`` sits exactly on the NF4 grid, and a typical update moves an
element by much less than half a grid step, so round-to-nearest puts most elements back on their old code; the
relative weight error of "round" is then about the update's own size (measured on the demo adapter: see
``benchmarks/results/merge_quantized.md``). The methods:

* ``"round"``: ``nf4.quantize(W')``, what PEFT and Unsloth do (the baseline).
* ``"search"``: ``nf4_search.quantize_search`` with the base as ``like=``: per block the scale with the smallest
  squared error, the base's own scale among the candidates (no calibration data needed). Lower weight error than
  round, but on the demo a larger loss gap (0.312 vs 0.255): minimising ||W' - Q'|| is not what keeps the function.
* ``"gptq"``: ``nf4_search.quantize_gptq``: rounding with error feedback weighted by the layer inputs'
  ``H = X^T X`` collected from ``calibration`` batches, minimising the change of the layer's output instead of the
  weights (the update's effect on the output survives even where single elements cannot move a whole step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import nf4 as _nf4
from . import nf4_search
from ._progress import progress as _progress
from .adapters import lora_layers, replace_module
from .nf4_linear import NF4Linear

METHODS = ("round", "search", "gptq")


@dataclass
class LayerMerge:
    """One merged layer: ``error = ||deq(Q') - W'|| / ||W'||``, ``update = ||deq(Q0) + sBA - deq(Q0)|| / ||W'||``,
    ``round_error``: the error plain rounding would have given; ``output_error = ||X (deq(Q') - W')^T|| / ||X W'^T||``
    on the calibration inputs (None without them)."""

    name: str
    shape: tuple[int, int]
    error: float
    update: float
    round_error: float
    output_error: float | None = None


@dataclass
class MergeReport:
    """What `merge_quantized` did, per layer (printable: ``print(report)``)."""

    method: str
    layers: list[LayerMerge] = field(default_factory=list)

    def mean(self, key: str) -> float:
        values = [getattr(row, key) for row in self.layers if getattr(row, key) is not None]
        return sum(values) / len(values) if values else float("nan")

    def to_dict(self) -> dict:
        return {"method": self.method, "layers": [vars(row) | {"shape": list(row.shape)} for row in self.layers]}

    def __str__(self) -> str:
        width = max([len(row.name) for row in self.layers] + [5])
        head = f"{'layer':<{width}}  {'shape':>11}  {'update':>8}  {'error':>8}  {'round':>8}  {'out err':>8}"
        lines = [f"merge_quantized(method={self.method!r}): {len(self.layers)} layers -> NF4", head, "-" * len(head)]
        for r in self.layers:
            out = "" if r.output_error is None else f"{r.output_error:8.5f}"
            shape = f"{r.shape[0]}x{r.shape[1]}"
            lines.append(
                f"{r.name:<{width}}  {shape:>11}  {r.update:8.5f}  {r.error:8.5f}  {r.round_error:8.5f}  {out:>8}"
            )
        out = "" if all(r.output_error is None for r in self.layers) else f"{self.mean('output_error'):8.5f}"
        lines.append(f"{'mean':<{width}}  {'':>11}  {self.mean('update'):8.5f}  {self.mean('error'):8.5f}  "
                     f"{self.mean('round_error'):8.5f}  {out:>8}")  # fmt: skip
        return "\n".join(lines)


def _active_names(layer) -> list[str]:
    """The adapters a layer applies (v2 layers hold several by name; a round-1 layer holds exactly one)."""
    names = getattr(layer, "active_adapters", None)
    return list(names()) if callable(names) else ["default"]


def _check(model: nn.Module, method, calibration) -> list[tuple[str, nn.Module]]:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} (or None for the default), got {method!r}")
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers: nothing to merge (call lowrank.inject first)")
    for name, layer in layers:
        if getattr(layer, "mixed", None) is not None:
            raise ValueError(f"{name}: a lowrank.mixed_batch is active (each row has its own adapter); leave it first")
        active = _active_names(layer)
        if len(active) != 1:
            raise ValueError(
                f"{name}: merge_quantized folds exactly one active adapter, this layer has {active or 'none'} active "
                "(lowrank.set_adapter picks one)"
            )
        if not isinstance(layer.base, NF4Linear):
            raise ValueError(
                f"{name}: the base is a {type(layer.base).__name__}, not an NF4Linear; merge_quantized is for QLoRA "
                "models (lowrank.merge folds adapters into dense bases)"
            )
        if method == "gptq" and layer.base.in_features % layer.base.block_size:
            raise ValueError(
                f"{name}: method 'gptq' needs in_features ({layer.base.in_features}) to be a multiple of the block "
                f"size ({layer.base.block_size}); use method='search'"
            )
    if method == "gptq" and calibration is None:
        raise ValueError("method 'gptq' needs calibration batches (calibration=[batch, ...]); or use 'search'")
    return layers


@torch.no_grad()
def _hessians(model: nn.Module, layers, calibration) -> dict[str, torch.Tensor]:
    """``H = sum X^T X`` (float64, (in, in)) of every adapted layer's inputs over the calibration batches.

    Each batch is passed as ``model(**batch)`` (a dict), ``model(*batch)`` (tuple/list) or ``model(batch)``; the
    model runs in eval mode (no dropout) and its train/eval flags are restored after.
    """
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def pre_hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)  # (tokens, in)
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x

        return pre_hook

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        count = 0
        for batch in calibration:
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)
            count += 1
    finally:
        for h in handles:
            h.remove()
        for m, flag in modes:
            m.train(flag)
    missing = [name for name, _ in layers if name not in sums]
    if not count or missing:
        raise ValueError(f"the calibration batches ({count}) never reached {missing[:4] or 'the adapted layers'}")
    return sums


def _rel(diff: torch.Tensor, ref: torch.Tensor) -> float:
    return float(diff.norm() / ref.norm().clamp(min=1e-30))


def _output_rel(diff: torch.Tensor, ref: torch.Tensor, h: torch.Tensor) -> float:
    """``||X D^T|| / ||X W^T||`` from H = X^T X: ``sqrt(tr(D H D^T) / tr(W H W^T))``."""
    d, w = diff.to(torch.float64), ref.to(torch.float64)
    return float(((d @ h) * d).sum().clamp(min=0).sqrt() / ((w @ h) * w).sum().clamp(min=1e-300).sqrt())


def _new_base(old: NF4Linear, q: _nf4.NF4Tensor) -> NF4Linear:
    """An NF4Linear like ``old`` (sizes, dtypes, bias, Conv1D origin, mode) holding ``q``."""
    new = NF4Linear(old.in_features, old.out_features, False, old.block_size, old.double_quant, old.compute_dtype,
                    old.dtype, device="meta")  # fmt: skip
    new._store(q)
    new.bias = None if old.bias is None else nn.Parameter(old.bias.detach().clone(), requires_grad=False)
    new.from_conv1d = old.from_conv1d
    new.train(old.training)
    return new


def merge_quantized(model: nn.Module, *, method: str | None = None, calibration=None, progress: bool | None = None):
    """Fold every adapter into its NF4 base and re-quantize: each ``LoRALinear`` becomes a plain ``NF4Linear``.

    ``W' = deq(Q0) + s B A`` (the layer's ``merged_weight()``) is quantized to NF4 with the base's block size and
    double quantization; the new layer keeps the base's dtype, compute dtype and bias. Everything is computed
    before the model changes: on error the model is exactly as it was.

    Args:
        model: a QLoRA model (``lowrank.quantize`` then ``lowrank.inject``) with one active adapter per layer.
        method: "round" (PEFT's re-quantization), "search" (per-block scale search) or "gptq" (error feedback
            on calibration inputs). None: "gptq" when ``calibration`` is given, else "round". Measured on the demo
            (``benchmarks/results/merge_quantized.md``): held-out loss gap to the unmerged model 0.001 (gptq),
            0.255 (round), 0.312 (search: lower weight error than round, yet worse: its scales clip the large
            elements that matter most), so without data there is nothing better than round.
        calibration: an iterable of model inputs (dicts of tensors such as ``{"input_ids": ...}``, tuples, or
            tensors) from the training distribution; used by "gptq" and for the report's ``output_error``.
        progress: show a tqdm bar (None: when tqdm is installed and stderr is a terminal).

    Returns:
        A `MergeReport` (per layer: relative error, update size, round's error, output error).

    Raises:
        ValueError: unknown method; no adapters; a mixed batch active; not exactly one active adapter; a base
            that is not NF4; "gptq" without calibration or with ``in_features`` not a multiple of the block size.
    """
    if method is None:
        method = "gptq" if calibration is not None else "round"
    layers = _check(model, method, calibration)
    hessians = _hessians(model, layers, calibration) if calibration is not None else {}
    report, replacements = MergeReport(method), []
    with torch.no_grad():
        for name, layer in _progress(layers, desc="merge_quantized", total=len(layers), enable=progress):
            base = layer.base
            q0 = base.nf4_weight()
            target = layer.merged_weight().to(base.dtype)  # (out, in), what the quantizer sees (PEFT: the same)
            ref = target.float()
            if method == "round":
                q = _nf4.quantize(target, base.block_size, base.double_quant)
            elif method == "search":
                q = nf4_search.quantize_search(target, base.block_size, base.double_quant, like=q0)
            else:
                h = hessians[name].to(target.device)
                q = nf4_search.quantize_gptq(target, h, base.block_size, base.double_quant, like=q0)
            rounded = _nf4.quantize(target, base.block_size, base.double_quant) if method != "round" else q
            diff = q.dequantize().float() - ref
            h = hessians.get(name)
            report.layers.append(LayerMerge(
                name, (base.out_features, base.in_features), _rel(diff, ref),
                _rel(ref - base.dequantize_weight(torch.float32), ref), _rel(rounded.dequantize().float() - ref, ref),
                None if h is None else _output_rel(diff.cpu(), ref.cpu(), h.cpu()),
            ))  # fmt: skip
            replacements.append((name, _new_base(base, q)))
    for name, new in replacements:
        replace_module(model, name, new)
    return report
