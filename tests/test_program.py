"""The dependency graph: paths, plans, and every error of design §5 with its message."""

from __future__ import annotations

import itertools
import random

import networkx as nx
import pytest
import torch
from torch import nn

import mlocompile as mlo
from mlocompile.program import build_program
from passes import enumerate_paths, order_vjps, run_program_passes
from programs import Meta, Reweighted, chain_engine, mwn_data, mwn_engine


class Plain(mlo.ImplicitProblem):
    def training_step(self, batch):
        return self.module(batch[0]).pow(2).mean()


def make(name: str, cls=Plain, optimizer=None, config=None):
    mod = nn.Linear(2, 1)
    opt = optimizer(mod.parameters()) if optimizer else torch.optim.SGD(mod.parameters(), lr=0.1)
    return cls(name, config, mod, opt, train_data_loader=[(torch.randn(4, 2), torch.randn(4, 1))])


def test_bilevel_paths_and_plan():
    engine = mwn_engine()
    assert [str(p) for p in engine.program.paths["outer"]] == ["outer -u2l-> inner"]
    assert [(op.source, op.curr, op.prev) for op in engine.program.plans["outer"]] == [(None, "inner", "outer")]
    assert engine.program.level("inner") == 0 and engine.program.level("outer") == 1
    assert engine.program.leaves == ["inner"]


def test_shared_suffixes_are_planned_once():
    a, b, m, top = (make(n) for n in ("a", "b", "m", "top"))
    deps = {"u2l": {top: [a, b]}, "l2u": {a: [m], b: [m], m: [top]}}
    program = run_program_passes(build_program([a, b, m, top], deps))
    assert [str(p) for p in program.paths["top"]] == ["top -u2l-> a -l2u-> m", "top -u2l-> b -l2u-> m"]
    ops = [(op.id, op.source, op.curr, op.prev) for op in program.plans["top"]]
    # the vector dC/dm enters both chains; each chain's first product differs in its "prev"
    assert ops == [(0, None, "m", "a"), (1, 0, "a", "top"), (2, None, "m", "b"), (3, 2, "b", "top")]
    assert program.path_ends["top"] == [1, 3]


def test_shared_products_are_reused():
    low, mid, top = make("low"), make("mid"), make("top")
    # two u2l edges from top whose paths share the product through 'mid'
    deps = {"u2l": {top: [mid, low], mid: [low]}, "l2u": {low: [mid], mid: [top]}}
    program = run_program_passes(build_program([low, mid, top], deps))
    assert [str(p) for p in program.paths["top"]] == ["top -u2l-> mid", "top -u2l-> low -l2u-> mid"]
    assert len(program.plans["top"]) == 3  # mid->top, mid->low, low->top


def _brute_force_paths(edges_u2l, edges_l2u):
    g = nx.DiGraph(edges_l2u)
    out = set()
    for upper, lower in edges_u2l:
        if lower in g and upper in g:
            for path in nx.all_simple_paths(g, lower, upper):
                out.add((upper, tuple(path[:-1])))
    return out


@pytest.mark.parametrize("seed", range(8))
def test_paths_match_brute_force_on_random_dags(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 6)
    names = [f"q{i}" for i in range(n)]
    l2u = [(names[i], names[j]) for i, j in itertools.combinations(range(n), 2) if rng.random() < 0.5]
    reach = nx.DiGraph(l2u)
    reach.add_nodes_from(names)
    # a u2l edge needs an l2u path back, so only draw u2l edges where one exists
    u2l = [
        (names[j], names[i])
        for i, j in itertools.combinations(range(n), 2)
        if nx.has_path(reach, names[i], names[j]) and rng.random() < 0.6
    ]
    probs = {nm: make(nm) for nm in names}
    deps = {"u2l": {}, "l2u": {}}
    for s, d in l2u:
        deps["l2u"].setdefault(probs[s], []).append(probs[d])
    for s, d in u2l:
        deps["u2l"].setdefault(probs[s], []).append(probs[d])
    program = order_vjps(enumerate_paths(build_program(list(probs.values()), deps)))
    found = {(p.upper, p.chain) for ps in program.paths.values() for p in ps}
    assert found == _brute_force_paths(u2l, l2u)
    # every path's chain evaluates through the plan to exactly one end op whose prev is the upper
    for upper, ends in program.path_ends.items():
        assert all(program.plans[upper][e].prev == upper for e in ends)


# --- errors, each raised before any training step, naming the problems and the fix -------------
def test_cycle_is_an_error():
    a, b = make("a"), make("b")
    with pytest.raises(mlo.ProgramError, match=r"cycle a -> b -> a"):
        mlo.Engine([a, b], dependencies={"u2l": {}, "l2u": {a: [b], b: [a]}})


def test_u2l_without_path_back():
    a, b = make("a"), make("b")
    with pytest.raises(
        mlo.ProgramError, match=r"u2l edge b -> a has no l2u path back from a to b.*\"l2u\": \{a: \[b\]\}"
    ):
        mlo.Engine([a, b], dependencies={"u2l": {b: [a]}, "l2u": {}})


