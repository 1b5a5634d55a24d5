"""The static-buffer pass: large temporaries in planned, reused buffers; same bits; outputs never planned."""

from __future__ import annotations

import pytest
import torch

from passes import GRAPH_PASSES
from passes.plan_static_buffers import out_variant, plan_static_buffers
from programs import mwn_engine, step_graph

aten = torch.ops.aten


def _planned(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and any(a.op == "get_attr" for a in n.all_input_nodes)]


def test_out_variant_matches_argument_names_and_types():
    assert out_variant(aten.mm.default) == (aten.mm.out, "out")
    assert out_variant(aten.pow.Tensor_Scalar) == (aten.pow.Tensor_Scalar_out, "out")  # not Tensor_Tensor_out
    assert out_variant(aten.threshold_backward.default) == (aten.threshold_backward.grad_input, "grad_input")
    assert out_variant(aten.relu_.default) is None  # writes its input already
    assert out_variant(aten.max.dim) is None  # two results


def test_lifetimes_decide_sharing_and_outputs_are_never_planned():
    def f(x, w):
        a = x @ w  # dies at b
        b = torch.relu(a) @ w.t() @ w  # a's buffer is free again for the next 64x64 result ...
        c = (b * 2) @ w  # ... but b is alive while b * 2 is computed: a second buffer
        return c.sum(), c * 3  # c is read after its buffer could be reused; c * 3 is returned

    x, w = torch.randn(64, 64), torch.randn(64, 64)
    pool: dict = {}
    gm = plan_static_buffers(step_graph(f, x, w), torch.device("cpu"), pool, min_bytes=1024)
    planned = _planned(gm)
    assert planned, gm.code
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert not set(planned) & set(output.all_input_nodes)
    (buffers,) = pool.values()
    assert 1 < len(buffers) < len(planned)  # reused, but never while a value is alive
    want = f(x, w)
    first = gm(x, w)
    first_copy = [t.clone() for t in first]
    second = gm(x, w)
    for a, b, c in zip(first, first_copy, second):
        assert torch.equal(a, b) and torch.equal(c, b)  # a later call does not overwrite earlier outputs
    for got, ref in zip(second, want):
        assert torch.equal(got, ref)
    assert not any(t.data_ptr() == b.data_ptr() for t in second for b in buffers)


def _mwn_params(method: str, plan: bool, steps: int = 6):
    if not plan:
        GRAPH_PASSES["plan_static_buffers"] = lambda gm, **kw: gm
    try:
        engine = mwn_engine(method, "fx", unroll=2)
        for _ in range(steps):
            engine.train_step()
    finally:
        GRAPH_PASSES["plan_static_buffers"] = plan_static_buffers
    params = torch.cat(
        [p.detach().flatten() for prob in engine.program.problems.values() for p in prob.module.parameters()]
    )
    return params, engine


@pytest.mark.parametrize("method", ["darts", "neumann", "cg", "itd"])
def test_training_is_bitwise_unchanged(method, float64, monkeypatch):
    monkeypatch.setattr(plan_static_buffers, "__defaults__", (None, 0))  # tiny test program: plan everything
    planned, engine = _mwn_params(method, True)
    plain, _ = _mwn_params(method, False)
    assert torch.equal(planned, plain)
    graphs = [t.gm for t in engine.compiler.latest.values()]
    assert sum(len(_planned(gm)) for gm in graphs) > 0
    assert sum(len(b) for b in engine.compiler.buffers.values()) < sum(len(_planned(gm)) for gm in graphs)
