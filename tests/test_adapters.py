"""Several named adapters per model (lowrank/adapters.py, lowrank/lora.py): adding, switching, summing, deleting,
mixed-adapter batches (forward and gradients against per-row single-adapter runs and a float64 reference), merge
with several active adapters, state-dict naming, and bad input."""

import copy

import pytest
import torch
from _helpers import assert_unchanged, randomize_adapters, snapshot, tiny_llama
from torch import nn

import lowrank


def toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 8))


def three_adapters(model):
    """'default' r=2 on both layers, 'b' r=3 on layer 0 only, 'c' r=5 (rsLoRA) on both; random A and B."""
    lowrank.inject(model, ["0", "2"], r=2, alpha=4)
    lowrank.inject(model, ["0"], r=3, alpha=1.5, adapter_name="b")
    lowrank.inject(model, ["0", "2"], r=5, alpha=2, rslora=True, adapter_name="c")
    return randomize_adapters(model, std_b=0.3, std_a=0.3)


def reference(model, x, names):
    """float64: each linear layer is x (W0 + sum_{n in names} scale_n B_n A_n)^T + b, scales from alpha and r."""
    out = x.double()
    for module in model:
        if isinstance(module, lowrank.LoRALayer):
            w = module.base.weight.double()
            for n in names:
                if n in module.adapters:
                    a = module.adapters[n]
                    scale = a.alpha / a.r**0.5 if a.rslora else a.alpha / a.r
                    w = w + scale * a.lora_B.double() @ a.lora_A.double()
            out = out @ w.T + module.base.bias.double()
        else:
            out = module(out)
    return out


def test_names_order_activation_and_requires_grad():
    model = three_adapters(toy())
    assert lowrank.adapter_names(model) == ["default", "b", "c"]
    assert lowrank.active_adapters(model) == ["c"]  # the newest, alone
    grads = {n: {p.requires_grad for p in lowrank.adapter_parameters(model, n)} for n in ("default", "b", "c")}
    assert grads == {"default": {False}, "b": {False}, "c": {True}}
    lowrank.set_adapter(model, ["default", "b"])
    grads = {n: {p.requires_grad for p in lowrank.adapter_parameters(model, n)} for n in ("default", "b", "c")}
    assert grads == {"default": {True}, "b": {True}, "c": {False}}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "adapters" not in n)


@pytest.mark.parametrize("names", [["default"], ["b"], ["c"], ["default", "b"], ["b", "c", "default"]])
def test_active_adapters_are_summed(names):
    model = three_adapters(toy())
    lowrank.set_adapter(model, names)
    x = torch.randn(4, 10)
    # float32 model vs float64 reference, widths <= 12, |y| ~ 1: a few float32 ulps.
    torch.testing.assert_close(model(x).double(), reference(model, x, names), rtol=0, atol=1e-5)


