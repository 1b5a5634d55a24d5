"""Dynamic shapes: a step meets many batch sizes (or sequence lengths) and traces a bounded number of times.

After the second distinct size of a dimension the compiler traces the step with that
dimension symbolic; that graph serves every later size its guard accepts. Sizes 0 and 1
are specialized by make_fx and get a graph of their own. Every case is checked against
the eager backend on the same program, in float64.
"""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import corpus
import mlocompile.compiler as compiler
import programs

SIZES = [16, 16, *range(2, 16), *range(17, 40), 1]  # 39 distinct sizes ≥ 2, then a batch of one


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _batches(seed: int, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]


def _mwn(method: str, backend: str, inner_sizes: list[int], outer_sizes: list[int], cls=None):
    engine = programs.mwn_engine(method, backend, progress=False)
    problems = engine.program.problems
    problems["inner"].train_data_loader = _batches(0, inner_sizes)
    problems["outer"].train_data_loader = _batches(1, outer_sizes)
    if cls is not None:
        problems["inner"].__class__ = cls
    return engine


def _params(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for prob in engine.program.problems.values() for p in prob.module.parameters()]


def _traces(engine) -> Counter:
    return Counter(key[0].title for key in engine.compiler._traced)


def _run(engine, steps: int) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(steps):
            engine.train_step()
    return record


def _max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))


@pytest.mark.parametrize("method", ["darts", "neumann", "cg", "itd"])
def test_forty_batch_sizes_trace_each_step_at_most_three_times(method):
    outer = [8, 12, 5, 9, 3] * 8  # the upper's batches vary too, independently
    results = {}
    for backend in ("eager", "fx"):
        torch.manual_seed(0)
        engine = _mwn(method, backend, SIZES, outer)
        record = _run(engine, len(SIZES))
        results[backend] = _params(engine)
    assert not [r for r in record if "traced" in str(r.message)], "no retrace warning"
    traces = _traces(engine)
    # a fixed-size trace, a symbolic one, and one for the batch of one
    assert traces == {"step_inner": 3, "step_outer": 3}, traces
    symbolic = [g for graphs in engine.compiler._symbolic.values() for g in graphs]
    assert {g.title for g in symbolic} == {"step_inner", "step_outer"}
    assert _max_rel(results["fx"], results["eager"]) <= 1e-12


def test_a_symbolic_graph_is_not_reused_where_its_guard_fails():
    # the loss takes another path above 8 samples: the symbolic graph traced at one size
    # guards on the branch, and sizes on the other side trace (once) again
    class Branchy(programs.Reweighted):
        def training_step(self, batch):
            x, t = batch
            per = F.cross_entropy(self.module(x), t, reduction="none").reshape(-1, 1)
            w = torch.sigmoid(self.outer(per.detach()))
            return (w * per).mean() if x.shape[0] > 8 else (w * per).sum() / 8

    sizes = [4, 5, 12, 6, 13, 7, 14, 3, 15, 2, 10]
    results = {}
    for backend in ("eager", "fx"):
        torch.manual_seed(0)
        engine = _mwn("darts", backend, sizes, [6] * 20, cls=Branchy)
        _run(engine, len(sizes))
        results[backend] = _params(engine)
    assert _max_rel(results["fx"], results["eager"]) <= 1e-12
    assert _traces(engine)["step_inner"] <= 4  # fixed, symbolic ≤ 8, and symbolic > 8 (if not served first)


def test_code_that_fixes_the_size_traces_three_graphs_then_runs_eagerly_and_warns_once():
    # int(x.shape[0]) specializes the symbol: the symbolic graph serves one size only. Each new size
    # would trace again, so after SIZE_FIXED_LIMIT graphs the other sizes run the same step eagerly
    # (results stay exact) and the compiler says so once per step
    class Fixed(programs.Reweighted):
        def training_step(self, batch):
            x, t = batch
            per = F.cross_entropy(self.module(x), t, reduction="none").reshape(-1, 1)
            return (torch.sigmoid(self.outer(per.detach())) * per).sum() / int(x.shape[0])

    sizes = [*range(2, 14), 3, 2]
    results = {}
    for backend in ("eager", "fx"):
        torch.manual_seed(0)
        engine = _mwn("darts", backend, sizes, [6] * 20, cls=Fixed)
        record = _run(engine, len(sizes))
        results[backend] = _params(engine)
    assert _max_rel(results["fx"], results["eager"]) <= 1e-12
    eager = [str(r.message) for r in record if "run the same step eagerly" in str(r.message)]
    # the upper's step runs the lower's loss on its last batch: it is fixed there too
    assert sorted(m.split(":")[0] for m in eager) == ["step_inner", "step_outer"], eager
    assert "fixes batch.0 dim 0" in eager[0] + eager[1]
    assert not [r for r in record if "different input shapes" in str(r.message)]
    traces = _traces(engine)
    assert traces["step_inner"] == 3 and traces["step_outer"] <= 3, traces  # fixed (2), symbolic (3), fixed (4)
    assert sum(len(g) for g in engine.compiler._symbolic.values()) <= 2  # tried once per step, then not again
    served = [s.title for s in engine.compiler._served.values() if isinstance(s, compiler.EagerStep)]
    assert served.count("step_inner") == len(set(sizes)) - 3  # 5..13 run eagerly; 2, 3 and 4 their graphs


