"""A hypergradient method is one registered rule: its VJP and its facts, in one place."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mlocompile as mlo
from mlocompile import cost
from mlocompile.hypergrad import METHOD_RULES, register_method
from mlocompile.symbols import G, d

pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture
def frozen_method():
    """A toy method: the lower solution does not move with the upper (its VJP is zero)."""

    @register_method("frozen", fields=(), second_order=False, flops=0 * G, memory=d)
    def frozen_vjp(env, curr, prev, v):
        return {k: torch.zeros_like(t) for k, t in env.params[prev].items()}

    yield METHOD_RULES["frozen"]
    del METHOD_RULES["frozen"]


def test_every_method_fact_is_on_its_rule():
    assert set(METHOD_RULES) == {"darts", "sama", "neumann", "cg", "itd"}
    config_fields = {f.name for f in dataclasses.fields(mlo.Config)}
    for rule in METHOD_RULES.values():
        assert set(rule.fields) <= config_fields, rule.name
    assert [m for m, r in METHOD_RULES.items() if r.window] == ["itd"]
    assert [m for m, r in METHOD_RULES.items() if not r.second_order] == ["darts", "sama"]
    assert {m: dict(r.optimizer_state) for m, r in METHOD_RULES.items() if r.optimizer_state} == {
        "sama": {k: ("exp_avg", "exp_avg_sq", "last_grad") for k in ("adam", "adamw")}
    }
    assert cost.SYMBOLIC_FLOPS == {m: r.flops for m, r in METHOD_RULES.items()}


@pytest.mark.parametrize("backend", ["eager", "fx"])
def test_a_new_method_is_one_rule(frozen_method, backend):
    from test_hypergrad import D, ridge_data, ridge_engine

    X, y, *_ = ridge_data()
    engine, _, _ = ridge_engine(mlo.Config(type="frozen"), backend, torch.zeros(D, dtype=torch.float64), [(X, y)])
    engine.train_step()  # inner steps; the outer (unroll 1) steps with a zero hypergradient
    assert torch.equal(engine.gradients("outer")["p"], torch.zeros(D, dtype=torch.float64))
    report = mlo.compile(engine).cost()
    assert report.methods == {"inner": "frozen"} and report.symbolic["frozen"] == 0
    assert "frozen" in str(report)
    assert "frozen" in engine.program.describe()


def test_an_unknown_method_names_the_registered_ones():
    from test_hypergrad import D, ridge_data, ridge_engine

    X, y, *_ = ridge_data()
    with pytest.raises(mlo.ProgramError, match=r"type='newton' is not a hypergradient method; use one of \['darts'"):
        ridge_engine(mlo.Config(type="newton"), "eager", torch.zeros(D, dtype=torch.float64), [(X, y)])