def test_merge_with_several_active_adapters_matches_the_sum():
    model = three_adapters(toy())
    lowrank.set_adapter(model, ["default", "c"])
    x = torch.randn(4, 10)
    expected = reference(model, x, ["default", "c"])
    lowrank.merge(model)
    with torch.no_grad():  # a merged model does not train
        torch.testing.assert_close(model(x).double(), expected, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        lowrank.set_adapter(model, "b")
    lowrank.unmerge(model)
    lowrank.set_adapter(model, "b")
    torch.testing.assert_close(model(x).double(), reference(model, x, ["b"]), rtol=0, atol=1e-5)


def test_delete_adapter_and_last_adapter_gives_the_base_back():
    model = three_adapters(toy())
    base2 = model[2].base
    lowrank.set_adapter(model, ["b", "c"])
    lowrank.delete_adapter(model, "c")
    assert lowrank.adapter_names(model) == ["default", "b"] and lowrank.active_adapters(model) == ["b"]
    assert list(model[2].adapters) == ["default"]
    lowrank.delete_adapter(model, "b")  # the active set is empty: the first adapter left becomes active
    assert lowrank.active_adapters(model) == ["default"]
    assert all(p.requires_grad for p in lowrank.adapter_parameters(model))
    lowrank.delete_adapter(model, "default")
    assert model[2] is base2 and isinstance(model[0], nn.Linear) and lowrank.adapter_names(model) == []


def test_state_dict_names_and_round_trip():
    model = three_adapters(toy())
    keys = [k for k in model.state_dict() if k.startswith("0.")]
    assert keys == [
        "0.weight",
        "0.bias",
        "0.lora_A",
        "0.lora_B",
        "0.lora_A.b",
        "0.lora_B.b",
        "0.lora_A.c",
        "0.lora_B.c",
    ]
    other = three_adapters(toy())
    randomize_adapters(other, std_b=1.0, std_a=1.0)
    other.load_state_dict(model.state_dict())  # strict
    assert torch.equal(other[0].adapters["b"].lora_A, model[0].adapters["b"].lora_A)
    partial = model.state_dict()
    del partial["0.lora_B.b"]
    with pytest.raises(RuntimeError, match=r'Missing key.*"0\.lora_B\.b"'):
        other.load_state_dict(partial)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda m: lowrank.inject(m, ["0"], adapter_name="b"), ValueError, "already carry a LoRA adapter named 'b'"),
        (lambda m: lowrank.inject(m, ["0"], adapter_name=".."), ValueError, "adapter name '..' is not valid"),
        (lambda m: lowrank.inject(m, ["0"], adapter_name="a/b"), ValueError, "adapter name 'a/b' is not valid"),
        (lambda m: lowrank.inject(m, ["0"], adapter_name=""), ValueError, "adapter name '' is not valid"),
        (lambda m: lowrank.set_adapter(m, "zz"), ValueError, r"unknown adapter\(s\) \['zz'\]; the model has"),
        (lambda m: lowrank.set_adapter(m, []), ValueError, "one name or a list"),
        (lambda m: lowrank.delete_adapter(m, "zz"), ValueError, r"unknown adapter\(s\) \['zz'\]"),
        (lambda m: lowrank.mixed_batch(m, ["b", "zz"]).__enter__(), ValueError, r"unknown adapter\(s\) \['zz'\]"),
        (lambda m: lowrank.mixed_batch(m, []).__enter__(), ValueError, "one adapter name"),
    ],
)
def test_bad_input_leaves_the_model_unchanged(call, error, match):
    model = three_adapters(toy())
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        call(model)
    assert_unchanged(model, snap)
    assert lowrank.active_adapters(model) == ["c"]


# ------------------------------------------------------------------------------------------------ mixed batches


def llama_with_adapters():
    """Tiny Llama with 'default' (r=4), 'b' (r=2, other alpha) and 'c' (r=8, rsLoRA, only attention)."""
    model = tiny_llama()
    lowrank.inject(model, "all-linear", r=4, alpha=8)
    lowrank.inject(model, "all-linear", r=2, alpha=3, adapter_name="b")
    lowrank.inject(model, ["q_proj", "v_proj"], r=8, alpha=4, rslora=True, adapter_name="c")
    return randomize_adapters(model, std_b=0.2, std_a=0.2)


ROWS = ["b", None, "default", "c", "b"]


