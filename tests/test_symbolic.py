"""The kernels symbolic traces run instead of PyTorch's size-reading C++ (``mlocompile.symbolic``).

Each is checked three ways: under a Hessian-vector product (``torch.func.vjp`` of a
``torch.func.grad``) traced with a symbolic batch, the batch stays a symbol (without the
kernel PyTorch's C++ derivative fixes it); the symbolic graph computes, at other batch
sizes, what PyTorch computes; and at fixed sizes the convolution's kernel records the
very aten ops of ATen's own.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dispatch.python import enable_python_dispatcher
from torch.fx.experimental.proxy_tensor import make_fx

from mlocompile.symbolic import SYMBOLIC_KERNELS, keep_sizes_symbolic
from mlocompile.trace import _trace_symbolic

pytestmark = pytest.mark.usefixtures("float64")


def _hvp(loss):
    """``(x, params, v) -> (∇_params loss, d/dparams <∇_params loss, v>)`` written with torch.func, as the
    hypergradient methods write it (neumann, cg: a vjp of a grad)."""

    def f(x, params, v):
        grads, vjp = torch.func.vjp(torch.func.grad(lambda p: loss(x, p)), params)
        return grads, vjp(v)[0]

    return f


def _symbolic_batch(f, x, params, v):
    """Trace ``f`` with ``x``'s batch symbolic; return the graph and whether the batch stayed a symbol."""
    flat, spec = torch.utils._pytree.tree_flatten((x, params, v))

    def flat_f(*tensors):
        return torch.utils._pytree.tree_leaves(f(*torch.utils._pytree.tree_unflatten(list(tensors), spec)))

    gm, fakes = _trace_symbolic(torch.func.functionalize(flat_f, remove="mutations"), flat, frozenset({(0, 0)}))
    return gm, not fakes[0].shape[0].node.expr.is_number, spec


def _check_symbolic_hvp(loss, make_x, params, *, exact: bool = False):
    f = _hvp(loss)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    gm, symbolic, _ = _symbolic_batch(f, make_x(6), params, v)
    assert symbolic, "the trace fixed the batch size"
    for n in (6, 3, 11):
        x = make_x(n)
        want = torch.utils._pytree.tree_leaves(f(x, params, v))
        got = gm(*torch.utils._pytree.tree_leaves((x, params, v)))
        for a, b in zip(got, want):
            if exact:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    return gm


CONVS = {
    "2d, bias, padding": (F.conv2d, (2, 8, 8), (4, 2, 3, 3), True, {"padding": 1}),
    "2d, stride, dilation": (F.conv2d, (2, 10, 9), (4, 2, 3, 3), False, {"stride": 2, "padding": 1, "dilation": 2}),
    "2d, groups": (F.conv2d, (4, 8, 8), (6, 2, 3, 3), True, {"groups": 2, "padding": 1}),
    "1d": (F.conv1d, (2, 9), (4, 2, 3), True, {"stride": 2}),
    "3d, groups": (F.conv3d, (4, 5, 5, 5), (4, 2, 3, 3, 3), False, {"groups": 2}),
    "transposed": (F.conv_transpose2d, (4, 6, 6), (4, 3, 3, 3), True, {"stride": 2, "padding": 1, "output_padding": 1}),
}


def _conv_case(name):
    conv, x_shape, w_shape, bias, kw = CONVS[name]
    out_channels = w_shape[1] * kw.get("groups", 1) if conv is F.conv_transpose2d else w_shape[0]
    params = {"w": torch.randn(w_shape)}
    if bias:
        params["b"] = torch.randn(out_channels)
    return conv, x_shape, params, kw


@pytest.mark.parametrize("name", CONVS)
def test_a_hessian_vector_product_through_a_convolution_keeps_the_batch_symbolic(name):
    conv, x_shape, params, kw = _conv_case(name)
    # the input's own gradient too (ggI in the double backward), as a convolution after another layer has
    _check_symbolic_hvp(
        lambda x, p: torch.tanh(conv(x * p["w"].sum(), p["w"], p.get("b"), **kw)).pow(2).sum(),
        lambda n: torch.randn(n, *x_shape),
        params,
        exact=True,
    )