def test_duplicate_and_unknown_names():
    with pytest.raises(mlo.ProgramError, match="two problems are named 'a'"):
        mlo.Engine([make("a"), make("a")], dependencies={"u2l": {}, "l2u": {}})
    a, stranger = make("a"), make("stranger")
    with pytest.raises(mlo.ProgramError, match="not one of the engine's problems"):
        mlo.Engine([a], dependencies={"u2l": {}, "l2u": {a: [stranger]}})
    with pytest.raises(mlo.ProgramError, match="unknown keys"):
        mlo.Engine([a], dependencies={"u2l": {}, "lower_to_upper": {}})


def test_levels_that_contradict_edges():
    a, b = make("a"), make("b")
    with pytest.raises(mlo.ProgramError, match="declared levels are 1 and 0"):
        build_program([a, b], {"l2u": {a: [b]}}, levels={"a": 1, "b": 0})


class VectorLoss(mlo.ImplicitProblem):
    def training_step(self, batch):
        return self.module(batch[0]) - self.outer(batch[0])


def test_non_scalar_loss_is_reported_before_any_step():
    engine = mwn_engine()
    inner = engine.program.problems["inner"]
    inner.training_step = lambda batch: (inner.module(batch[0]) ** 2).sum(1)  # type: ignore[method-assign]
    before = [p.detach().clone() for p in inner.module.parameters()]
    with pytest.raises(mlo.TraceError, match=r"problem 'inner' returned a loss of shape \(16,\).*\.mean\(\)"):
        engine.train_step()
    assert all(torch.equal(b, p) for b, p in zip(before, inner.module.parameters()))


class IgnoresOuter(mlo.ImplicitProblem):
    def training_step(self, batch):
        x, t = batch
        return torch.nn.functional.cross_entropy(self.module(x), t)


def test_loss_that_never_uses_a_declared_dependency():
    net, wnet = nn.Linear(6, 3), nn.Linear(1, 1)
    inner = IgnoresOuter("inner", None, net, torch.optim.SGD(net.parameters(), lr=0.1), train_data_loader=mwn_data())
    outer = Meta("outer", None, wnet, torch.optim.SGD(wnet.parameters(), lr=0.1), train_data_loader=mwn_data())
    engine = mlo.Engine([outer, inner], dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    with pytest.raises(
        mlo.ProgramError, match=r"u2l edge outer -> inner: the training_step of 'inner' never uses 'outer'"
    ):
        engine.train_step()


def test_unsupported_optimizer_names_the_supported_set():
    with pytest.raises(mlo.ProgramError, match=r"Rprop cannot be lowered.*SGD.*Adam.*AdamW.*RMSprop.*RAdam"):
        mlo.Engine([make("a", optimizer=lambda p: torch.optim.Rprop(p))], dependencies={"u2l": {}, "l2u": {}})


def test_bad_config_values():
    with pytest.raises(mlo.ProgramError, match=r"type='newton' is not a hypergradient method"):
        mlo.Engine([make("a", config=mlo.Config(type="newton"))], dependencies={"u2l": {}, "l2u": {}})
    with pytest.raises(mlo.ProgramError, match=r"compile='jit'"):
        mlo.EngineConfig(compile="jit").validate()


def test_all_errors_share_the_base_class():
    for cls in (mlo.ProgramError, mlo.TraceError, mlo.PassError, mlo.IRVerificationError, mlo.NonFiniteError):
        assert issubclass(cls, mlo.MLOError)


def test_problem_names_become_attributes():
    engine = chain_engine(levels=3)
    p0 = engine.program.problems["p0"]
    assert p0.p1 is engine.program.problems["p1"] and engine.p2 is engine.program.problems["p2"]
    assert isinstance(Reweighted, type)


def _mwn_pair(shared: bool = False, inner_params=None):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    wnet = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
    outer_module = net if shared else wnet
    params = net.parameters() if inner_params is None else inner_params(net, wnet)
    inner = Reweighted("inner", mlo.Config(), net, torch.optim.SGD(params, lr=0.1), train_data_loader=mwn_data(0))
    outer = Meta(
        "outer", mlo.Config(), outer_module, torch.optim.Adam(outer_module.parameters()), train_data_loader=mwn_data(1)
    )
    return lambda: mlo.Engine([outer, inner], dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})


@pytest.mark.parametrize(
    "case,match",
    [
        ({"shared": True}, r"problems 'outer' and 'inner' share a parameter \(outer.0.weight is inner.0.weight\)"),
        (
            {"inner_params": lambda net, wnet: [*net.parameters(), *wnet.parameters()]},
            r"problem 'inner': its optimizer holds outer.0.weight, a parameter of problem 'outer'",
        ),
        (
            {"inner_params": lambda net, wnet: list(net.parameters())[:2]},
            r"problem 'inner': optimizer SGD .* named but not in the optimizer: '2.weight', '2.bias'",
        ),
    ],
)
def test_parameters_owned_by_two_problems_or_missing_from_an_optimizer_are_rejected(case, match):
    """Never a raw torch error, never a silently untrained or doubly trained parameter."""
    with pytest.raises(mlo.ProgramError, match=match):
        _mwn_pair(**case)()


def test_a_parameter_replaced_after_construction_is_named():
    engine = _mwn_pair()()
    engine.train_step()
    engine.inner.module[0].weight = nn.Parameter(torch.zeros(8, 6))
    with pytest.raises(mlo.ProgramError, match=r"problem 'inner': trainable parameter\(s\) \['0.weight'\] were replaced"):
        engine.train_step()
