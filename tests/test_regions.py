"""regions.call_twice: under a real make_fx trace the second call is copied from the first, with the numbers
(and the random draws) two traced calls give."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from mlocompile.regions import call_twice


def _program(calls: list[int]):
    def loss(lam, w, x):
        calls.append(1)
        h = F.dropout(torch.tanh(x @ w), 0.5)  # a random op inside: each evaluation draws its own mask
        return (h.sum(0) * lam).sum() + (lam**2).sum()

    grad = torch.func.grad(loss)

    def step(lam, w, v, x, copy: bool):
        first, second = (lam, w + 0.1 * v, x), (lam, w - 0.1 * v, x)
        if copy:
            a, b = call_twice(grad, first, lambda: second)
        else:
            a, b = grad(*first), grad(*second)
        return (a - b) / 0.2

    return step


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in [(3,), (4, 3), (4, 3), (5, 4)]]


def _trace(step, copy: bool):
    return make_fx(torch.func.functionalize(lambda *a: step(*a, copy)))(*_inputs())


def test_the_second_call_is_copied_not_traced_and_computes_what_two_traces_do():
    calls: list[int] = []
    step = _program(calls)
    traced = _trace(step, copy=False)
    assert len(calls) == 2
    calls.clear()
    copied = _trace(step, copy=True)
    assert len(calls) == 1  # the user's function ran once: the second evaluation is a copy
    torch.manual_seed(5)
    want = step(*_inputs(), copy=False)  # eager: two real evaluations, two dropout masks
    for gm in (traced, copied):
        torch.manual_seed(5)
        assert torch.equal(gm(*_inputs()), want)
    random_ops = [n for n in copied.graph.nodes if "bernoulli" in str(n.target)]
    assert len(random_ops) == 2  # the copy draws anew


def test_outside_a_trace_both_calls_run():
    calls: list[int] = []
    step = _program(calls)
    torch.manual_seed(1)
    got = step(*_inputs(), copy=True)
    assert len(calls) == 2
    torch.manual_seed(1)
    assert torch.equal(got, step(*_inputs(), copy=False))


def _counted_sin(calls: list[int]):
    def f(x):
        calls.append(1)
        return x.sin() * 2

    return f


def test_a_symbolic_trace_traces_both_calls():
    calls: list[int] = []
    f = _counted_sin(calls)

    def step(x):
        a, b = call_twice(f, (x,), lambda: (x + 1,))
        return a + b

    make_fx(torch.func.functionalize(step), tracing_mode="symbolic")(torch.randn(4, 3, dtype=torch.float64))
    assert len(calls) == 2


def test_inputs_of_another_layout_trace_both_calls():
    calls: list[int] = []
    f = _counted_sin(calls)

    def step(x):
        a, b = call_twice(f, (x,), lambda: (x.t(),))  # the second input is a transposed view: other strides
        return a + b.t()

    x = torch.randn(3, 3, dtype=torch.float64)
    gm = make_fx(torch.func.functionalize(step))(x)
    assert len(calls) == 2
    assert torch.equal(gm(x), step(x))
