"""Golden IR per graph pass: a small graph each pass rewrites, before and after, as reviewed text.

Refresh with ``pytest --update-golden`` and review the diff. Every registered pass has a
case here (``test_every_pass_has_a_golden_case``); the sweep over real step graphs is
``test_pass_sweep.py``.
"""

from __future__ import annotations

import pytest
import torch

from mlocompile.functional import tree_norm
from mlocompile.ir import format_graph
from mlocompile.rng import swap_rng_state
from passes import GRAPH_PASSES, precision_policy, run_pass
from programs import step_graph

aten = torch.ops.aten


def _simplify(x, w):
    return ((x @ w.t().t().t()) * 1 + 0).sum()


def _dead_code(x):
    unused = torch.sin(x) * 2  # noqa: F841 - dead on purpose
    return x.exp()


def _cse(x):
    return torch.sin(x) + torch.sin(x)


def _amp(x, w):
    return torch.relu(x @ w).sum()


def _remat(x, w1, w2):
    h = torch.tanh(x @ w1)
    return ((h @ w2).exp() * h.sum()).sum()


def _reinplace(x):
    return ((x * 2).relu() + 1).sum()


def _buffers(x, w):
    return (torch.tanh(x @ w) @ w.t()).sum()


def _foreach_norms(a, b):
    return tree_norm({"a": a, "b": b})


def _rng(state, x):
    swap_rng_state(state, "cpu")
    return torch.bernoulli(torch.full_like(x, 0.5)) * x + torch.rand_like(x)


def _dropout(x):
    return x * torch.empty_like(x).bernoulli_(0.8) / 0.8


def _args(name):
    torch.manual_seed(0)
    big = (torch.randn(64, 64), torch.randn(64, 64))
    return {
        "simplify_no_ops": (_simplify, (torch.randn(3, 4), torch.randn(2, 4)), {}),
        "eliminate_dead_code": (_dead_code, (torch.randn(3),), {}),
        "eliminate_common_subexpressions": (_cse, (torch.randn(3),), {}),
        "cast_for_amp": (_amp, (torch.randn(3, 4), torch.randn(4, 2)), {"policy": precision_policy("bf16")}),
        "rematerialize": (_remat, (torch.randn(64, 64), torch.randn(64, 64), torch.randn(64, 64)), {"memory_budget": 0.7}),
        "reinplace_pointwise": (_reinplace, (torch.randn(8),), {}),
        "plan_static_buffers": (_buffers, big, {"device": torch.device("cpu"), "pool": {}, "min_bytes": 64}),
        "split_foreach_norms": (_foreach_norms, (torch.randn(3, 2), torch.randn(4)), {}),
        "opaque_bernoulli": (torch.func.functionalize(_dropout), (torch.randn(4),), {}),
        "thread_rng_order": (_rng, (torch.get_rng_state(), torch.randn(4)), {}),
    }[name]


def test_every_pass_has_a_golden_case():
    for name in GRAPH_PASSES:
        _args(name)  # KeyError: add a case for the new pass


@pytest.mark.parametrize("name", sorted(GRAPH_PASSES))
def test_pass_golden_ir(name, golden):
    fn, args, options = _args(name)
    gm = step_graph(fn, *args)
    before = format_graph(gm, "before")
    after = format_graph(run_pass(gm, name, "after", [], None, **options), "after")
    assert after != before, f"the {name} case must give the pass something to rewrite"
    golden(f"passes/{name}.txt", f"{before}\n\n{after}\n")