@pytest.mark.parametrize("name", CONVS)
@pytest.mark.parametrize("input_grad", [False, True], ids=["weights", "weights and input"])
def test_the_convolution_double_backward_records_atens_own_ops(name, input_grad, monkeypatch):
    op = torch.ops.aten._convolution_double_backward.default
    key, kernel = SYMBOLIC_KERNELS[op]
    calls = []
    monkeypatch.setitem(SYMBOLIC_KERNELS, op, (key, lambda *args: calls.append(1) or kernel(*args)))
    conv, x_shape, params, kw = _conv_case(name)
    w, b = params["w"].requires_grad_(), params.get("b")
    x = torch.randn(5, *x_shape, requires_grad=input_grad)
    wrt = [w, *([b.requires_grad_()] if b is not None else []), *([x] if input_grad else [])]
    vs = [torch.randn_like(t) for t in wrt]

    def double_backward(*vs):
        grads = torch.autograd.grad(torch.tanh(conv(x, w, b, **kw)).pow(2).sum(), wrt, create_graph=True)
        return torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), wrt)

    atens = make_fx(double_backward)(*vs)
    with keep_sizes_symbolic(), enable_python_dispatcher():
        ours = make_fx(double_backward)(*vs)
    assert calls and "convolution_backward" in atens.code  # ours ran, on a double backward
    assert ours.code == atens.code
    for got, want in zip(ours(*vs), atens(*vs)):
        assert torch.equal(got, want)


BATCH_NORMS = {
    "train, affine": (True, True),
    "train, no affine": (True, False),
    "eval": (False, True),
}


@pytest.mark.parametrize("name", BATCH_NORMS)
def test_a_hessian_vector_product_through_batch_norm_keeps_the_batch_symbolic(name):
    train, affine = BATCH_NORMS[name]
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 4, generator=g)}
    if affine:
        params |= {"gamma": torch.rand(3, generator=g) + 0.5, "beta": torch.randn(3, generator=g)}
    if not train:  # (graph inputs, as a step's buffers are; never differentiated)
        params |= {"mean": torch.randn(3, generator=g), "var": torch.rand(3, generator=g) + 0.5}

    def loss(x, p):
        h = (x @ p["w"].T).unsqueeze(-1) * x[:, :1, None]  # (n, 3, 1): channels of a 3-D input
        mean, var = (None, None) if train else (p["mean"].detach(), p["var"].detach())
        out = F.batch_norm(h, mean, var, p.get("gamma"), p.get("beta"), training=train)
        return torch.tanh(out).pow(3).sum()

    _check_symbolic_hvp(loss, lambda n: torch.randn(n, 4, generator=g), params)


def test_a_first_order_batch_norm_backward_stays_atens_kernel():
    # nothing differentiates the backward of a lone torch.func.grad: ATen's fused kernel is kept
    def f(x, params, v):
        return torch.func.grad(lambda p: F.batch_norm(x @ p["w"], None, None, training=True).pow(3).sum())(params)

    params = {"w": torch.randn(4, 3)}
    gm, symbolic, _ = _symbolic_batch(f, torch.randn(6, 4), params, {})
    assert symbolic
    assert "native_batch_norm_backward" in gm.code


def test_a_hessian_vector_product_through_an_embedding_keeps_the_batch_symbolic():
    g = torch.Generator().manual_seed(0)

    def make_tokens(n):
        tokens = torch.randint(0, 7, (n, 4), generator=g)
        tokens[: n // 2, -1] = 2  # padded, and rows that repeat: accumulation order shows
        return tokens

    def loss(tokens, p):
        return torch.tanh(F.embedding(tokens, p["table"], padding_idx=2) @ p["w"]).pow(3).sum()

    params = {"table": torch.randn(7, 5, generator=g), "w": torch.randn(5, 2, generator=g)}
    # the first-order gradient as one accumulating index_put adds the rows as ATen's kernel does: equal bits
    _check_symbolic_hvp(loss, make_tokens, params, exact=True)


def test_the_kernels_are_removed_after_a_trace_even_one_that_fails():
    before = {op: dict(op.py_kernels) for op in SYMBOLIC_KERNELS}
    with pytest.raises(RuntimeError, match="inside"):
        with keep_sizes_symbolic():
            assert all(key in op.py_kernels for op, (key, _) in SYMBOLIC_KERNELS.items())
            raise RuntimeError("inside")
    assert {op: dict(op.py_kernels) for op in SYMBOLIC_KERNELS} == before
