"""The fused LoRA inference route (``LOWRANK_FUSED_LORA=1``): NF4 base matmul and ``x A^T`` from one op.

On CPU the op ``lowrank::nf4_lora_matmul`` runs its torch reference, which computes ``x A^T`` exactly as the
unfused forward does, so the fused forward must equal the unfused one bit for bit (torch.equal). The Triton
path (CUDA) is tested against float64 in ``tests/kernels/test_nf4_lora.py``. Here: the route is taken exactly
when it may be (counted by wrapping the dispatch function), never when a gradient is needed, dropout is active,
the layer is merged or disabled, or the switch is off; and ``torch.compile(fullgraph=True)`` traces it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import randomize_adapters
from torch import nn

import lowrank
from lowrank import dispatch, nf4
from lowrank import nf4_linear as nf4_linear_module

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _model(dtype=torch.float32, dropout=0.0):
    """Two NF4 layers with LoRA (one with a bias, one without, r = 5 and 20) and a dense adapted head."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 40, bias=False), nn.Tanh(), nn.Linear(40, 8))
    model = model.to(dtype)
    lowrank.quantize(model, targets=["0", "2"])
    lowrank.inject(model, targets=["0", "2", "4"], r=5, alpha=10.0, dropout=dropout, rank_pattern={"2": 20},
                   alpha_pattern={"2": 16.0})  # fmt: skip
    return randomize_adapters(model, std_b=0.1)  # B = 0 would make the adapter term vanish


@pytest.fixture
def calls(monkeypatch):
    """The fused op's call count: NF4Linear's reference to ``nf4_lora_linear`` wrapped with a counter."""
    seen = []

    def counting(*args):
        seen.append(args[0].shape)
        return dispatch.nf4_lora_linear(*args)

    monkeypatch.setattr(nf4_linear_module, "nf4_lora_linear", counting)
    return seen


def _outputs(model, x, lowrank_env, flag):
    """``model(x)`` with LOWRANK_FUSED_LORA set to ``flag`` (None: unset, the default)."""
    lowrank_env("LOWRANK_FUSED_LORA", flag)
    return model(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_equals_unfused_in_eval_no_grad(dtype, calls, lowrank_env):
    model = _model(dtype).eval()
    # leading batch dimensions, non-zero mean; 39 rows: more than SMALL_ROWS, whose 16-bit CPU updates are float32
    x = (torch.randn(3, 13, 64) + 0.2).to(dtype)
    with torch.no_grad():
        unfused = _outputs(model, x, lowrank_env, "0")
        assert calls == []
        fused = _outputs(model, x, lowrank_env, "1")
    assert calls == [(3, 13, 64), (3, 13, 96)]  # both NF4 layers; the dense head "4" is not an NF4 base
    assert fused.dtype == dtype and torch.equal(fused, unfused)
    with torch.inference_mode():
        assert torch.equal(model(x), unfused)
    # Not only equal to the unfused path but right: layer 0 against its dense float64 form W0 + scale B A.
    layer = model[0]
    delta = 10.0 / 5 * (layer.lora_B.double() @ layer.lora_A.double())  # scale = alpha / r of layer 0
    w = layer.base.dequantize_weight(torch.float64) + delta
    expect = F.linear(x.double(), w, layer.base.bias.double())
    with torch.no_grad():
        got = layer(x).double()
    # float32: a few ulps over K = 64; 16-bit: x, A, W, x A^T, the update and the output each rounded once.
    tol = 1e-5 if dtype == torch.float32 else 8 * torch.finfo(dtype).eps
    assert ((got - expect).abs().max() / expect.abs().max()).item() < tol


def test_fused_with_grad_mode_on_when_nothing_requires_grad(calls, lowrank_env):
    # Grad mode on, but x, A, B and the bias need no gradient: the fused op may run (nothing to differentiate).
    model = _model().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 64)
    assert torch.is_grad_enabled()
    fused = _outputs(model, x, lowrank_env, "1")
    assert len(calls) == 2 and not fused.requires_grad
    assert torch.equal(fused, _outputs(model, x, lowrank_env, "0"))