def _corpus_batches(model: corpus.Model, shapes: list[tuple[int, int]], seed: int, with_idx: bool):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, length in shapes:
        if model.inputs == "tokens":
            x = torch.randint(1, 10, (n, length), generator=g)
            x[: n // 2, -1:] = 0
        elif model.inputs == "sequence":
            x = torch.randn(n, length, 4, generator=g)
        elif model.inputs == "image":
            x = torch.randn(n, 1, 8, 8, generator=g)
        else:
            x = torch.randn(n, 6, generator=g)
        t = torch.randint(0, 3, (n,), generator=g)
        out.append((x, t, torch.randint(0, corpus.N_SAMPLES, (n,), generator=g)) if with_idx else (x, t))
    return out


# NOTE: the LSTM's length stays fixed: at::lstm loops over time steps (it unbinds the input into one
# tensor per step), so a symbolic trace fixes the length; beyond 3 graphs other lengths run eagerly
# (README, "Sizes may vary"; test_lstm_over_many_sequence_lengths_... below)
@pytest.mark.parametrize(
    ("name", "vary_length", "method"),
    [
        *((name, False, method) for name in ("conv_bn_dropout", "resnet") for method in corpus.METHODS),
        *(("lstm", False, method) for method in corpus.METHODS),
        *(("transformer", True, method) for method in corpus.METHODS),
    ],
)
def test_real_models_with_varying_batches_and_lengths(name, vary_length, method):
    model = corpus.MODELS[name]
    lengths = [5, 5, 4, 7, 3, 6, 5] if vary_length else [5] * 7
    shapes = list(zip([8, 8, 6, 5, 7, 4, 3], lengths))
    results = {}
    for backend in ("eager", "fx"):
        engine, net, lam = corpus.build(name, method, backend)
        problems = engine.program.problems
        problems["lower"].train_data_loader = _corpus_batches(model, shapes, 0, with_idx=True)
        problems["upper"].train_data_loader = _corpus_batches(model, shapes[::-1], 1, with_idx=False)
        torch.manual_seed(3)
        _run(engine, len(shapes))
        results[backend] = [p.detach().clone() for p in [*net.parameters(), *lam.parameters()]]
    assert _max_rel(results["fx"], results["eager"]) <= 1e-10
    assert max(_traces(engine).values()) <= 3, _traces(engine)


def test_lstm_over_many_sequence_lengths_traces_at_most_three_graphs_then_runs_eagerly():
    # at::lstm steps through time one tensor per step, so the length is a trip count: each length
    # would trace again. Three graphs are traced (the batch stays symbolic in them); other lengths
    # run eagerly, with the same results, and each step warns once naming the length dimension
    lengths = [5, 5, 4, 7, 3, 6, 8, 9, 10, 4, 5, 11]
    shapes = list(zip([8, 8, 6, 5, 7, 4, 3, 6, 5, 7, 8, 4], lengths))
    results = {}
    for backend in ("eager", "fx"):
        engine, net, lam = corpus.build("lstm", "darts", backend)
        problems = engine.program.problems
        problems["lower"].train_data_loader = _corpus_batches(corpus.MODELS["lstm"], shapes, 0, with_idx=True)
        problems["upper"].train_data_loader = _corpus_batches(corpus.MODELS["lstm"], shapes[::-1], 1, with_idx=False)
        torch.manual_seed(3)
        record = _run(engine, len(shapes))
        results[backend] = [p.detach().clone() for p in [*net.parameters(), *lam.parameters()]]
    assert _max_rel(results["fx"], results["eager"]) <= 1e-10
    assert max(_traces(engine).values()) <= 3, _traces(engine)
    eager = [str(r.message) for r in record if "run the same step eagerly" in str(r.message)]
    assert {m.split(":")[0] for m in eager} == {"step_lower", "step_upper"} and len(eager) == 2, eager
    assert all("dim 1" in m for m in eager)


@pytest.mark.slow
def test_inductor_compiles_one_symbolic_graph():
    sizes = [16, 16, 5, 9, 12, 7, 3, 1]
    results = {}
    for backend in ("eager", "inductor"):
        torch.manual_seed(0)
        engine = _mwn("darts", backend, sizes, [8, 12, 5, 9] * 2)
        record = _run(engine, len(sizes))
        results[backend] = _params(engine)
    assert not [r for r in record if "inductor could not compile" in str(r.message)]
    assert _traces(engine) == {"step_inner": 3, "step_outer": 3}
    assert _max_rel(results["inductor"], results["eager"]) <= 1e-10
