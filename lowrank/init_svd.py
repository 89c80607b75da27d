"""SVD-based adapter initialisations: PiSSA and LoftQ, as functions of one dense weight.

Both return an adapter (A, B) that carries part of the weight and a new frozen base that carries the rest, so the
layer's output ``base(x) + scale * B A x`` starts (close to) the original ``W x``:

* PiSSA (arXiv 2404.02948): the principal part. ``W = U S V^T``, ``A = sqrt(S_r) V_r^T / sqrt(scale)``,
  ``B = U_r sqrt(S_r) / sqrt(scale)`` (so ``scale * B A = U_r S_r V_r^T``) and the base becomes the residual
  ``W - scale * B A``.
* LoftQ (arXiv 2310.08659): a quantized base plus the low-rank fit of its error. ``R = W``; repeat
  ``Q = nf4(R)``, ``(B, A) = rank-r SVD of (W - deq(Q))``, ``R = W - scale * B A``; the base becomes ``Q``.

Weights are (out_features, in_features); A is (r, in), B is (out, r), float32 (float64 for a float64 weight).
The SVD is full (``torch.linalg.svd``, exact) or randomized (``niter`` subspace iterations of
``torch.svd_lowrank``, PEFT's ``pissa_niter_K``): O(out * in * r) instead of O(out * in * min(out, in)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import nf4 as _nf4
from .base import base_view
from .nf4_linear import NF4Linear


def _check(weight: torch.Tensor, r: int, scale: float, name: str) -> None:
    """Raise a TypeError / ValueError naming ``name`` if the weight, rank or scale cannot be used."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"{name}: expected a 2-D (out_features, in_features) weight tensor, got {shape}")
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{name}: an SVD init needs a floating-point dense weight, got {weight.dtype}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{name}: r must be an int >= 1, got {r!r}")
    if r > min(weight.shape):
        raise ValueError(f"{name}: r={r} is larger than min(out_features, in_features) = {min(weight.shape)}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{name}: scale must be a finite number > 0, got {scale!r}")
    if weight.device.type == "meta":
        raise ValueError(f"{name}: the weight is on the meta device: load the weights first")
    if not bool(torch.isfinite(weight.detach()).all()):
        bad = int((~torch.isfinite(weight.detach())).sum())
        raise ValueError(f"{name}: the weight holds {bad} NaN/inf value(s): its SVD would be meaningless")


