"""What the compiler emits: golden IR, runnable code, and backends that agree."""

from __future__ import annotations

import traceback

import pytest
import torch

import mlocompile as mlo
from mlocompile.step import StepVariant
from mlocompile.trace import flatten_inputs
from programs import chain_engine, mwn_engine

METHODS = ["darts", "neumann", "cg", "itd"]


pytestmark = pytest.mark.usefixtures("float64")


def _params(engine):
    return torch.cat(
        [p.detach().flatten() for prob in engine.program.problems.values() for p in prob.module.parameters()]
    )


@pytest.mark.parametrize("method", METHODS)
def test_eager_and_fx_agree(method):
    runs = {}
    for backend in ("eager", "fx"):
        engine = mwn_engine(method, backend, unroll=2)
        for _ in range(6):
            engine.train_step()
        runs[backend] = _params(engine)
    torch.testing.assert_close(runs["fx"], runs["eager"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("levels", [3, 4])
@pytest.mark.parametrize("method", METHODS)
def test_eager_and_fx_agree_on_deep_programs(method, levels):
    runs = {}
    for backend in ("eager", "fx"):
        engine = chain_engine(method, backend, levels=levels)
        before = _params(engine).clone()
        for _ in range(3):
            engine.train_step()
        runs[backend] = _params(engine)
    torch.testing.assert_close(runs["fx"], runs["eager"], rtol=1e-12, atol=1e-14)
    assert torch.isfinite(runs["fx"]).all()
    assert engine.program.level(f"p{levels - 1}") == levels - 1
    top = engine.program.problems[f"p{levels - 1}"].module.weight.detach()
    assert not torch.equal(before[-top.numel() - top.shape[0] :], runs["fx"][-top.numel() - top.shape[0] :])


def test_golden_ir_bilevel(golden):
    golden("ir/bilevel_darts.txt", mlo.compile(mwn_engine("darts")).ir)


def test_golden_ir_three_level(golden):
    golden("ir/three_level_neumann.txt", mlo.compile(chain_engine("neumann", levels=3)).ir)


def test_ir_is_deterministic():
    assert mlo.compile(mwn_engine("cg")).ir == mlo.compile(mwn_engine("cg")).ir


def test_ir_annotations_cover_every_role():
    ir = mlo.compile(mwn_engine("neumann")).ir
    for tag in (
        "role=forward",
        "role=grad",
        "role=hypergrad",
        "role=update",
        "method=neumann",
        "edge=inner->outer",
        "path=outer.v0",
    ):
        assert tag in ir
    assert "graph step_outer:" in ir and "graph step_inner:" in ir


def test_emitted_code_executes_and_matches():
    engine = mwn_engine("darts")
    compiled = mlo.compile(engine)
    code = compiled.code
    assert "def step_outer(self," in code and "def step_inner(self," in code
    namespace: dict = {}
    exec(compile(code, "<mlocompile>", "exec"), {"torch": torch, "inf": float("inf"), "nan": float("nan")}, namespace)
    gm = compiled.graph_modules["step_outer"]
    inputs = flatten_inputs(engine.step_inputs("outer", engine.peek_batch("outer")))
    # the update step writes the new parameters into its parameter inputs: give each run its own copy
    ours = namespace["step_outer"](gm, *[t.clone() for t in inputs.tensors])
    theirs = gm(*[t.clone() for t in inputs.tensors])
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_no_jacobian_shaped_nodes_and_check_fires():
    from mlocompile.errors import IRVerificationError
    from passes import check_no_jacobians

    engine = mwn_engine("cg")
    compiled = mlo.compile(engine)
    sizes = engine.compiler.param_sizes()
    for gm in compiled.graph_modules.values():
        check_no_jacobians(gm, sizes)
    # a graph that does materialize a d_inner x d_outer matrix is rejected
    d_in, d_out = sizes["inner"], sizes["outer"]
    bad = torch.fx.symbolic_trace(lambda a, b: torch.outer(a, b))
    for node in bad.graph.nodes:
        node.meta["val"] = torch.empty(d_in, d_out) if node.op == "call_function" else torch.empty(1)
    with pytest.raises(IRVerificationError, match="shape of a best-response Jacobian"):
        check_no_jacobians(bad, sizes)


def test_pass_report_and_cse_dce_preserve_semantics():
    engine = mwn_engine("neumann")
    inputs = engine.step_inputs("outer", engine.peek_batch("outer"))
    eager = engine.compiler.step_fn(StepVariant("outer"), engine.compile_options())(inputs)
    traced = engine.compiler.traced(StepVariant("outer"), inputs, engine.compile_options())
    out = traced(flatten_inputs(inputs))
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(out[key], eager[key], rtol=1e-12, atol=0)
    rows = [r for r in engine.compiler.report.records if r.graph == "step_outer"]
    names = ["simplify_no_ops", "eliminate_common_subexpressions", "eliminate_dead_code", "reinplace_pointwise"]
    names.append("plan_static_buffers")
    assert [r.name for r in rows] == names
    assert rows[0].nodes_after < rows[0].nodes_before  # t(t(w)), loss / 1, ...
    assert rows[1].nodes_after < rows[1].nodes_before  # neumann's repeated linearizations share work
    assert "eliminate_dead_code" in str(mlo.compile(engine).report())


def test_graph_is_reused_and_retraced_on_new_shapes():
    engine = mwn_engine("darts")
    for _ in range(5):
        engine.train_step()
    n_traced = len(engine.compiler._traced)
    assert n_traced == 2  # one graph per problem, reused every step
    engine.program.problems["inner"].train_data_loader = [(torch.randn(8, 6), torch.randint(0, 3, (8,)))]
    engine.program.problems["inner"]._iterators = None
    engine.train_step()
    assert len(engine.compiler._traced) > n_traced


def test_shared_step_counters_are_one_input_and_retrace_when_they_differ():
    """Parameters stepped together share one step-counter input; a graph traced that way
    must not run once their counters differ (a retrace keeps fx equal to eager)."""
    runs, traced = {}, {}
    for backend in ("eager", "fx"):
        engine = mwn_engine("darts", backend)
        for _ in range(3):
            engine.train_step()
        outer = engine.program.problems["outer"]
        state = engine.optimizers["outer"].read_state()
        steps = {id(s["step"]) for s in state.values()}
        assert len(steps) == 1  # one tensor for all of the outer's Adam counters
        first = next(iter(outer.module.parameters()))
        outer.optimizer.state[first]["step"] = torch.tensor(7.0)  # this one's bias correction now differs
        for _ in range(3):
            engine.train_step()
        runs[backend] = _params(engine)
        traced[backend] = len(engine.compiler._traced)
    torch.testing.assert_close(runs["fx"], runs["eager"], rtol=1e-12, atol=1e-14)
    assert traced["fx"] == 3  # inner, outer with shared counters, outer with one counter apart


def test_flat_inputs_key_tells_shared_from_distinct_inputs():
    shared = torch.zeros((), dtype=torch.float64)
    shared._mlo_shared = True
    twice = flatten_inputs({"a": shared, "b": shared})
    apart = flatten_inputs({"a": shared, "b": torch.zeros((), dtype=torch.float64)})
    assert len(twice.tensors) == 1 and len(apart.tensors) == 2
    assert twice.key() != apart.key()
    other = torch.ones((), dtype=torch.float64)
    other._mlo_shared = True
    left = flatten_inputs({"a": shared, "b": shared, "c": other})
    right = flatten_inputs({"a": shared, "b": other, "c": other})
    assert len(left.tensors) == len(right.tensors) == 2
    assert left.key() != right.key()  # same inputs, different sharing: not the same graph
    plain = torch.ones(2)
    assert len(flatten_inputs({"a": plain, "b": plain}).tensors) == 2  # unmarked tensors are never merged


def test_direct_runner_runs_the_graph_bit_for_bit_and_keeps_tracebacks():
    from torch.fx.experimental.proxy_tensor import make_fx

    from mlocompile.backends import direct_runner

    def step(w, x, idx):
        h = torch.relu(x @ w.t())
        picked = h[idx]  # index: an op with an optional-tensor list argument
        return torch.log_softmax(picked, 1).sum(), h.max(dim=1).indices

    args = (torch.randn(5, 4), torch.randn(8, 4), torch.tensor([0, 2, 7]))
    gm = make_fx(step)(*args)
    run = direct_runner(gm, "step_demo")
    for want, got in zip(gm(*args), run(*args)):
        assert torch.equal(want, got)
    assert "torch.ops.aten" in gm.code  # FX's code goes through OpOverload.__call__ ...

    bad = (torch.randn(5, 3), *args[1:])  # ... the runner's calls the same ops directly, and errors
    with pytest.raises(RuntimeError) as info:  # still point into the generated source
        run(*bad)
    text = "".join(traceback.format_exception(info.value))
    assert "<mlocompile step_demo>" in text and "_aten_mm_default(" in text


def test_the_garbage_collector_is_paused_while_a_step_compiles_and_resumes_after(monkeypatch):
    """Compiling allocates millions of long-lived objects: collections during it find nothing to free
    (compiler.collector_paused). It is paused for the trace, passes and codegen, and resumes, also when
    compiling fails; an already disabled collector stays disabled."""
    import gc

    import mlocompile.compiler as compiler

    seen = []
    trace = compiler.trace_step

    def watching(*args, **kwargs):
        seen.append(gc.isenabled())
        return trace(*args, **kwargs)

    monkeypatch.setattr(compiler, "trace_step", watching)
    assert gc.isenabled()
    chain_engine("darts", "fx", levels=2).train_step()
    assert seen and not any(seen) and gc.isenabled()

    def failing(*args, **kwargs):
        raise RuntimeError("trace failed")

    monkeypatch.setattr(compiler, "trace_step", failing)
    with pytest.raises(RuntimeError, match="trace failed"):
        chain_engine("darts", "fx", levels=2).train_step()
    assert gc.isenabled()
    gc.disable()
    try:
        with compiler.collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_step_source_writes_the_statements_fx_writes():
    """backends.step_source writes a step's forward in a fifth of FX's time: the same statements in the
    same order (calls bound to the ops' C++ entry points, values freed after their last use), but one
    statement unpacking a tuple-returning op's items; arguments of every kind a step holds written so
    they evaluate to the same values; the runner built on it computes what the GraphModule computes,
    bit for bit. A graph outside step graphs falls back to FX's source."""
    import re

    from torch.fx.experimental.proxy_tensor import make_fx

    from mlocompile.backends import _fx_source, direct_runner, step_source

    def step(x, idx):
        a = torch.clamp(x, min=-0.0, max=float("inf")) * 0.1  # -0.0, inf, a float literal
        b = torch.nan_to_num(a / x, nan=float("nan"), neginf=-1e300)  # nan and a large float
        c = b.to(torch.float32).contiguous(memory_format=torch.contiguous_format)  # dtype, memory format
        d = torch.zeros(3, device=x.device, dtype=torch.float64)  # device: a global
        e = c.double()[idx].sum(dim=[0], keepdim=True) + d.sum()  # a list holding a node, a bool
        top, where = x.max(dim=1)  # getitem
        return e, top, where.sum()

    args = (torch.randn(4, 3), torch.tensor([0, 2]))
    gm = make_fx(step)(*args)
    written = step_source(gm)
    assert written is not None
    src, scope = written
    fx_src, _ = _fx_source(gm)

    def statements(text):
        return [re.sub(r"\s+", "", line) for line in text.splitlines() if line.strip() and not line.startswith("def ")]

    ours, theirs = statements(src), statements(fx_src)
    unpacks = [line for line in ours if ",=" in line]  # max's (values, indices): one statement, not three
    assert len(unpacks) == 1 and unpacks[0].startswith("getitem,getitem_1,=_aten_max_dim(")
    made = re.search(r",=(\w+)\(", unpacks[0]).group(1)
    ours = [line for line in ours if ",=" not in line]
    theirs = [line for line in theirs if f"={made}(" not in line and not re.match(r"\w+=\w+\[\d+\]", line)]
    assert len(ours) == len(theirs) > 10
    differ = [(a, b) for a, b in zip(ours, theirs) if a != b]
    assert all("_mlo_c" in a for a, _ in differ)  # only where a value is a global (the device, inf, nan)
    assert {type(v) for k, v in scope.items() if k.startswith("_mlo_c")} <= {torch.device, float}
    run = direct_runner(gm, "step_kinds")
    for want, got in zip(gm(*args), run(*args)):
        assert torch.equal(want, got) and want.dtype == got.dtype

    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_method("relu", (x,)))
    odd = torch.fx.GraphModule(torch.nn.Module(), g)
    assert step_source(odd) is None  # call_method: FX's own source, rebound
    t = torch.randn(3)
    assert torch.equal(direct_runner(odd, "odd")(t), torch.relu(t))
