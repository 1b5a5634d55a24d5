"""Random programs of pointwise, in-place and view chains: CSE, DCE, simplify and reinplace keep their values.

Each seed builds a small straight-line program (repeated subexpressions on purpose,
in-place writes through views, algebraic no-ops), runs it eagerly, traces it both as
is (in-place ops kept, what make_fx alone gives) and through functionalization (what
the pipeline sees), and checks every pass on both against the eager values. CSE, DCE
and simplify must be safe even on graphs with mutation; reinplace takes functional
graphs, its input contract.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from passes import eliminate_common_subexpressions, eliminate_dead_code, reinplace_pointwise, simplify_no_ops
from programs import step_graph

PURE = [
    lambda a, b: a + b,
    lambda a, b: a * b,
    lambda a, b: torch.sin(a),
    lambda a, b: torch.relu(a - b),
    lambda a, b: torch.sigmoid(a),
    lambda a, b: a * 1,
    lambda a, b: a + 0,
    lambda a, b: a / 1,
    lambda a, b: torch.zeros_like(a) + b,
    lambda a, b: torch.where(a > b, a, b),
    lambda a, b: torch.maximum(a, b),
]
VIEWS = [
    lambda a: a.t(),
    lambda a: a.transpose(0, 1),
    lambda a: a.view(4, 4),
    lambda a: a.reshape(16).view(4, 4),
    lambda a: a.unsqueeze(0).squeeze(0),
    lambda a: a.t().t(),
]
INPLACE = [
    lambda a, b: a.add_(b),
    lambda a, b: a.mul_(2),
    lambda a, b: a.relu_(),
    lambda a, b: a.sigmoid_(),
    lambda a, b: a.masked_fill_(b > 0, 0.5),
    lambda a, b: a[1:].add_(1),  # a write through a view
    lambda a, b: a.t().mul_(b + 1),  # through a transposed view
    lambda a, b: a.copy_(b * 0.5),
]


def make_program(seed: int):
    """A random program over two 4x4 inputs; returns a function of (x, y) giving a list of tensors."""
    rnd = random.Random(seed)
    ops: list[tuple[str, int, int, int]] = []  # (kind, op index, arg a, arg b) over the value list
    n, fresh = 2, set()  # values 0, 1 are the inputs; only fresh (non-input) values are written in place
    for _ in range(rnd.randint(4, 14)):
        kind = rnd.choices(["pure", "view", "inplace", "repeat"], weights=[4, 2, 3, 2])[0]
        a, b = rnd.randrange(n), rnd.randrange(n)
        if kind == "repeat" and ops:
            kind, i, a, b = rnd.choice([op for op in ops if op[0] != "inplace"] or ops)
            if kind == "inplace":
                continue
        elif kind == "repeat":
            continue
        else:
            i = rnd.randrange(len({"pure": PURE, "view": VIEWS, "inplace": INPLACE}[kind]))
        if kind == "inplace":
            if not fresh:
                continue
            a = rnd.choice(sorted(fresh))
        ops.append((kind, i, a, b))
        n += 1
        if kind == "pure":
            fresh.add(n - 1)
        elif kind == "view" and a in fresh:
            fresh.add(n - 1)
    outs = sorted(rnd.sample(range(2, n), k=min(3, n - 2))) if n > 2 else []

    def program(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        vals = [x, y]
        for kind, i, a, b in ops:
            if kind == "pure":
                vals.append(PURE[i](vals[a], vals[b]))
            elif kind == "view":
                vals.append(VIEWS[i](vals[a]))
            else:
                INPLACE[i](vals[a], vals[b])
                vals.append(vals[a])
        return [vals[k] * 1.0 for k in outs] + [vals[-1] + 0.0]  # copies: outputs never alias inputs

    return program


def inputs(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 4, generator=g, dtype=torch.float64) for _ in range(2)]


def check(gm, args, want, what):
    got = gm(*[a.clone() for a in args])
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"{what}: output {i} differs by {(a - b).abs().max().item():.3g}"


SEEDS = range(300)
RAW_PASSES = [eliminate_common_subexpressions, eliminate_dead_code, simplify_no_ops]


@pytest.mark.parametrize("chunk", range(6))
def test_random_programs(chunk):
    for seed in SEEDS[chunk::6]:
        program, args = make_program(seed), inputs(seed)
        want = program(*[a.clone() for a in args])
        raw = step_graph(program, *args)
        pure = step_graph(torch.func.functionalize(program, remove="mutations"), *args)
        check(raw, args, want, f"seed {seed}: traced graph")
        check(pure, args, want, f"seed {seed}: functionalized graph")
        for p in RAW_PASSES:
            check(p(copy.deepcopy(raw)), args, want, f"seed {seed}: {p.__name__} on the graph with mutation")
            check(p(copy.deepcopy(pure)), args, want, f"seed {seed}: {p.__name__} on the functional graph")
        check(reinplace_pointwise(copy.deepcopy(pure)), args, want, f"seed {seed}: reinplace_pointwise")
        piped = pure
        for p in [simplify_no_ops, eliminate_common_subexpressions, eliminate_dead_code, reinplace_pointwise]:
            piped = p(piped)
        check(piped, args, want, f"seed {seed}: simplify, CSE, DCE, reinplace in a row")


def test_cse_does_not_merge_values_written_in_place():
    def f(x):
        return (x * 2).add_(1) + (x * 2).add_(1)

    x = torch.ones(3)
    gm = eliminate_common_subexpressions(step_graph(f, x))
    assert torch.equal(gm(x), torch.full((3,), 6.0))  # before the guard: 8 (one buffer written twice)


def test_cse_does_not_merge_across_a_write_to_an_input():
    def f(x):
        a = x * 2
        b = a + 1
        a.add_(1)
        return b + (a + 1)

    x = torch.ones(3)
    gm = eliminate_common_subexpressions(step_graph(f, x))
    assert torch.equal(gm(x), torch.full((3,), 7.0))


def test_verify_rejects_in_place_ops_and_mutated_inputs_before_the_mutating_passes():
    from mlocompile.errors import IRVerificationError
    from mlocompile.ir import verify

    def writes_a_temporary(x):
        return (x * 2).add_(1)

    def writes_its_input(x):
        x.mul_(2)
        return x + 1

    x = torch.ones(3)
    for fn in (writes_a_temporary, writes_its_input):
        gm = step_graph(fn, x)
        with pytest.raises(IRVerificationError, match="must be functional"):
            verify(gm)
        verify(gm, functional=False)  # after reinplace_pointwise / plan_static_buffers: allowed
    # functionalized, the input write becomes a copy_ into the input: still a mutated input
    with pytest.raises(IRVerificationError, match=r"aten.copy_.default\) writes into its input"):
        verify(step_graph(torch.func.functionalize(writes_its_input, remove="mutations"), x))
    verify(step_graph(torch.func.functionalize(writes_a_temporary, remove="mutations"), x))


def test_cse_keys_tell_list_arguments_apart_by_type_and_sign():
    """Equal list arguments merge; [2, 1] and [2, True], [0.0] and [-0.0], ints and floats never do."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    view = torch.ops.aten.view.default
    add = torch.ops.aten.add.Tensor
    nodes = [g.call_function(view, (x, shape)) for shape in ([2, 1], [2, 1], [2, True], (2, 1))]
    fill = torch.ops.aten.full.default
    nodes += [g.call_function(fill, ([2, 1], value)) for value in (0.0, -0.0, 0.0, 0)]
    total = nodes[0]
    for n in nodes[1:]:
        total = g.call_function(add, (total, n))
    g.output(total)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    for n in gm.graph.nodes:
        n.meta.update({"mlo.problem": "p", "mlo.role": "forward"})
    kept = eliminate_common_subexpressions(gm)
    views = [n.args[1] for n in kept.graph.nodes if n.target is view]
    fills = [n.args[1] for n in kept.graph.nodes if n.target is fill]
    assert views == [[2, 1], [2, True], (2, 1)]
    assert [(type(v), str(v)) for v in fills] == [(float, "0.0"), (float, "-0.0"), (int, "0")]
