"""The static cost model: FLOPs against FlopCounterMode, liveness peaks, symbolic forms."""

from __future__ import annotations

import functools

import pytest
import sympy
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils.flop_counter import FlopCounterMode

import mlocompile as mlo
from mlocompile import cost
from mlocompile.trace import flatten_inputs
from programs import Meta, Reweighted, chain_engine, mwn_engine

METHODS = ["darts", "sama", "neumann", "cg", "itd"]


def big_mwn_engine(method: str) -> mlo.Engine:
    """Meta-Weight-Net with an MLP 64-128-10 at batch 32, so matmuls dominate the FLOPs."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(2)]
    meta = [(torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(2)]
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    wnet = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 1))
    cfg = mlo.Config(type=method, unroll_steps=2, neumann_iterations=3, neumann_alpha=0.1, cg_iterations=3)
    inner = Reweighted(
        "inner", cfg, net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), train_data_loader=data
    )
    outer = Meta("outer", mlo.Config(), wnet, torch.optim.Adam(wnet.parameters(), lr=1e-3), train_data_loader=meta)
    return mlo.Engine(
        [outer, inner], mlo.EngineConfig(compile="fx"), {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}
    )


@functools.cache
def compiled_big_mwn(method: str) -> tuple[mlo.Engine, mlo.CompiledProgram]:
    engine = big_mwn_engine(method)
    return engine, mlo.compile(engine)


def measured_flops(engine: mlo.Engine, title: str, gm: torch.fx.GraphModule) -> int:
    name = title.removeprefix("step_")
    flat = flatten_inputs(engine.step_inputs(name, engine.peek_batch(name)))
    with FlopCounterMode(display=False) as counter:
        gm(*flat.tensors)
    return int(counter.get_total_flops())


def nbytes(val) -> int:
    if isinstance(val, torch.Tensor):
        return val.numel() * val.element_size()
    if isinstance(val, (tuple, list)):
        return sum(nbytes(v) for v in val)
    return 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("program", ["mwn", "chain3"])
def test_static_flops_match_flop_counter(method, program):
    if program == "mwn":
        engine, compiled = compiled_big_mwn(method)
    else:
        engine = chain_engine(method, levels=3)
        compiled = mlo.compile(engine)
    report = compiled.cost()
    assert set(report.steps) == set(compiled.graph_modules)
    for title, gm in compiled.graph_modules.items():
        step = report.steps[title]
        measured = measured_flops(engine, title, gm)
        assert step.flops > 0
        assert step.flops == pytest.approx(measured, rel=0.10), title
        assert sum(step.flops_by_role.values()) == step.flops == sum(step.flops_by_problem.values())
        assert set(step.flops_by_problem) <= set(engine.program.problems)


def test_upper_step_attributes_flops_to_the_methods_vjp():
    report = compiled_big_mwn("neumann")[1].cost()
    outer, inner = report.steps["step_outer"], report.steps["step_inner"]
    assert set(outer.flops_by_method) == {"neumann"} and not inner.flops_by_method
    # one linearization + (I+1) reverse-over-reverse VJPs outweigh the inner's own forward+backward
    assert outer.flops_by_method["neumann"] > 2 * inner.flops


@pytest.mark.parametrize("method", METHODS)
def test_peak_memory_is_bounded_by_inputs_and_all_outputs(method):
    compiled = compiled_big_mwn(method)[1]
    report = compiled.cost()
    for title, gm in compiled.graph_modules.items():
        step = report.steps[title]
        inputs = sum(nbytes(n.meta["val"]) for n in gm.graph.nodes if n.op == "placeholder")
        outputs = sum(nbytes(n.meta.get("val")) for n in gm.graph.nodes if n.op in ("call_function", "get_attr"))
        assert step.input_bytes == inputs
        assert inputs < step.peak_bytes <= inputs + outputs, title
        assert step.peak_node in {n.name for n in gm.graph.nodes}


def test_itd_peak_memory_grows_with_unroll():
    peaks = {k: mlo.compile(mwn_engine("itd", unroll=k)).cost().steps["step_outer"].peak_bytes for k in (2, 6)}
    assert peaks[6] > peaks[2]


def test_views_alias_and_tuples_split_in_liveness():
    def fn(x):
        z = x.t() * 2  # t is a view; mul allocates 400 bytes, live until its sum
        lo, hi = torch.split(z.unsqueeze(0) + 1, 5, dim=1)  # add allocates 400; views and pieces alias
        return z.sum() + lo.sum()

    gm = make_fx(fn)(torch.randn(10, 10))
    peak, at = cost.estimate_peak_memory(gm)
    # at the first sum: input 400 + z 400 + (z + 1) 400 + the 4-byte result
    assert peak == 400 + 400 + 400 + 4
    assert at.startswith("sum")


def test_composite_ops_are_counted_through_their_decomposition():
    gm = torch.fx.symbolic_trace(lambda a, b: torch.ops.aten.matmul.default(a, b))
    with FakeTensorMode():  # shapes only, as make_fx records them
        a, b = torch.empty(4, 5), torch.empty(5, 6)
        vals = (a, b, a @ b)
    for node, val in zip(gm.graph.nodes, vals):
        node.meta["val"] = val
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert cost.estimate_node_flops(node) == 2 * 4 * 5 * 6


@pytest.mark.parametrize("method", METHODS)
def test_symbolic_forms_have_no_d_cubed_term(method):
    # Worst case dense hop: a d-dim quadratic, where a gradient (and an HVP) costs ~ d^2 per sample.
    flops = sympy.expand(cost.SYMBOLIC_FLOPS[method].subs(cost.c, cost.d))
    assert sympy.Poly(flops, cost.d).degree() <= 2
    assert sympy.Poly(sympy.expand(cost.SYMBOLIC_MEMORY[method]), cost.d).degree() <= 2
    # the check can fail: materializing the best-response Jacobian (d HVPs) is cubic
    jacobian = cost.d * cost.HVP_FACTOR * cost.G
    assert sympy.Poly(sympy.expand(jacobian.subs(cost.c, cost.d)), cost.d).degree() == 3


def test_path_cost_is_the_sum_of_its_hops():
    hops = ["neumann", "cg", "itd"]
    total = cost.path_flops(hops)
    assert sympy.expand(total - sum(cost.SYMBOLIC_FLOPS[m] for m in hops)) == 0
    assert sympy.Poly(sympy.expand(total.subs(cost.c, cost.d)), cost.d).degree() <= 2


def test_symbolic_scaling_in_unroll_and_iterations():
    itd_mem = sympy.expand(cost.SYMBOLIC_MEMORY["itd"])
    assert sympy.Poly(itd_mem, cost.K).degree() == 1
    assert sympy.diff(itd_mem, cost.K).is_positive
    assert cost.iters not in cost.SYMBOLIC_FLOPS["darts"].free_symbols
    for method in ("neumann", "cg"):
        assert sympy.Poly(sympy.expand(cost.SYMBOLIC_FLOPS[method]), cost.iters).degree() == 1
        assert cost.K not in cost.SYMBOLIC_MEMORY[method].free_symbols
    # one darts hypergradient is two gradients plus O(d + p) vector work
    leftover = sympy.expand(cost.SYMBOLIC_FLOPS["darts"] - 2 * cost.G)
    assert cost.c not in leftover.free_symbols
    # sama is darts plus an elementwise preconditioner over the lower's parameters
    assert sympy.expand(cost.SYMBOLIC_FLOPS["sama"] - cost.SYMBOLIC_FLOPS["darts"]) == 18 * cost.d


def test_report_text_lists_every_step_and_method():
    compiled = mlo.compile(chain_engine("cg", levels=3))
    report = compiled.cost()
    text = str(report)
    for title in compiled.graph_modules:
        assert title in text
    for method in METHODS:
        assert f"{method} " in text
    assert report.methods == {"p0": "cg", "p1": "cg"}
    assert "*cg" in text and "*darts" not in text