def test_training_mode_without_dropout_under_no_grad_is_fused(calls, lowrank_env):
    model = _model(dropout=0.0).train()
    with torch.no_grad():
        _outputs(model, torch.randn(2, 64), lowrank_env, "1")
    assert len(calls) == 2


@pytest.mark.parametrize("case", ["grad_needed", "dropout_training", "merged", "disabled", "flag_unset",
                                  "flag_0", "compute_dtype", "base_hook"])  # fmt: skip
def test_fused_route_not_taken(case, calls, lowrank_env):
    model = _model(dropout=0.1 if case == "dropout_training" else 0.0)
    model.train(case == "dropout_training")
    x = torch.randn(2, 5, 64)
    flag = {"flag_unset": None, "flag_0": "0"}.get(case, "1")  # off by default and with "0"; "1" switches it on
    if case == "merged":
        lowrank.merge(model)
    if case == "disabled":
        for _, layer in lowrank.lora_layers(model):
            layer.enabled = False
    if case == "compute_dtype":  # the base would compute in bf16 while the adapter uses x's float32
        model[0].base.compute_dtype = model[2].base.compute_dtype = torch.bfloat16
    if case == "base_hook":  # the fused forward skips base.__call__, so a base with hooks keeps the unfused route
        hooked = []
        for i in (0, 2):
            model[i].base.register_forward_pre_hook(lambda m, args: hooked.append(m))
    if case == "grad_needed":
        out = _outputs(model, x, lowrank_env, flag)
        out.square().sum().backward()  # the unfused route is differentiable: A and B get gradients
        assert model[0].lora_A.grad is not None and model[2].lora_B.grad is not None
    else:
        with torch.no_grad():
            out = _outputs(model, x, lowrank_env, flag)
    assert calls == []
    if case == "base_hook":
        assert len(hooked) == 2


def test_nf4_lora_linear_refuses_gradients_and_matches_its_parts():
    q = nf4.quantize(torch.randn(24, 40, dtype=torch.bfloat16), 32, True)
    x = torch.randn(2, 3, 40)
    a, bias = torch.randn(6, 40), torch.randn(24)
    with pytest.raises(RuntimeError, match="inference-only"):
        dispatch.nf4_lora_linear(x.requires_grad_(), q, bias, a)
    with pytest.raises(RuntimeError, match="inference-only"):
        dispatch.nf4_lora_linear(x.detach(), q, bias, a.requires_grad_())
    with torch.no_grad():
        y, xa = dispatch.nf4_lora_linear(x, q, bias, a)
        assert torch.equal(y, dispatch.nf4_linear(x, q, bias))
        assert xa.dtype == torch.float32 and torch.equal(xa, F.linear(x, a))
        x16 = x.to(torch.float16)
        _, xa16 = dispatch.nf4_lora_linear(x16, q, None, a)
        assert xa16.dtype == torch.float32 and torch.equal(xa16.half(), F.linear(x16, a.half()))
        with pytest.raises(ValueError, match="does not match LoRA A"):
            dispatch.nf4_lora_linear(x, q, None, torch.randn(6, 41))


def test_op_registration_passes_opcheck():
    q = nf4.quantize(torch.randn(40, 64), 32, True)
    weight = (q.packed, q.absmax_q, q.absmax2, q.offset, 40, 64, 32, torch.float32)
    torch.library.opcheck(torch.ops.lowrank.nf4_lora_matmul.default, (torch.randn(3, 64), *weight, torch.randn(8, 64)))


def test_compile_fullgraph_takes_the_fused_op(lowrank_env):
    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    model = _model().eval()
    x = torch.randn(3, 5, 64)
    lowrank_env("LOWRANK_FUSED_LORA", "1")
    with torch.no_grad():
        eager = model(x)
        traced = torch.compile(model, fullgraph=True, backend=backend)(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="inductor")(x)
    assert sum("lowrank.nf4_lora_matmul" in t for t in seen) == 2  # one opaque node per NF4 layer, no break
    assert not any("lowrank.nf4_matmul" in t for t in seen)
    assert torch.equal(traced, eager)  # the graph run eagerly: the same ops
    # Inductor may fuse and reorder the float32 bias / LoRA adds: a few ulps of activations of size ~1.
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
