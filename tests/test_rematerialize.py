"""The checkpoint pass: recomputation that cuts peak memory and changes no result."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import mlocompile as mlo
from mlocompile.analysis import estimate_peak_memory
from mlocompile.ir import format_graph
from mlocompile.step import StepVariant
from mlocompile.trace import flatten_inputs, trace_step
from passes import run_graph_pipeline
from passes.rematerialize import measure_peak_memory, rematerialize
from programs import load_example, mwn_engine


def _itd_outer_step(k: int, **engine_kw):
    engine = mwn_engine("itd", "fx", unroll=k, **engine_kw)
    for _ in range(k):
        engine.train_step()  # the outer steps at the k-th; its window stays for inspection
    inputs = engine.step_inputs("outer", engine.peek_batch("outer"))
    return engine, engine.compiler.traced(StepVariant("outer"), inputs, engine.compile_options()), flatten_inputs(inputs)


def test_itd_k20_peak_cut_by_40_percent_with_identical_results():
    engine, _, flat = _itd_outer_step(20)
    variant = StepVariant("outer")
    traced = trace_step(engine.compiler.step_fn(variant, engine.compile_options()), flat, variant.title)
    gm = run_graph_pipeline(traced.gm, variant.title, engine.compiler.param_sizes())  # functional: no reinplacing
    remat = rematerialize(copy.deepcopy(gm), memory_budget=0.5)
    before, after = estimate_peak_memory(gm)[0], estimate_peak_memory(remat)[0]
    assert after < before
    ref, out = gm(*flat.tensors), remat(*flat.tensors)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    measured_before = measure_peak_memory(gm, *flat.tensors)
    measured_after = measure_peak_memory(remat, *flat.tensors)
    assert measured_after <= 0.6 * measured_before, (measured_before, measured_after)
    assert any("mlo.remat" in n.meta for n in remat.graph.nodes)


def test_engine_option_runs_the_pass_and_trains_identically():
    plain, _, _ = _itd_outer_step(6)
    budgeted, _, _ = _itd_outer_step(6, memory_budget=0.5)
    for a, b in zip(
        plain.program.problems["outer"].module.parameters(), budgeted.program.problems["outer"].module.parameters()
    ):
        # the segmented replay sums the λ-cotangent in another order: equal up to round-off
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    passes_run = {
        g: [r.name for r in budgeted.compiler.report.records if r.graph == g] for g in ("step_inner", "step_outer")
    }
    assert "rematerialize" in passes_run["step_inner"]  # the liveness pass on the plain step
    assert "rematerialize" not in passes_run["step_outer"]  # the itd replay is checkpointed instead
    ir = mlo.compile(budgeted).ir
    assert "segment=sweep 0-2" in ir and "segment=replay 4-6" in ir  # ⌈1/0.5⌉ + 1 = 3 segments


def _maml_meta_step(maml, steps: int, **engine_kw):
    engine = maml.build(iters=1, steps=steps, meta_batch=1)
    engine.config.memory_budget = engine_kw.get("memory_budget")
    for _ in range(steps):
        engine.train_step()
    inputs = engine.step_inputs("meta", engine.peek_batch("meta"))
    return engine.compiler.traced(StepVariant("meta"), inputs, engine.compile_options()).gm, flatten_inputs(inputs).tensors


def test_maml_itd_k20_memory_budget_cuts_measured_peak_by_40_percent():
    """The issue's acceptance case: examples/maml.py, K = 20, EngineConfig(memory_budget=0.5)."""
    maml = load_example("maml")
    plain, flat = _maml_meta_step(maml, 20)
    budgeted, flat_b = _maml_meta_step(maml, 20, memory_budget=0.5)
    for a, b in zip(flat, flat_b):
        assert torch.equal(a, b)  # same program, same data: the graphs see the same inputs
    for a, b in zip(plain(*flat), budgeted(*flat)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    before, after = measure_peak_memory(plain, *flat), measure_peak_memory(budgeted, *flat)
    assert after <= 0.6 * before, (before, after)


def _mlp_grad(x, w1, w2, w3, w4):
    def loss(*ws):
        h = x
        for w in ws[:-1]:
            h = torch.tanh(h @ w)
        return (h @ ws[-1]).pow(2).sum()

    return torch.func.grad(loss, argnums=(0, 1, 2, 3))(w1, w2, w3, w4)


def _small_graph():
    torch.manual_seed(0)
    args = (torch.randn(64, 4), torch.randn(4, 32), torch.randn(32, 32), torch.randn(32, 32), torch.randn(32, 2))
    gm = make_fx(_mlp_grad)(*args)
    for node in gm.graph.nodes:
        node.meta.setdefault("mlo.problem", "p")
        node.meta.setdefault("mlo.role", "grad")
    return gm, args


def test_golden_small_graph(golden):
    gm, args = _small_graph()
    remat = rematerialize(copy.deepcopy(gm), memory_budget=0.8)
    golden("rematerialize/mlp4.txt", format_graph(remat, "mlp4"))
    assert estimate_peak_memory(remat)[0] < estimate_peak_memory(gm)[0]
    assert all(torch.equal(a, b) for a, b in zip(gm(*args), remat(*args)))


def test_idempotent_under_a_byte_budget():
    gm, _ = _small_graph()
    budget = int(0.8 * estimate_peak_memory(gm)[0])
    once = rematerialize(copy.deepcopy(gm), memory_budget=budget)
    twice = rematerialize(copy.deepcopy(once), memory_budget=budget)
    assert format_graph(once, "g") == format_graph(twice, "g")


def test_budget_must_be_positive():
    with pytest.raises(mlo.ProgramError, match="memory_budget must be > 0"):
        mlo.EngineConfig(memory_budget=0).validate()
