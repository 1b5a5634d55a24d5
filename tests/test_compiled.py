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


class _NoisyReweighted(mlo.ImplicitProblem):
    def training_step(self, batch):
        x, t = batch
        per = torch.nn.functional.cross_entropy(self.module(x), t, reduction="none").reshape(-1, 1)
        return (torch.sigmoid(self.outer(per.detach())) * per).mean()


def _noisy_mwn():
    """Meta-Weight-Net whose classifier has BatchNorm (running statistics) and dropout (random draws)."""
    from programs import Meta, mwn_data

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3)
    )
    wnet = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    inner = _NoisyReweighted(
        "inner", mlo.Config(type="darts"), net, torch.optim.SGD(net.parameters(), lr=0.1), train_data_loader=mwn_data(0)
    )
    outer = Meta("outer", mlo.Config(), wnet, torch.optim.Adam(wnet.parameters(), lr=1e-2), train_data_loader=mwn_data(1))
    return mlo.Engine(
        [outer, inner], mlo.EngineConfig(compile="fx", progress=False), {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}
    )


def test_the_call_after_a_real_trace_takes_what_the_trace_computed(monkeypatch):
    """A real trace runs the step on the actual inputs: the step's first call takes those results
    (trace.FirstResult) instead of running the compiled graph. Over three steps with dropout and
    BatchNorm, parameters, running statistics and the generator end bit for bit where running every
    step compiled leaves them, with one compiled run fewer per graph; Engine.compile() (a trace with
    no call after it) keeps nothing."""
    import mlocompile.compiler as compiler
    from mlocompile.trace import FirstResult

    runs = []
    direct = compiler.direct_runner

    def counting(gm, title):
        run = direct(gm, title)

        def counted(*tensors):
            runs.append(title)
            return run(*tensors)

        return counted

    monkeypatch.setattr(compiler, "direct_runner", counting)

    def three_steps(compile_first=False):
        runs.clear()
        torch.manual_seed(5)
        engine = _noisy_mwn()
        if compile_first:
            engine.compile()
        for _ in range(3):
            engine.train_step()
        state = [t.clone() for p in engine.program.problems.values() for t in p.module.state_dict().values()]
        return state, torch.get_rng_state(), list(runs)

    taken, taken_rng, taken_runs = three_steps()
    monkeypatch.setattr(FirstResult, "serves", lambda self, tensors: False)
    ran, ran_rng, ran_runs = three_steps()
    assert len(taken) == len(ran) > 8
    assert all(torch.equal(a, b) for a, b in zip(taken, ran))
    assert torch.equal(taken_rng, ran_rng)
    graphs = {"step_inner", "step_outer"}
    assert set(ran_runs) == graphs and len(taken_runs) == len(ran_runs) - len(graphs)
    monkeypatch.undo()
    monkeypatch.setattr(compiler, "direct_runner", counting)
    compiled, compiled_rng, compiled_runs = three_steps(compile_first=True)
    assert all(torch.equal(a, b) for a, b in zip(compiled, ran)) and torch.equal(compiled_rng, ran_rng)
    assert compiled_runs == ran_runs


def test_a_traces_result_serves_only_the_same_inputs_at_the_same_generator_state():
    from mlocompile.trace import trace_step

    x = torch.randn(3)
    flat = flatten_inputs({"x": x})

    def step(inputs):
        return {"y": inputs["x"].sin() + torch.rand(3)}

    before = torch.get_rng_state()
    traced = trace_step(step, flat, "step_demo", keep_result=True)
    assert torch.equal(torch.get_rng_state(), before)  # the trace leaves the generator as it was
    first = traced.first
    assert first is not None and first.serves(flat.tensors)
    torch.rand(1)
    assert not first.serves(flat.tensors)  # the generator moved: the draws would differ
    torch.set_rng_state(before)
    assert not first.serves(flatten_inputs({"x": x.detach()}).tensors)  # another tensor object (a new step's read)
    x.add_(0)
    assert not first.serves(flat.tensors)  # written since the trace
    flat2 = flatten_inputs({"x": torch.randn(3)})
    start = torch.get_rng_state()
    traced = trace_step(step, flat2, "step_demo", keep_result=True)
    want = traced.gm(*flat2.tensors)[0]
    moved = torch.get_rng_state()
    torch.set_rng_state(start)
    got = traced(flat2)["y"]  # served: the generator moves on as running the graph moved it
    assert torch.equal(got, want) and torch.equal(torch.get_rng_state(), moved) and traced.first is None
    torch.set_rng_state(start)
    assert torch.equal(traced(flat2)["y"], want)  # later calls run the graph
    assert trace_step(step, flat2, "step_demo").first is None


def test_a_long_step_runs_in_compiled_pieces_with_the_same_results_and_tracebacks(monkeypatch):
    """backends._chunked_runner: past CHUNK_LINES statements the step source compiles in pieces (Python's
    compiler holds a whole unit's syntax tree: ~450 MB for a 49,000-statement step); the pieces compute
    what the GraphModule computes, bit for bit, and an error still quotes the failing statement."""
    from torch.fx.experimental.proxy_tensor import make_fx

    import mlocompile.backends as backends

    def step(w, x):
        h = x
        for _ in range(6):
            h = torch.tanh(h @ w) * 0.5 + h
        return h.sum(), h.max(dim=1)

    args = (torch.randn(4, 4), torch.randn(3, 4))
    gm = make_fx(step)(*args)
    pieces = []
    chunked = backends._chunked_runner

    def counting(gm, lines, scope, filename):
        pieces.append(len(lines))
        return chunked(gm, lines, scope, filename)

    monkeypatch.setattr(backends, "_chunked_runner", counting)
    monkeypatch.setattr(backends, "CHUNK_LINES", 5)
    run = backends.direct_runner(gm, "step_long")
    assert pieces and pieces[0] > 20  # well past 5 lines: several pieces
    want, got = torch.utils._pytree.tree_leaves(gm(*args)), torch.utils._pytree.tree_leaves(run(*args))
    assert len(want) == len(got) == 3
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    with pytest.raises(RuntimeError) as info:
        run(torch.randn(5, 4), args[1])
    frame = traceback.extract_tb(info.value.__traceback__)[-1]
    assert frame.filename.startswith("<mlocompile step_long>") and "_aten_mm_default(" in frame.line
    src, _ = backends.step_source(gm)
    assert src.splitlines()[frame.lineno - 1].strip() == frame.line.strip()
