"""The simplify pass: algebraic no-ops removed, values unchanged, aliasing never introduced."""

from __future__ import annotations

import torch

from passes.simplify_no_ops import simplify_no_ops
from programs import mwn_engine, step_graph


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_no_ops_are_removed_and_values_kept():
    def f(w, g, h):
        a = g @ w.t().t().t()  # t(t(w.t())) -> w.t()
        b = a * 1 / 1 + 0 - 0  # four no-ops
        c = torch.zeros_like(h) + h  # zeros + h -> h
        d = (b.view(b.shape) + c.sum()).expand(b.shape)  # same-shape view and expand
        return torch.relu(d) * 2

    w, g, h = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2)
    gm = step_graph(f, w, g, h)
    before = len(gm.graph.nodes)
    gm = simplify_no_ops(gm)
    targets = _targets(gm)
    assert targets.count("aten.t.default") == 1 and "aten.zeros_like.default" not in targets
    assert "aten.div.Tensor" not in targets and "aten.sub.Tensor" not in targets
    assert "aten.view.default" not in targets and "aten.expand.default" not in targets
    assert targets.count("aten.mul.Tensor") == 1  # the * 2 stays
    assert len(gm.graph.nodes) < before
    torch.testing.assert_close(gm(w, g, h), f(w, g, h), rtol=0, atol=0)


def test_kept_where_a_rewrite_would_change_shape_dtype_layout_or_alias():
    def f(s, x, n, y):
        a = s + torch.zeros(3)  # [] + [3]: a broadcast, not a no-op
        b = n * 1.0  # int64 * 1.0 is float: a promotion
        c = x.t() + 0  # rewritten to x.t() only because the result has its strides
        d = y * 1  # d is returned: an output must not become the input y itself
        return a, b, c.contiguous().view(-1), d

    s, x, n, y = torch.randn(()), torch.randn(2, 3), torch.arange(4), torch.randn(4)
    gm = simplify_no_ops(step_graph(f, s, x, n, y))
    targets = _targets(gm)
    assert "aten.zeros.default" in targets and targets.count("aten.add.Tensor") >= 1
    assert targets.count("aten.mul.Tensor") == 2  # n * 1.0 and the returned y * 1
    outs = gm(s, x, n, y)
    for got, want in zip(outs, f(s, x, n, y)):
        assert torch.equal(got, want) and got.dtype == want.dtype
    assert outs[3] is not y


def test_nothing_is_rewritten_onto_a_storage_the_graph_writes():
    def f(x):
        z = torch.zeros_like(x)
        z.add_(1)  # no longer zeros
        a = z + x  # must stay an add
        b = x.clone()
        c = b * 1
        c.mul_(3)  # writes c's storage; c must not become b
        return a, b, c

    x = torch.randn(4)
    gm = simplify_no_ops(step_graph(f, x))
    targets = _targets(gm)
    assert "aten.add.Tensor" in targets and "aten.mul.Tensor" in targets
    for got, want in zip(gm(x), f(x)):
        assert torch.equal(got, want)


def test_step_graphs_shrink_and_train_the_same(float64):
    from passes import GRAPH_PASSES

    runs = {}
    for simplify in (True, False):
        if not simplify:
            GRAPH_PASSES["simplify_no_ops"] = lambda gm: gm
        try:
            engine = mwn_engine("darts", "fx", unroll=2)
            for _ in range(6):
                engine.train_step()
        finally:
            GRAPH_PASSES["simplify_no_ops"] = simplify_no_ops
        runs[simplify] = (
            torch.cat(
                [p.detach().flatten() for prob in engine.program.problems.values() for p in prob.module.parameters()]
            ),
            sum(len(t.gm.graph.nodes) for t in engine.compiler.latest.values()),
        )
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=0, atol=0)
    assert runs[True][1] < runs[False][1] - 20
