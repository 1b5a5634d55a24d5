"""The reinplace pass: in-place pointwise ops on dead temporaries, same values, inputs untouched."""

from __future__ import annotations

import pytest
import torch

from mlocompile.step import StepVariant
from mlocompile.trace import flatten_inputs, trace_step
from passes import run_graph_pipeline
from passes.reinplace_pointwise import reinplace_pointwise
from programs import chain_engine, mwn_engine, step_graph


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_temporaries_become_in_place_inputs_and_outputs_never():
    def f(x, y):
        a = x * 2  # a temporary
        b = a + y  # a is dead afterwards: add_ into a
        c = torch.relu(b)  # b (a's buffer, owned) is dead afterwards: relu_
        return c, x + 1, a.shape[0] * y  # x is an input: never written

    x, y = torch.randn(4), torch.randn(4)
    gm = reinplace_pointwise(step_graph(f, x, y))
    assert _targets(gm).count("aten.add_.Tensor") == 1
    assert "aten.relu_.default" in _targets(gm)
    assert "aten.mul_.Tensor" not in _targets(gm)  # x * 2 reads an input; 4 * y too
    x0, y0 = x.clone(), y.clone()
    for got, want in zip(gm(x, y), f(x0, y0)):
        assert torch.equal(got, want)
    assert torch.equal(x, x0) and torch.equal(y, y0)


def test_never_into_a_broadcast_a_promotion_a_live_view_or_an_output():
    def f(s, v, y, n):
        a = s * 2
        b = a + v  # [] + [3] -> [3]: cannot be written into a's 0-dim buffer
        t = y * 3
        tv = t.t()  # a view of t, used after the next op
        u = t + 1
        i = n * 2
        k = i + 0.5  # int64 temporary, float result: type promotion
        w = y * 5
        z = w + 1  # w is returned too: must survive
        return b, u, tv, k, w, z

    args = (torch.randn(()), torch.randn(3), torch.randn(2, 3), torch.arange(3))
    gm = reinplace_pointwise(step_graph(f, *args))
    assert not any(t.split(".")[1].endswith("_") for t in _targets(gm)), _targets(gm)
    for got, want in zip(gm(*args), f(*args)):
        assert torch.equal(got, want)


def _functional_and_reinplaced(engine, name):
    inputs = engine.step_inputs(name, engine.peek_batch(name))
    flat = flatten_inputs(inputs)
    variant = StepVariant(name)
    fresh = trace_step(engine.compiler.step_fn(variant, engine.compile_options()), flat, variant.title).gm
    functional = run_graph_pipeline(fresh, variant.title, engine.compiler.param_sizes())
    reinplaced = engine.compiler.traced(variant, inputs, engine.compile_options(), flat).gm
    return functional, reinplaced, flat.tensors


def _check_same_bits(functional, reinplaced, tensors, name):
    """Same outputs; an input changes only if donated (its problem's parameters and optimizer state)."""
    mine = [t.clone() for t in tensors]
    want, got = functional(*[t.clone() for t in tensors]), reinplaced(*mine)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    names = [n.meta["mlo.input"] for n in reinplaced.graph.nodes if n.op == "placeholder"]
    written = {n for n, before, after in zip(names, tensors, mine) if not torch.equal(before, after)}
    donatable = {n for n in names if n.startswith(f"params.{name}.") or (n.startswith("opt.") and ".step" not in n)}
    assert written <= donatable, written - donatable
    return written


@pytest.mark.parametrize("method", ["darts", "neumann", "cg", "itd"])
def test_step_graphs_compute_the_same_bits_and_write_only_donated_inputs(method):
    engine = mwn_engine(method, "fx", unroll=2, in_place_updates=True)
    for _ in range(4):
        engine.train_step()
    for name in ("inner", "outer"):
        functional, reinplaced, tensors = _functional_and_reinplaced(engine, name)
        assert any(t.split(".")[1].endswith("_") for t in _targets(reinplaced))  # the pass did something
        written = _check_same_bits(functional, reinplaced, tensors, name)
        # parameters are updated in place, like torch.optim; never with itd (its windows keep old values)
        assert bool(written) == (method != "itd"), written


def test_three_level_step_graphs_unchanged_in_value():
    engine = chain_engine("darts", "fx", levels=3)
    for _ in range(3):
        engine.train_step()
    for name in engine.program.problems:
        functional, reinplaced, tensors = _functional_and_reinplaced(engine, name)
        _check_same_bits(functional, reinplaced, tensors, name)


@pytest.mark.parametrize("settings", [{"roll_back": True, "in_place_updates": True}, {}])
def test_no_donation_under_roll_back_or_by_default(settings):
    """Donation needs ``in_place_updates`` (atomic steps keep the old values) and no roll_back cache."""
    engine = mwn_engine("darts", "fx", **settings)
    for _ in range(3):
        engine.train_step()
    functional, reinplaced, tensors = _functional_and_reinplaced(engine, "inner")
    assert not _check_same_bits(functional, reinplaced, tensors, "inner")
