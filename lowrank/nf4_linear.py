"""`NF4Linear`, a frozen linear layer whose weight is stored in NF4, and `quantize(model)` that swaps them in.

Storage. The quantized weight lives in frozen *integer* ``nn.Parameter``s: ``weight`` (uint8, the packed codes,
shape ((n + 1) // 2, 1) as bitsandbytes stores them), ``weight_absmax`` (uint8 codes with double quantization,
else float32 bit-cast to int32), ``weight_absmax2`` and ``weight_offset`` (float32 bit-cast to int32). Being
parameters, FSDP2 shards them along dim 0 like any other; being integers, ``model.to(torch.bfloat16)`` and
mixed-precision casts leave them alone (a cast float32 absmax would silently corrupt every weight).

State dict. ``state_dict()`` uses bitsandbytes' ``Linear4bit`` keys (``weight``, ``weight.absmax``,
``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``), so checkpoints move between the two libraries; ``load_state_dict``
reads them back (checked against this layer's shape, block size and quantization) and also accepts a plain
floating ``weight`` of shape (out_features, in_features), which it quantizes.
"""

from __future__ import annotations

import json

import torch
import torch.nn as nn

from . import nf4 as _nf4
from . import nf4_search
from ._match import find_targets, is_conv1d, is_linear
from .dispatch import dequantize as _dequantize
from .dispatch import fused_lora_enabled, nf4_linear, nf4_lora_linear
from .lora import LoRALayer
from .nf4 import NF4Tensor

_QUANT_STATE = "quant_state.bitsandbytes__nf4"
_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
# Quantizers by method name: "round" is bitsandbytes' absmax rounding, "search" the per-block scale search.
QUANTIZERS = {"round": _nf4.quantize, "search": nf4_search.quantize_search}


def _quantizer(method):
    if method not in QUANTIZERS:
        raise ValueError(f"method must be one of {sorted(QUANTIZERS)}, got {method!r}")
    return QUANTIZERS[method]


