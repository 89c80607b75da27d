"""PEFT's file layout for the target kinds beyond linear layers: embeddings, MoE experts, and ``target_modules``.

Keys (``base_model.model.`` + the module's qualified name, adapter name removed, as PEFT 0.21 writes them):

* linear layer: ``<name>.lora_A.weight`` (r, in), ``<name>.lora_B.weight`` (out, r);
* embedding: ``<name>.lora_embedding_A`` (r, num_embeddings), ``<name>.lora_embedding_B`` (dim, r): no ``.weight``;
* experts (PEFT's ``ParamWrapper``): per adapted 3-D weight, ``<name>.<base_layer. * d>lora_A.weight`` (E * r, in),
  rows grouped by expert (``reshape(E, r, in)``), and ``lora_B.weight`` (out, E * r), columns interleaved
  (``reshape(out, r, E)``: column ``k * E + e`` is column k of expert e's B). With k weights of one module adapted,
  the i-th in the module's parameter order (0-based) has d = k - 1 - i (PEFT wraps them in that order, each
  wrapper around the previous one);
* ``save_embedding_layers="auto"`` also stores ``<name>.base_layer.weight``, the full base weight of an adapted
  embedding or output head.

``target_modules`` is written as one regular expression that matches exactly the adapted modules' names
(`target_modules_regex`): PEFT treats list entries as suffixes, so the full name of layer "0" of an
``nn.Sequential`` would also select the child "0" of layer "2".
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .adapter import lora_scale
from .base import linear_features
from .lora_embedding import LoRAEmbedding
from .lora_experts import EXPERT_WEIGHTS, LoRAExperts, find_parameters, weight_features

PREFIX = "base_model.model."
_EXPERT_KEY = re.compile(r"(?P<name>.+?)(?P<nest>(?:\.base_layer)*)\.(?P<part>lora_A|lora_B)(?:\.default)?\.weight")
_EMBEDDING_KEY = re.compile(r"(?P<name>.+)\.lora_embedding_(?P<part>A|B)(?:\.default)?")
_BASE_KEY = re.compile(r"(?P<name>.+)\.base_layer\.weight")


def target_modules_regex(names: list[str]) -> str | list[str]:
    """A regex PEFT full-matches against module names that selects exactly ``names`` ([] for none)."""
    if not names:
        return []
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _nesting(holder: nn.Module, params: list[str]) -> dict[str, int]:
    """param -> the number of ``base_layer.`` PEFT puts before its keys (see the module doc)."""
    ordered = [p for p, _ in holder.named_parameters(recurse=False) if p in params]
    return {p: len(ordered) - 1 - i for i, p in enumerate(ordered)}


def layer_tensors(layer_name: str, layer, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT's keys and tensors for adapter ``adapter_name`` of ``layer`` (any kind)."""
    adapter = layer.adapters[adapter_name]
    head = PREFIX + layer_name
    if isinstance(layer, LoRAEmbedding):
        return {f"{head}.lora_embedding_A": adapter.lora_A, f"{head}.lora_embedding_B": adapter.lora_B}
    if isinstance(layer, LoRAExperts):
        out = {}
        for p, depth in _nesting(layer.base, adapter.params).items():
            a, b = adapter.lora_A[p], adapter.lora_B[p]  # (E, r, in), (E, out, r)
            e, r, fin = a.shape
            stem = head + ".base_layer" * depth
            out[f"{stem}.lora_A.weight"] = a.reshape(e * r, fin)
            out[f"{stem}.lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], r * e)  # [o, k, e] -> k * E + e
        return out
    return {f"{head}.lora_A.weight": adapter.lora_A, f"{head}.lora_B.weight": adapter.lora_B}


def config_entries(layers, adapter_name: str) -> list:
    """[(name, adapter)] for `build_config`: an experts layer counts once per adapted weight, under the weight's
    full name (PEFT matches rank_pattern / alpha_pattern keys against ``<module>.<param>`` for target_parameters)."""
    out = []
    for name, layer in layers:
        names = parameter_names(name, layer, adapter_name)
        out += [(n, layer.adapters[adapter_name]) for n in (names or [name])]
    return out


def parameter_names(layer_name: str, layer, adapter_name: str) -> list[str]:
    """The full names (``<module>.<param>``) of the 3-D weights an experts adapter adapts, for target_parameters."""
    if not isinstance(layer, LoRAExperts):
        return []
    return [f"{layer_name}.{p}" for p in EXPERT_WEIGHTS if p in layer.adapters[adapter_name].params]


def split_tensors(
    model: nn.Module, tensors: dict[str, torch.Tensor], target_parameters, r_of, where
) -> tuple[dict[str, torch.Tensor], dict[tuple[str, str], dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Sort a PEFT file's tensors: (linear-layout tensors, experts entries, stored base weights).

    Embedding keys are renamed to the linear layout (``<name>.lora_A.weight``) so the caller treats them alike.
    Experts entries are ``{(module name, param): {"lora_A": (E, r, in), "lora_B": (E, out, r)}}``, converted from
    PEFT's stacked layout and checked against the model's expert count; ``r_of(module name)`` gives the rank the
    config assigns. Base weights are ``{module name: tensor}`` (``...base_layer.weight``).

    Raises:
        ValueError: an experts tensor whose shape does not fit the model's experts (the message gives the expected
            shape and the expert count), or a pair with a missing half.
    """
    plain, base = {}, {}
    nests: dict[str, dict[int, str]] = {}
    if target_parameters:
        for name, params in find_parameters(model, list(target_parameters)).items():
            module = model.get_submodule(name)
            holder = module.base if isinstance(module, LoRAExperts) else module
            nests[name] = {d: p for p, d in _nesting(holder, params).items()}
    experts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        rest = key[len(PREFIX) :] if key.startswith(PREFIX) else None
        m = _EXPERT_KEY.fullmatch(rest) if rest is not None else None
        if m is not None and m["name"] in nests:
            depth = m["nest"].count(".base_layer")
            param = nests[m["name"]].get(depth)
            if param is None:
                raise ValueError(
                    f"{where}: {key} nests {depth} deep, but {m['name']} has {len(nests[m['name']])} targets"
                )
            experts.setdefault((m["name"], param), {})[m["part"]] = t
            continue
        e = _EMBEDDING_KEY.fullmatch(rest) if rest is not None else None
        b = _BASE_KEY.fullmatch(rest) if rest is not None else None
        if e is not None:
            plain[f"{PREFIX}{e['name']}.lora_{e['part']}.weight"] = t
        elif b is not None:
            base[b["name"]] = t
        else:
            plain[key] = t
    converted = {}
    for (name, param), pair in experts.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{where}: {name}.{param} has only {sorted(pair)} (each adapted weight needs both)")
        module = model.get_submodule(name)
        holder = module.base if isinstance(module, LoRAExperts) else module
        n, fin, fout = weight_features(holder, param)
        r = r_of(f"{name}.{param}")  # PEFT's pattern keys match the parameter's full name
        a, bt = pair["lora_A"], pair["lora_B"]
        if tuple(a.shape) != (n * r, fin) or tuple(bt.shape) != (fout, n * r):
            raise ValueError(
                f"{where}: {name}.{param} has lora_A {tuple(a.shape)} and lora_B {tuple(bt.shape)}; the model has "
                f"{n} experts of {fin} -> {fout} and the config gives r={r}: expected ({n * r}, {fin}) and "
                f"({fout}, {n * r}) (a file for another expert count or rank?)"
            )
        converted[(name, param)] = {
            "lora_A": a.reshape(n, r, fin),
            "lora_B": bt.reshape(fout, r, n).permute(2, 0, 1),  # (out, r, E) -> (E, out, r)
        }
    return plain, converted, base


def check_base_weights(model: nn.Module, base: dict[str, torch.Tensor], adapted: set[str], where) -> None:
    """PEFT's ``save_embedding_layers`` copies of base weights: accept each only if it is bit-equal to the model's.

    Raises:
        ValueError: a stored base weight for a module the file does not adapt, of another shape, or different
            from the model's (a resized or retrained embedding: lowrank loads adapters only, not new base weights).
    """
    modules = dict(model.named_modules())
    for name, t in base.items():
        if name not in adapted:
            raise ValueError(
                f"{where}: stores a base weight for {name} ({name}.base_layer.weight) but no adapter for it; "
                "lowrank loads adapters, not replacement base weights"
            )
        module = modules.get(name)
        weight = module.base.weight if hasattr(module, "adapters") else getattr(module, "weight", None)
        if (
            weight is None
            or tuple(weight.shape) != tuple(t.shape)
            or not torch.equal(weight.detach().cpu(), t.to(weight.dtype))
        ):
            shape = None if weight is None else tuple(weight.shape)
            raise ValueError(
                f"{where}: {name}.base_layer.weight (PEFT's save_embedding_layers copy, shape {tuple(t.shape)}) "
                f"differs from the model's {name} weight (shape {shape}): the adapter was trained on another base "
                "(resized or retrained vocabulary?); lowrank loads adapters only, not new base weights"
            )


def module_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an adaptable module in the adapter's layout (an embedding: (vocab, dim))."""
    if isinstance(module, nn.Embedding):
        return int(module.num_embeddings), int(module.embedding_dim)
    return linear_features(module)


def explain_key(key: str) -> str:
    """Why a tensor key of a PEFT file is not one lowrank loads (for the refusal message)."""
    if "lora_magnitude_vector" in key:  # io.py reads linear layers' magnitudes; others are not supported
        return "a DoRA magnitude vector on a layer kind without DoRA (DoRA is for linear layers)"
    if ".modules_to_save." in key or key.endswith(".modules_to_save"):
        return "modules_to_save (a full trainable copy of a module) is not supported"
    if "trainable_tokens" in key:
        return "trainable_token_indices (trainable token rows) is not supported"
    if re.search(r"\.lora_B(\.[^.]+)?\.bias$", key):
        return "lora_bias (a bias on lora_B) is not supported"
    if ".base_layer.lora_" in key:
        return "nested ParamWrapper keys for a module the config's target_parameters does not name"
    return (
        "not a LoRA weight in PEFT's layout ('base_model.model.<module>.lora_A[.default].weight', "
        "'...lora_embedding_A', '...base_layer.weight')"
    )


def plan_experts_load(model: nn.Module, cfg: dict, experts: dict, where, adapter_name: str):
    """Check a file's experts entries against the model; return the (r, alpha) they use, or (None, None).

    Raises:
        ValueError: experts modules of one file with different r / alpha, a merged experts layer, or (when
            ``adapter_name`` exists already) a layer that has it on other weights or with another r / scale.
    """
    if not experts:
        return None, None
    sizes = {}
    for name, param in experts:  # pattern keys match the parameter's full name, as in PEFT
        full = f"{name}.{param}"
        r = _pattern(cfg["rank_pattern"], full, cfg["r"])
        sizes[full] = (r, _pattern(cfg["alpha_pattern"], full, cfg["lora_alpha"]))
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{where}: expert weights with different r / alpha {sizes} are not supported")
    r, alpha = next(iter(sizes.values()))
    scale = lora_scale(alpha, r, cfg["use_rslora"])
    params: dict[str, set[str]] = {}
    for name, p in experts:
        params.setdefault(name, set()).add(p)
    for name, ps in params.items():
        module = model.get_submodule(name)
        if isinstance(module, LoRAExperts) and module.merged:
            raise ValueError(f"adapters of {name} are merged into the base weights; call lowrank.unmerge first")
        if isinstance(module, LoRAExperts) and adapter_name in module.adapters:
            have = module.adapters[adapter_name]
            if set(have.params) != ps or have.r != r or abs(have.scale - scale) > 1e-6 * abs(scale):
                raise ValueError(
                    f"{name} already has adapter {adapter_name!r} on {have.params} with r={have.r}, "
                    f"scale={have.scale:g}; {where} has {sorted(ps)} with r={r}, scale={scale:g}. "
                    "lowrank.eject the model first, or load with another adapter_name"
                )
    return r, alpha


def _pattern(patterns: dict, name: str, default):
    for key, value in patterns.items():  # PEFT's rank_pattern rule (lowrank.peft_config.pattern_value)
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def match_adapter_key(key: str) -> dict[str, str] | None:
    """``{"name", "part"}`` for an embedding key (``<name>.lora_embedding_A``) in the linear layout's terms."""
    m = _EMBEDDING_KEY.fullmatch(key.removeprefix(PREFIX)) if key.startswith(PREFIX) else None
    return None if m is None else {"name": m["name"], "part": f"lora_{m['part']}"}


def special_keys(model: nn.Module, entries, target_parameters) -> dict[str, torch.dtype | None]:
    """Keys of a PEFT file that are not linear-layout adapter weights: experts (read as float32, the adapters'
    dtype) and ``save_embedding_layers`` base weights (read in their own dtype: None). From the header alone."""
    modules: set[str] = set()
    if target_parameters:
        modules = set(find_parameters(model, list(target_parameters)))
    out: dict[str, torch.dtype | None] = {}
    for key in entries:
        rest = key.removeprefix(PREFIX) if key.startswith(PREFIX) else None
        if rest is None:
            continue
        m = _EXPERT_KEY.fullmatch(rest)
        if m is not None and m["name"] in modules:
            out[key] = torch.float32
        elif _BASE_KEY.fullmatch(rest) is not None:
            out[key] = None
    return out
