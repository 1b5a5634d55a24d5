"""Every registered graph pass preserves values on real step graphs, alone and as the full pipeline.

The corpus (tests/corpus.py: MLP, conv + BatchNorm + dropout + in-place ReLU, LSTM with a
padding index, TransformerEncoder, tied and frozen weights, Adam(amsgrad)) is traced under
darts, neumann, cg and itd; each traced (functional) step graph runs before and after each
pass on the same inputs and generator state, in float64. The passes do not reorder
arithmetic, so outputs must be equal bit for bit; each runs through the pass runner (the IR
verifies after it) and a second run changes nothing (idempotence). A pass added to
``GRAPH_PASSES`` is swept automatically once it has an entry in ``SWEEP_OPTIONS``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import corpus
from mlocompile.analysis import estimate_peak_memory
from mlocompile.ir import format_graph, is_mutating, verify
from mlocompile.step import StepVariant
from mlocompile.trace import flatten_inputs, trace_step
from passes import GRAPH_PASSES, run_graph_pipeline, run_pass

pytestmark = pytest.mark.usefixtures("float64")


def _donated(gm, problem: str) -> frozenset[str]:
    names = [n.meta["mlo.input"] for n in gm.graph.nodes if n.op == "placeholder"]
    return frozenset(n for n in names if n.startswith(f"params.{problem}.") or n.startswith("opt."))


# How each pass is run in the sweep (given the graph and its problem). cast_for_amp rounds to
# bf16 by design (tests/test_amp.py bounds that error); here it runs with an all-fp32 policy,
# which must leave every value as it was.
SWEEP_OPTIONS = {
    "simplify_no_ops": lambda gm, p: {},
    "eliminate_dead_code": lambda gm, p: {},
    "eliminate_common_subexpressions": lambda gm, p: {},
    "cast_for_amp": lambda gm, p: {"policy": lambda node: "fp32"},
    # in bytes (a fraction is of the graph's own peak, so a second run would cut deeper)
    "rematerialize": lambda gm, p: {"memory_budget": 0.9 * estimate_peak_memory(gm)[0]},
    "reinplace_pointwise": lambda gm, p: {"donated": _donated(gm, p)},
    "plan_static_buffers": lambda gm, p: {"device": torch.device("cpu"), "pool": {}, "min_bytes": 64},
    "split_foreach_norms": lambda gm, p: {},
    "opaque_bernoulli": lambda gm, p: {},
    "thread_rng_order": lambda gm, p: {},
}


def test_every_registered_pass_is_swept():
    assert set(SWEEP_OPTIONS) == set(GRAPH_PASSES), "add the new pass to SWEEP_OPTIONS (how the sweep runs it)"


_GRAPHS: dict[tuple[str, str], list] = {}


def traced_steps(model: str, method: str):
    """The functional (pre-pass) step graphs of a corpus case, with their inputs, after one training step."""
    key = (model, method)
    if key not in _GRAPHS:
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            engine, _, _ = corpus.build(model, method, "eager", unroll=2 if method == "itd" else 1)
            torch.manual_seed(3)
            engine.train_step()  # optimizer state exists; an itd window holds one live step
            graphs = []
            for name in ("lower", "upper"):
                flat = flatten_inputs(engine.step_inputs(name, engine.peek_batch(name)))
                variant = StepVariant(name, update=True)
                traced = trace_step(engine.compiler.step_fn(variant, engine.compile_options()), flat, variant.title)
                graphs.append((name, traced.gm, flat.tensors))
            _GRAPHS[key] = graphs
        finally:
            torch.set_default_dtype(old)
    return _GRAPHS[key]


def run(gm, tensors, seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    outs = gm(*[t.clone() for t in tensors])  # clones: passes may write into (donated) inputs
    return [o.clone() if isinstance(o, torch.Tensor) else o for o in outs]


def assert_same(got: list, want: list, what: str) -> None:
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: output {i}"
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num()), (
            f"{what}: output {i} differs by {(a - b).abs().max().item():.3g}"
        )


@pytest.mark.parametrize(("model", "method"), corpus.CASES)
def test_traced_step_graphs_are_functional(model, method):
    for name, gm, _ in traced_steps(model, method):
        verify(gm)  # functional=True: no in-place op, no mutated input
        assert not any(is_mutating(n) for n in gm.graph.nodes), name


@pytest.mark.parametrize("pass_name", sorted(SWEEP_OPTIONS))
@pytest.mark.parametrize(("model", "method"), corpus.CASES)
def test_pass_preserves_values_verifies_and_is_idempotent(model, method, pass_name):
    for name, gm, tensors in traced_steps(model, method):
        want = run(gm, tensors)
        options = SWEEP_OPTIONS[pass_name](gm, name)
        title = f"step_{name}"
        after = run_pass(copy.deepcopy(gm), pass_name, title, [], None, **options)  # verifies the IR after it
        assert_same(run(after, tensors), want, f"{pass_name} on {model}/{method} {title}")
        once = format_graph(after, title)
        twice = run_pass(copy.deepcopy(after), pass_name, title, [], None, **options)
        assert format_graph(twice, title) == once, f"{pass_name} is not idempotent on {model}/{method} {title}"


@pytest.mark.parametrize("budget", [None, 0.7])
@pytest.mark.parametrize(("model", "method"), corpus.CASES)
def test_full_pipeline_preserves_values(model, method, budget):
    for name, gm, tensors in traced_steps(model, method):
        want = run(gm, tensors)
        sizes = {"lower": 1, "upper": corpus.N_SAMPLES}
        after = run_graph_pipeline(
            copy.deepcopy(gm),
            f"step_{name}",
            sizes,
            memory_budget=budget,
            inplace=True,
            donated=_donated(gm, name),
            buffers={},
            device=torch.device("cpu"),
        )
        assert_same(run(after, tensors), want, f"pipeline (budget {budget}) on {model}/{method} step_{name}")
        assert_same(run(after, tensors), want, "a second run of the same compiled graph (planned buffers reused)")