def _check_compute_dtype(compute_dtype) -> None:
    if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise TypeError(f"compute_dtype must be a floating torch.dtype or None, got {compute_dtype!r}")


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 with the same bits (a view: no copy)."""
    return t.to(torch.float32).contiguous().view(torch.int32)


class NF4Linear(nn.Module):
    """Frozen linear layer ``y = x W^T + b`` with W stored in NF4 (4.127 bits per weight at block 64 + double quant).

    Args:
        in_features, out_features: the layer's sizes; W has shape (out_features, in_features).
        bias: whether the layer has a bias (kept in ``dtype``, frozen like the weight).
        block_size: NF4 block size (power of two in 32..4096). double_quant: 8-bit absmax.
        compute_dtype: dtype the matmul runs in (None: the input's dtype); the output is cast back to the
            input's dtype.
        dtype: the original weight dtype (what ``dequantize_weight()`` returns; also the bias dtype).
        device: where the storage is allocated. A new layer holds an all-zero weight until loaded.

    Forward: ``x`` (..., in_features) -> (..., out_features); the weight is dequantized on the fly
    (``lowrank.dispatch.nf4_linear``) and never kept alive for the backward pass.
    """

    _lowrank_base = True  # the base protocol of lowrank.base: LoRA layers wrap it without knowing this class

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        block_size: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        _nf4.check_block_size(block_size)
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        _check_compute_dtype(compute_dtype)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.block_size, self.double_quant = block_size, bool(double_quant)
        self.compute_dtype, self.dtype = compute_dtype, dtype
        # True when quantized from a HF Conv1D: the NF4 weight is stored (out, in) like nn.Linear's, and exports
        # of dense weights (lowrank.save_merged) transpose back to Conv1D's (in, out) layout.
        self.from_conv1d = False
        self._store(_nf4.zeros((out_features, in_features), dtype, block_size, double_quant, device))
        self.bias = _frozen(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @staticmethod
    def _param_values(q: NF4Tensor) -> dict[str, torch.Tensor | None]:
        """The integer parameters' values for an NF4Tensor (the one place that knows the parameter layout;
        `nf4_weight` reads it back)."""
        if q.double_quant:
            absmax = {"weight_absmax": q.absmax_q, "weight_absmax2": _bits(q.absmax2),
                      "weight_offset": _bits(q.offset.reshape(1))}  # fmt: skip
        else:
            absmax = {"weight_absmax": _bits(q.absmax), "weight_absmax2": None, "weight_offset": None}
        return {"weight": q.packed.view(-1, 1), **absmax}

    def _store(self, q: NF4Tensor) -> None:
        """Set the integer parameters (new, frozen) from an NF4Tensor."""
        for name, value in self._param_values(q).items():
            setattr(self, name, None if value is None else _frozen(value))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        block_size: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        method: str = "round",
    ) -> NF4Linear:
        """Quantize an ``nn.Linear`` (or HF ``Conv1D``, whose (in, out) weight is transposed) into a new layer.

        The new layer is on the linear's device; its ``dtype`` is the linear's weight dtype. The linear is not
        modified. ``method``: "round" (max |x| scales, bitsandbytes' bytes) or "search" (per-block scales with the
        least squared error, ``nf4_search.quantize_search``). Raises TypeError/ValueError for non-floating or
        non-finite weights, bad block sizes and unknown methods.
        """
        if not (isinstance(linear, nn.Linear) or is_conv1d(linear)):
            raise TypeError(f"from_linear expects an nn.Linear or Conv1D, got {type(linear).__name__}")
        _check_compute_dtype(compute_dtype)
        weight = linear.weight.detach()
        if is_conv1d(linear):
            weight = weight.t()
        out_features, in_features = weight.shape
        q = _quantizer(method)(weight, block_size, double_quant)  # validates before anything is built
        layer = cls(in_features, out_features, False, block_size, double_quant, compute_dtype, weight.dtype,
                    weight.device)  # fmt: skip
        layer.from_conv1d = is_conv1d(linear)
        layer._store(q)
        bias = linear.bias
        layer.bias = None if bias is None else _frozen(bias.detach().clone())
        return layer

    @classmethod
    def from_nf4(
        cls,
        q: NF4Tensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
        from_conv1d: bool = False,
    ) -> NF4Linear:
        """A layer holding an already quantized weight ``q`` of shape (out_features, in_features) and an optional
        ``bias`` (out_features,), both used as they are (no copy), on ``q``'s device; ``dtype`` is ``q.dtype``.
        ``from_conv1d`` marks a weight taken (transposed) from a HF Conv1D. Used by ``lowrank.load_quantized``."""
        if len(q.shape) != 2:
            raise ValueError(f"from_nf4 expects a 2-D NF4 weight (out_features, in_features), got {tuple(q.shape)}")
        out_features, in_features = q.shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_features},)")
        # Built on the meta device (allocates nothing), then given q's tensors.
        layer = cls(in_features, out_features, False, q.block_size, q.double_quant, compute_dtype, q.dtype, "meta")
        layer.from_conv1d = bool(from_conv1d)
        layer._store(q)
        layer.bias = None if bias is None else _frozen(bias)
        return layer

    def nf4_weight(self) -> NF4Tensor:
        """The weight as an NF4Tensor of shape (out_features, in_features); its tensors are views of the parameters."""
        shape = (self.out_features, self.in_features)
        packed = self.weight.view(-1)
        if self.double_quant:
            offset = self.weight_offset.view(torch.float32)[0]
            absmax2 = self.weight_absmax2.view(torch.float32)
            return NF4Tensor(shape, self.dtype, self.block_size, packed, None, self.weight_absmax, absmax2, offset)
        return NF4Tensor(shape, self.dtype, self.block_size, packed, absmax=self.weight_absmax.view(torch.float32))

    @property
    def dense_dtype(self) -> torch.dtype:
        """The dtype of this layer as a dense weight (merge, merged export): ``compute_dtype``, else the original."""
        return self.compute_dtype or self.dtype

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W (out_features, in_features): dequantized in the original dtype, then cast to ``dtype`` if given.

        Runs the Triton dequantize kernel for CUDA weights, the torch reference otherwise (bit-identical).
        """
        return _dequantize(self.nf4_weight(), dtype)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base protocol's dense weight: `dequantize_weight`."""
        return self.dequantize_weight(dtype)

    def fused_lora_forward(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(self(x), x A^T)`` from one pass over x (inference only), or None when that route does not apply.

        Applies when ``lowrank.dispatch.fused_lora_enabled()`` (``LOWRANK_FUSED_LORA=1``; off by default: no GPU
        measurement yet; benchmarks/bench_nf4.py, entry lora_decode), the layer has no hooks (the route does not
        call ``forward``) and computes in x's dtype (one x read serves both products). The caller guarantees that
        no gradient is needed. ``x A^T`` comes back
        in float32 (float64 for float64 x), not yet rounded to x.dtype.
        """
        if not fused_lora_enabled() or self._forward_hooks or self._forward_pre_hooks:
            return None
        if self.compute_dtype not in (None, x.dtype) or x.shape[-1] != self.in_features:
            return None
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nf4_lora_linear(x, self.nf4_weight(), bias, a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"NF4Linear expects inputs (..., {self.in_features}), got {tuple(x.shape)}")
        input_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nf4_linear(x, self.nf4_weight(), bias).to(input_dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, double_quant={self.double_quant}, dtype={self.dtype}, "
            f"compute_dtype={self.compute_dtype}"
        )

    # ---- state dict in bitsandbytes' Linear4bit layout -------------------------------------------------------

    def _quant_state_json(self, q: NF4Tensor) -> dict:
        state = {
            "quant_type": "nf4",
            "blocksize": self.block_size,
            "dtype": _DTYPE_NAMES[self.dtype],
            "shape": [self.out_features, self.in_features],
        }
        if q.double_quant:
            state.update(nested_blocksize=_nf4.NESTED_BLOCK_SIZE, nested_dtype="float32", nested_offset=q.offset.item())
        return state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        q = self.nf4_weight()
        device = self.weight.device
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination[prefix + "weight.absmax"] = (q.absmax_q if q.double_quant else q.absmax).detach()
        destination[prefix + "weight.quant_map"] = _nf4.NF4_CODE.to(device)
        if q.double_quant:
            destination[prefix + "weight.nested_absmax"] = q.absmax2.detach()
            destination[prefix + "weight.nested_quant_map"] = _nf4.DYNAMIC_MAP.to(device)
        blob = json.dumps(self._quant_state_json(q)).encode("utf-8")
        destination[prefix + "weight." + _QUANT_STATE] = torch.tensor(list(blob), dtype=torch.uint8, device=device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        keys = {k[len(prefix) :]: k for k in state_dict if k.startswith(prefix)}
        own = {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
               "weight.nested_quant_map", "weight." + _QUANT_STATE}  # fmt: skip
        if strict:
            unexpected_keys.extend(k for name, k in keys.items() if name not in own and "." not in name)
        if "weight" not in keys:
            missing_keys.append(prefix + "weight")
            return
        try:
            q, dtype = self._nf4_from_state(state_dict, prefix, keys)
            bias = self._bias_from_state(state_dict, prefix, keys, strict, missing_keys)
        except (ValueError, TypeError, KeyError) as e:
            errors.append(f"{prefix or 'NF4Linear'}: {e}")
            return
        # Everything validated: now write (copy_ keeps the parameter objects, so sharding/optimizers still see them).
        with torch.no_grad():
            for name, value in self._param_values(q).items():
                if value is not None:
                    getattr(self, name).copy_(value)
            if bias is not None:
                self.bias.copy_(bias)
        self.dtype = dtype

    def _nf4_from_state(self, state_dict, prefix, keys) -> tuple[NF4Tensor, torch.dtype]:
        """Validate the incoming weight keys against this layer and return them as an NF4Tensor."""
        shape = (self.out_features, self.in_features)
        weight = state_dict[keys["weight"]]
        if "weight." + _QUANT_STATE not in keys:
            if weight.is_floating_point() and tuple(weight.shape) == shape:  # a dense checkpoint: quantize it
                return _nf4.quantize(weight, self.block_size, self.double_quant), weight.dtype
            raise ValueError(
                f"'weight' is {weight.dtype} {tuple(weight.shape)} without a quant_state: expected NF4 data or a "
                f"floating weight of shape {shape}"
            )
        blob = state_dict[keys["weight." + _QUANT_STATE]]
        state = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
        expected = {"quant_type": "nf4", "blocksize": self.block_size, "shape": list(shape)}
        wrong = {k: state.get(k) for k, v in expected.items() if state.get(k) != v}
        if wrong:
            raise ValueError(f"quant_state {wrong} does not match this layer ({expected})")
        if state.get("dtype") not in _NAME_DTYPES:
            raise ValueError(f"quant_state dtype {state.get('dtype')!r} is not one of {sorted(_NAME_DTYPES)}")
        double_quant = "nested_offset" in state
        if double_quant != self.double_quant:
            raise ValueError(f"checkpoint has double_quant={double_quant}, this layer {self.double_quant}")
        if double_quant and state.get("nested_blocksize") != _nf4.NESTED_BLOCK_SIZE:
            raise ValueError(f"nested_blocksize {state.get('nested_blocksize')} is not {_nf4.NESTED_BLOCK_SIZE}")
        if not torch.equal(state_dict[keys["weight.quant_map"]].float().cpu(), _nf4.NF4_CODE):
            raise ValueError("weight.quant_map is not the NF4 code book")
        if double_quant and not torch.equal(state_dict[keys["weight.nested_quant_map"]].float().cpu(),
                                            _nf4.DYNAMIC_MAP):  # fmt: skip
            raise ValueError("weight.nested_quant_map is not bitsandbytes' signed dynamic map")
        device = self.weight.device
        absmax = state_dict[keys["weight.absmax"]].to(device)
        if double_quant:
            absmax2 = state_dict[keys["weight.nested_absmax"]].to(device, torch.float32)
            offset = torch.tensor(state["nested_offset"], dtype=torch.float32, device=device)
            q = NF4Tensor(shape, None, self.block_size, weight.to(device).view(-1), None, absmax, absmax2, offset)
        else:
            q = NF4Tensor(shape, None, self.block_size, weight.to(device).view(-1), absmax=absmax)
        current = self.nf4_weight()
        for name, t in q.tensors().items():
            ref = current.tensors()[name]
            if t.dtype != ref.dtype or t.numel() != ref.numel():
                raise ValueError(
                    f"{name}: got {t.dtype} {tuple(t.shape)}, expected {ref.dtype} of {ref.numel()} values"
                )
        return q, _NAME_DTYPES[state["dtype"]]

    def _bias_from_state(self, state_dict, prefix, keys, strict, missing_keys):
        if self.bias is None:
            if "bias" in keys:
                raise ValueError("checkpoint has a bias, this layer has none")
            return None
        if "bias" not in keys:
            if strict:
                missing_keys.append(prefix + "bias")
            return None
        bias = state_dict[keys["bias"]]
        if tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
        return bias


def quantize(
    model: nn.Module,
    *,
    targets="all-linear",
    exclude=None,
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    method: str = "round",
) -> nn.Module:
    """Replace matching ``nn.Linear`` (and HF ``Conv1D``) layers of ``model`` by ``NF4Linear``, in place.

    Every weight is checked before anything changes, so on error the model is untouched. Layers are converted
    one at a time and the model stops referencing the full-precision weights, so peak memory is the model plus
    one layer's temporaries. Call it before ``lowrank.inject`` (that pair is QLoRA).

    Args:
        model: the model to modify.
        targets: ``"all-linear"`` (every linear layer but the output head), a list of module names, a regex
            string, or a callable ``(name, module) -> bool`` (see ``lowrank._match``). The output head is
            quantized only when named explicitly.
        exclude: same forms; wins over ``targets``.
        block_size: NF4 block size, a power of two in 32..4096. double_quant: 8-bit absmax (4.127 bits/weight).
        compute_dtype: the new layers' matmul dtype (None: the input's dtype).
        method: "round" (bitsandbytes' absmax rounding) or "search" (per-block scale search: lower weight
            error, same format, but a higher perplexity on SmolLM2-135M, 26.67 vs 25.25; see ``lowrank.nf4_search``).

    Returns:
        ``model`` itself.

    Raises:
        TypeError: a block size that is not an int; a matched layer's weight is not floating point.
        ValueError: bad block size; nothing matched; every match is already NF4; a match is a LoRA layer
            ("quantize before inject") or not a linear layer; a weight holds NaN/inf or lives on the meta device.
    """
    _nf4.check_block_size(block_size)
    _check_compute_dtype(compute_dtype)
    _quantizer(method)
    found = find_targets(model, targets, exclude)
    todo = []
    for name, module in found:
        if isinstance(module, LoRALayer):  # a state problem, not a wrong argument type: ValueError
            raise ValueError(f"{name} is a LoRALinear: quantize before inject (lowrank.quantize, then lowrank.inject)")
        if isinstance(module, NF4Linear):
            continue
        if not is_linear(module):
            raise ValueError(f"{name} is a {type(module).__name__}, not an nn.Linear or Conv1D: it cannot be quantized")
        if module.weight.device.type == "meta":
            raise ValueError(f"{name}.weight is on the meta device: load the weights before quantizing")
        _nf4.check_weight(module.weight, name=f"{name}.weight")
        _check_float32_range(module.weight, f"{name}.weight")
        todo.append((name, module))
    if not todo:
        raise ValueError(f"nothing to quantize: every layer matched by targets={targets!r} is already an NF4Linear")

    # Every place a module is reachable from (a module shared under two names is replaced under both).
    parents: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():  # (named_children() hides a second name)
            parents.setdefault(id(child), []).append((parent, child_name))
    # Every check above ran before any layer changed; an error past them (out of memory, a failure inside the
    # quantizer) puts the replaced layers back. Keeping them costs nothing: ``todo`` holds them until we return.
    done = []
    try:
        for name, module in todo:
            try:
                new = NF4Linear.from_linear(module, block_size, double_quant, compute_dtype, method)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{name}: {e}") from e
            new.train(module.training)
            for parent, child_name in parents[id(module)]:
                setattr(parent, child_name, new)
            done.append(module)
    except BaseException:
        for module in done:
            for parent, child_name in parents[id(module)]:
                setattr(parent, child_name, module)
        raise
    return model


def _check_float32_range(weight: torch.Tensor, name: str) -> None:
    """A float64 weight with finite values beyond the float32 range (|x| > 3.4e38) overflows in the quantizer."""
    if weight.dtype == torch.float64 and weight.device.type != "meta":
        amax = weight.detach().abs().amax()
        if not bool(torch.isfinite(amax.to(torch.float32))):
            over = int((~torch.isfinite(weight.detach().to(torch.float32))).sum())
            raise ValueError(f"{name} holds {over} value(s) beyond the float32 range (|x| > 3.4e38): NF4 scales are "
                             "float32")  # fmt: skip