def test_mixed_batch_forward_and_gradients_equal_per_row_runs():
    model = llama_with_adapters().eval().double()  # float64: the comparison is exact up to summation order
    ids = torch.randint(0, 128, (len(ROWS), 6), generator=torch.Generator().manual_seed(3))
    probe = torch.randn(len(ROWS), 6, 128, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    lowrank.set_adapter(model, "default")
    flags = [p.requires_grad for p in lowrank.adapter_parameters(model)]
    with lowrank.mixed_batch(model, ROWS):
        assert lowrank.active_adapters(model) == ["b", "default", "c"]
        logits = model(input_ids=ids).logits
        (logits * probe).sum().backward()
    assert lowrank.active_adapters(model) == ["default"]
    assert [p.requires_grad for p in lowrank.adapter_parameters(model)] == flags
    mixed_grads = {n: [p.grad.clone() for p in lowrank.adapter_parameters(model, n)] for n in ("default", "b", "c")}

    for p in lowrank.adapter_parameters(model):
        p.grad = None
    expected_grads = {n: [torch.zeros_like(p) for p in lowrank.adapter_parameters(model, n)] for n in mixed_grads}
    for i, name in enumerate(ROWS):
        if name is None:
            with lowrank.disabled(model):
                row = model(input_ids=ids[i : i + 1]).logits
        else:
            lowrank.set_adapter(model, name)
            row = model(input_ids=ids[i : i + 1]).logits
            (row * probe[i : i + 1]).sum().backward()
            for g, p in zip(expected_grads[name], lowrank.adapter_parameters(model, name), strict=False):
                g += p.grad
                p.grad = None
        # float64, logits ~1: the batched path sums in another order (all adapters' rank columns, zeros included).
        torch.testing.assert_close(logits[i : i + 1], row, rtol=0, atol=1e-12)
    for name in mixed_grads:
        for got, want in zip(mixed_grads[name], expected_grads[name], strict=False):
            # Normwise, float64: summation order apart (elementwise ratios explode where an entry is near zero).
            assert (got - want).abs().max() <= 1e-12 * want.abs().max()
        assert any(g.abs().max() > 1e-3 for g in mixed_grads[name])  # every adapter really got gradient


def test_mixed_batch_any_input_shape_and_float64_reference():
    model = three_adapters(toy()).double()
    x = torch.randn(3, 2, 5, 10, dtype=torch.float64)  # (batch, ..., in)
    rows = ["c", None, "b"]
    with lowrank.mixed_batch(model, rows):
        y = model(x)
    for i, name in enumerate(rows):
        want = reference(model, x[i], [] if name is None else [name])
        torch.testing.assert_close(y[i], want, rtol=0, atol=1e-12)  # float64 both sides


def test_mixed_batch_errors_and_restores_on_exception():
    model = three_adapters(toy())
    with pytest.raises(ValueError, match=r"mixed_batch has 3 names, one per row, but layer '0' got an input"):
        with lowrank.mixed_batch(model, ["b", "c", None]):
            model(torch.randn(4, 10))
    assert lowrank.active_adapters(model) == ["c"] and all(
        layer.mixed is None for _, layer in lowrank.lora_layers(model)
    )
    with lowrank.mixed_batch(model, ["b", "c"]):
        with pytest.raises(RuntimeError, match="mixed_batch"):
            lowrank.merge(model)
        with pytest.raises(RuntimeError, match="mixed_batch"):
            lowrank.set_adapter(model, "b")
        with pytest.raises(RuntimeError, match="mixed_batch"):
            lowrank.mixed_batch(model, ["b", "c"]).__enter__()
    lowrank.merge(model)
    with pytest.raises(RuntimeError, match="merged"):
        lowrank.mixed_batch(model, ["b", "c"]).__enter__()


def test_mixed_batch_matches_peft_adapter_names(tmp_path):
    import peft

    base = tiny_llama().eval()
    ours = llama_with_adapters().eval()
    ours.load_state_dict(base.state_dict())  # same base weights: a base checkpoint loads strictly
    lowrank.save_adapter(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "b", "c"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.load_adapter(tmp_path / "c", adapter_name="c")
    ids = torch.randint(0, 128, (len(ROWS), 6), generator=torch.Generator().manual_seed(5))
    peft_rows = [n if n is not None else "__base__" for n in ROWS]
    with torch.no_grad():
        expected = theirs(input_ids=ids, adapter_names=peft_rows).logits
        with lowrank.mixed_batch(ours, ROWS):
            got = ours(input_ids=ids).logits
        theirs.set_adapter("c")
        single_theirs = theirs(input_ids=ids).logits
        lowrank.set_adapter(ours, "c")
        single_ours = ours(input_ids=ids).logits
    # float32 on both sides, different summation orders: a few ulps of logits of size ~1.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single_ours, single_theirs, rtol=1e-5, atol=1e-5)


def test_peft_multi_adapter_files_load_in_lowrank(tmp_path):
    import peft

    base = tiny_llama().eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    theirs.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["o_proj"]))
    randomize_adapters(theirs, std_b=0.3, std_a=0.3)
    theirs.save_pretrained(tmp_path)
    ours = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    lowrank.load_adapter(ours, tmp_path / "b", adapter_name="b")
    assert lowrank.adapter_names(ours) == ["default", "b"]
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(6))
    theirs.eval()
    with torch.no_grad():
        for name in ("default", "b"):
            theirs.set_adapter(name)
            lowrank.set_adapter(ours, name)
            torch.testing.assert_close(
                ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5
            )  # float32 both, same formula: summation order apart


def test_save_layouts_and_folder_clash(tmp_path):
    model = three_adapters(toy())
    lowrank.save_adapter(model, tmp_path / "all")
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "b", "c"]  # fmt: skip
    lowrank.save_adapter(model, tmp_path / "only_b", "b")  # one adapter: at the path itself
    assert sorted(p.name for p in (tmp_path / "only_b").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    fresh = toy()
    for name, folder in (("default", "all"), ("b", "all/b"), ("c", "all/c")):
        lowrank.load_adapter(fresh, tmp_path / folder, adapter_name=name)
    x = torch.randn(3, 10)
    for names in (["default"], ["b"], ["c"], ["b", "c"]):
        lowrank.set_adapter(fresh, names)
        lowrank.set_adapter(model, names)
        assert torch.equal(fresh(x), model(x))
    clash = three_adapters(toy())
    lowrank.inject(clash, ["2"], adapter_name="B")
    with pytest.raises(ValueError, match=r"adapters \['b', 'B'\] would be saved into one folder"):
        lowrank.save_adapter(clash, tmp_path / "clash")
    assert not (tmp_path / "clash").exists()  # checked before anything was written