def _work_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def top_r_svd(w: torch.Tensor, r: int, niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The r largest singular triplets of a float32/float64 matrix ``w`` (m, n): ``U_r (m, r), S_r (r,), V_r (n, r)``.

    ``niter=None``: the full SVD, truncated. ``niter=k``: randomized (Halko et al.) with k power iterations and
    ``q = min(2r, m, n)`` columns (oversampling to 2r keeps the top r close to exact on the decaying spectra of
    trained weights at twice the cost of q = r, which PEFT uses). The random test matrix comes from a fixed seed
    in a forked RNG, so the result is reproducible and the caller's RNG state is untouched.
    """
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :r], s[:r], vh[:r].T
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise ValueError(f"niter must be None (full SVD) or an int >= 0, got {niter!r}")
    q = min(2 * r, *w.shape)
    devices = [w.device] if w.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(w, q=q, niter=niter)
    return u[:, :r], s[:r], v[:, :r]


def _split(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``scale * B A = U S V^T``: each factor takes sqrt(S / scale)."""
    root = (s / scale).sqrt()
    return (root[:, None] * v.T).contiguous(), (u * root[None, :]).contiguous()  # (r, n), (m, r)


def pissa(
    weight: torch.Tensor, r: int, scale: float, *, niter: int | None = None, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA: the adapter takes the top-r singular part of W, the base keeps the residual.

    ``A = sqrt(S_r) V_r^T / sqrt(scale)``, ``B = U_r sqrt(S_r) / sqrt(scale)``, ``residual = W - scale * B A``
    (computed in float32, float64 for a float64 W, and rounded once to W's dtype).

    Args:
        weight: dense W (out_features, in_features), float16/bfloat16/float32/float64, finite.
        r: rank, 1 <= r <= min(out_features, in_features). scale: the adapter's multiplier (alpha / r).
        niter: None for the full SVD, else the randomized SVD with this many power iterations.
        name: the layer's name, for error messages.

    Returns:
        ``(A (r, in), B (out, r), residual (out, in))``; A and B in float32 (float64 for a float64 W), the
        residual in W's dtype, all on W's device.

    Raises:
        TypeError: W is not a 2-D floating tensor. ValueError: bad r / scale / niter, NaN/inf in W.
    """
    _check(weight, r, scale, name)
    with torch.no_grad():
        w = weight.detach().to(_work_dtype(weight))
        a, b = _split(*top_r_svd(w, r, niter), scale)
        residual = (w - scale * (b @ a)).to(weight.dtype)
    return a, b, residual


@dataclass
class LoftQResult:
    """What `loftq` returns.

    Attributes:
        A: (r, in) float32. B: (out, r) float32. base: the NF4Tensor Q (W's dtype and shape).
        error: ``||W - deq(Q) - scale * B A||_F``. error_nf4: ``||W - deq(nf4(W))||_F``, plain QLoRA's error.
        errors: ``error`` after each iteration (the returned iterate is the one with the smallest).
    """

    A: torch.Tensor
    B: torch.Tensor
    base: _nf4.NF4Tensor
    error: float
    error_nf4: float
    errors: list[float]

    @property
    def ratio(self) -> float:
        """``error / error_nf4``: below 1 when LoftQ approximates W better than NF4 alone (0/0 counts as 0)."""
        return self.error / self.error_nf4 if self.error_nf4 > 0 else 0.0


def _dequantized(q: _nf4.NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    # What the NF4 layer multiplies with: W rounded to its 16-bit original dtype, if it had one (nf4.rounding_dtype).
    return _nf4.dequantize(q, _nf4.rounding_dtype(q, dtype)).to(dtype)


def loftq(
    weight: torch.Tensor,
    r: int,
    scale: float,
    *,
    iters: int = 5,
    niter: int | None = None,
    block_size: int = 64,
    double_quant: bool = True,
    name: str = "weight",
) -> LoftQResult:
    """LoftQ on lowrank's NF4: a quantized base Q and an adapter with ``deq(Q) + scale * B A ~ W``.

    ``R_0 = W``; for t = 1..iters: ``Q_t = nf4(R_{t-1})`` (R rounded to W's dtype first, as a saved residual
    model would be), ``(B_t, A_t)`` = the rank-r SVD of ``W - deq(Q_t)`` split as in `pissa`,
    ``R_t = W - scale * B_t A_t``. Returns the iterate with the smallest ``||W - deq(Q_t) - scale B_t A_t||_F``;
    the first one already beats ``deq(nf4(W))`` alone (the rank-r SVD of the NF4 error removes part of it), so
    ``ratio < 1`` whenever NF4 has any error. Unlike PEFT (which fits ``B A``, ignoring lora_alpha / r), the
    fit is for ``scale * B A``, the term the layer adds. Deterministic: the randomized SVD uses a fixed seed.

    Args:
        weight: dense float W (out, in), finite (a quantized weight cannot be used: dequantize it first, or
            better use the float original).
        r: rank <= min(out, in). scale: the adapter's multiplier. iters: alternations, >= 1 (PEFT: 1, the
            paper: up to 5). niter: None for the full SVD, else randomized with this many power iterations.
        block_size, double_quant: the NF4 format of Q (as `lowrank.quantize`). name: for error messages.

    Raises:
        TypeError / ValueError: as `pissa`, plus iters < 1 and bad NF4 arguments.
    """
    _check(weight, r, scale, name)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"{name}: iters must be an int >= 1, got {iters!r}")
    _nf4.check_block_size(block_size)
    dtype = _work_dtype(weight)
    with torch.no_grad():
        w = weight.detach().to(dtype)
        error_nf4 = float(torch.linalg.norm(w - _dequantized(_nf4.quantize(weight, block_size, double_quant), dtype)))
        best, errors, residual = None, [], weight.detach()
        for _ in range(iters):
            q = _nf4.quantize(residual, block_size, double_quant)
            target = w - _dequantized(q, dtype)  # what the adapter should carry
            a, b = _split(*top_r_svd(target, r, niter), scale)
            fit = scale * (b @ a)
            errors.append(float(torch.linalg.norm(target - fit)))
            if best is None or errors[-1] < best[0]:
                best = (errors[-1], a, b, q)
            residual = (w - fit).to(weight.dtype)
    error, a, b, q = best
    return LoftQResult(A=a, B=b, base=q, error=error, error_nf4=error_nf4, errors=errors)


# --- as layer initialisations (lowrank.init.INITS: "pissa", "pissa_niter_<k>", "loftq") ------------------------
# A base-changing init records what it replaced in ``layer.__dict__["_svd_init"]`` (never in a state dict):
# `restore_base` undoes it when the adapter leaves (eject, delete_adapter).


def check_layer(kind: str, layer_name: str, layer, adapter) -> None:
    """Raise (naming the layer) if init ``kind`` ("pissa" / "loftq") cannot give ``adapter`` (not added yet) its
    values on ``layer``; changes nothing. `lowrank.inject` calls it for every target before it changes any."""
    where = layer_name or type(layer).__name__
    view = layer.view
    if len(layer.adapters):
        raise ValueError(f"{where}: init={kind!r} changes the base, but the layer already has adapters "
                         f"{list(layer.adapters)} that were trained on it; use it on a layer's first "
                         "adapter")  # fmt: skip
    if getattr(layer, "_svd_init", None) is not None:
        raise ValueError(f"{where}: its base was already changed by {layer._svd_init['kind']!r} for adapter "
                         f"{layer._svd_init['adapter']!r}; a second base-changing init would not be "
                         "undoable")  # fmt: skip
    if view.quantized:
        hint = "LoftQ quantizes the float weights itself: inject into the unquantized model" if kind == "loftq" else (
            "PiSSA needs the dense weight: use init='loftq' on the float model for an NF4 base")  # fmt: skip
        raise ValueError(f"{where}: init={kind!r} on an already-quantized base ({type(view.module).__name__}); {hint}")
    _check(view.dense_weight(), adapter.r, adapter.scale, where)


def _record(layer, kind: str, adapter_name: str, **kept) -> None:
    layer.__dict__["_svd_init"] = {"kind": kind, "adapter": adapter_name, **kept}


def pissa_layer(layer, adapter_name: str, niter: int | None = None) -> None:
    """PiSSA on one LoRA layer: A, B from the base's top-r SVD, the base weight becomes the residual.

    The original weight Parameter is kept aside (not registered) and goes back on eject / delete_adapter, so those
    are exact; the cost is one extra copy of each adapted weight while the adapter exists (SmolLM2-135M, all
    linear layers, bf16: 212 MB).
    """
    view, adapter = layer.view, layer.adapters[adapter_name]
    a, b, residual = pissa(view.dense_weight(), adapter.r, adapter.scale, niter=niter)
    original = view.stored_weight()
    with torch.no_grad():
        adapter.lora_A.copy_(a)
        adapter.lora_B.copy_(b)
        stored = residual.T.contiguous() if view.fan_in_fan_out else residual
    # A new Parameter, not copy_: a weight tied to another module (an output head) must not change there.
    layer.base.weight = nn.Parameter(stored, requires_grad=False)
    _record(layer, "pissa", adapter_name, original=original, A0=adapter.lora_A.detach().clone(),
            B0=adapter.lora_B.detach().clone())  # fmt: skip


def loftq_layer(layer, adapter_name: str, iters: int = 5, niter: int | None = 4, block_size: int = 64,
                double_quant: bool = True) -> LoftQResult:  # fmt: skip
    """LoftQ on one LoRA layer: the base becomes an ``NF4Linear`` holding Q, A and B the fit of W - deq(Q).

    Eject / delete_adapter put the original module back with its weight rebuilt as ``deq(Q) + s B0 A0`` (the
    init's A0, B0) in its dtype: within the reported ``||W - deq(Q) - s B0 A0||`` of W (LoftQ's error, below
    plain NF4's) plus one rounding. Keeping W itself would cost the float weights QLoRA saves; the original
    module's weight storage is released while the adapter exists.
    """
    view, adapter = layer.view, layer.adapters[adapter_name]
    original = layer.base
    w = view.dense_weight()
    res = loftq(w, adapter.r, adapter.scale, iters=iters, niter=niter, block_size=block_size,
                double_quant=double_quant, name=type(original).__name__)  # fmt: skip
    new = NF4Linear(view.in_features, view.out_features, False, block_size, double_quant, None, w.dtype, w.device)
    new._store(res.base)  # the NF4Linear's one layout map (same package)
    new.from_conv1d = view.fan_in_fan_out
    bias = view.bias
    new.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
    new.train(original.training)
    with torch.no_grad():
        adapter.lora_A.copy_(res.A)
        adapter.lora_B.copy_(res.B)
    shape, dtype = original.weight.shape, original.weight.dtype
    original.weight = nn.Parameter(torch.empty(0, dtype=dtype, device=w.device), requires_grad=False)
    layer.base = new
    layer.__dict__["view"] = base_view(new)
    _record(layer, "loftq", adapter_name, original=original, shape=shape, A0=adapter.lora_A.detach().clone(),
            B0=adapter.lora_B.detach().clone(), error=res.error, error_nf4=res.error_nf4)  # fmt: skip
    return res


def restore_base(layer, adapter_name: str | None = None) -> None:
    """Undo a PiSSA / LoftQ base change of ``layer`` (only if it belongs to ``adapter_name``, when given)."""
    rec = layer.__dict__.get("_svd_init")
    if rec is None or (adapter_name is not None and rec["adapter"] != adapter_name):
        return
    if rec["kind"] == "pissa":
        original = rec["original"]
        if original.device != layer.base.weight.device:  # the model moved since: follow it, keep the object
            original.data = original.data.to(layer.base.weight.device)
        layer.base.weight = original
    else:
        original, scale = rec["original"], layer.adapters[rec["adapter"]].scale
        with torch.no_grad():
            deq = layer.view.dense_weight(torch.float32)
            b0, a0 = rec["B0"].to(deq.device, torch.float32), rec["A0"].to(deq.device, torch.float32)
            w = (deq + scale * (b0 @ a0)).to(original.weight.dtype)
        w = w.T.contiguous() if base_view(original).fan_in_fan_out else w  # Conv1D stores (in, out)
        original.weight = nn.Parameter(w.reshape(rec["shape"]), requires_grad=False)
        layer.base = original
        layer.__dict__["view"] = base_view(original)
    layer.__dict__["_svd_init"] = None


def pissa_as_lora(layer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A PiSSA adapter rewritten for the unmodified base W: ``A' = [A; A0]`` (2r, in), ``B' = [B, -B0]`` (out, 2r).

    W_res + s B A = W + s (B A - B0 A0) = W + s B' A'. With rank 2r the scale s is kept by alpha' = 2 alpha
    (rsLoRA: sqrt(2) alpha), as PEFT's ``path_initial_model_for_weight_conversion``. None for a layer whose base
    this adapter did not change.
    """
    rec = layer.__dict__.get("_svd_init")
    if rec is None or rec["adapter"] != adapter_name or rec["kind"] != "pissa":
        return None
    adapter = layer.adapters[adapter_name]
    a = torch.cat([adapter.lora_A.detach(), rec["A0"].to(adapter.lora_A.dtype)], 0)
    b = torch.cat([adapter.lora_B.detach(), -rec["B0"].to(adapter.lora_B.dtype)], 1)
    return a, b
