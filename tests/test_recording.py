"""How a real-mode trace records ops (``mlocompile/trace.py``: ``one_meta_mode``'s lean path).

make_fx's own per-op recording (``proxy_call``) is general: decompositions, constant
propagation, symbolic sizes, subclasses. A real trace of a step needs none of that for
almost every op, so ``one_meta_mode`` records plain ops itself and hands everything else
to make_fx. The graph must be the one make_fx records: same nodes, names, arguments,
values' layouts and annotations.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental import proxy_tensor
from torch.fx.experimental.proxy_tensor import make_fx

import mlocompile.trace as trace
from mlocompile.ir import annotate, slim_meta


class _Net(nn.Module):
    """Multi-output ops (batch norm, LSTM, max with indices), dropout, a constant tensor, a view chain."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3, track_running_stats=False)
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        h = F.dropout(h, 0.3, training=True)
        seq = h.flatten(2).transpose(1, 2)  # (batch, 16, 3)
        out, _ = self.lstm(seq)
        top, where = out.max(dim=1)
        scale = torch.tensor([0.5, 2.0], dtype=x.dtype)  # lift_fresh: make_fx's own path
        return (self.head(top) * scale).sum() + where.sum() * 0


def _step(net: _Net) -> Any:
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with annotate(problem="inner", role="forward"):
            return torch.func.functional_call(net, p, (x,))

    def step(x: torch.Tensor, *flat: torch.Tensor) -> list[torch.Tensor]:
        p = dict(zip(params, flat))
        grads = torch.func.grad(loss)(p, x)
        with annotate(problem="inner", role="update"):
            return [v - 0.1 * grads[k] for k, v in p.items()]

    return torch.func.functionalize(step, remove="mutations"), list(params.values())


def _record(lean: bool, calls: list[int]) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    net = _Net().double()
    fn, flat = _step(net)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    original = proxy_tensor.proxy_call

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    proxy_tensor.proxy_call = counted  # what reaches make_fx's own path (its __torch_dispatch__ calls it by this name)
    saved = trace._lean_name
    if not lean:
        trace._lean_name = lambda func: False  # type: ignore[assignment]
    try:
        with torch.fx.traceback.preserve_node_meta(), trace.one_meta_mode():
            gm = make_fx(fn, tracing_mode="real")(x, *flat)
    finally:
        proxy_tensor.proxy_call = original
        trace._lean_name = saved
    slim_meta(gm, adopt=True)
    return gm


def _layout(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return (tuple(v.shape), v.stride(), v.dtype, v.device.type)
    if isinstance(v, (tuple, list)):
        return tuple(_layout(x) for x in v)
    return v


def test_lean_recording_is_make_fx_recording() -> None:
    own, lean = [0], [0]
    plain = _record(lean=False, calls=own)
    fast = _record(lean=True, calls=lean)
    assert str(fast.graph) == str(plain.graph)
    for a, b in zip(plain.graph.nodes, fast.graph.nodes):
        assert _layout(a.meta.get("val")) == _layout(b.meta.get("val")), a.name
        assert {k: v for k, v in a.meta.items() if k.startswith("mlo.")} == {
            k: v for k, v in b.meta.items() if k.startswith("mlo.")
        }, a.name
    roles = {n.meta.get("mlo.role") for n in fast.graph.nodes}
    assert {"forward", "update", "io"} <= roles
    ops = sum(n.op == "call_function" for n in fast.graph.nodes)
    assert own[0] >= 0.5 * ops  # without the lean path every op is make_fx's
    assert 0 < lean[0] < 0.1 * own[0]  # with it, make_fx records the few it must (the lift_fresh constant)
    # and it runs: the same draws, the same values
    torch.manual_seed(0)
    net = _Net().double()
    fn, flat = _step(net)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    torch.manual_seed(3)
    want = fn(x, *flat)
    torch.manual_seed(3)
    got = fast(x, *flat)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_lean_recording_is_undone() -> None:
    from torch._inductor.fx_passes import dedupe_symint_uses

    mode_cls = proxy_tensor.ProxyTorchDispatchMode

    def patched():
        return (
            mode_cls.__dict__["__torch_dispatch__"],
            torch.fx.Graph.eliminate_dead_code,
            dedupe_symint_uses.dedupe_symints,
            proxy_tensor.WeakTensorKeyDictionary,
        )

    before = patched()
    with trace.one_meta_mode():
        assert all(a is not b for a, b in zip(patched(), before))
    assert patched() == before
    try:
        with trace.one_meta_mode():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert patched() == before


def test_make_fx_cleanup_is_skipped_only_where_it_would_delete_nothing() -> None:
    """make_fx's end-of-trace dead-code walk keeps every node of a real trace (its predicate deletes only
    size accessors and SymInt arithmetic), so one_meta_mode skips it: a dead op stays either way (the
    pipeline's own DCE pass removes it); any other dead-code call still runs."""

    def f(x: torch.Tensor) -> torch.Tensor:
        torch.sin(x)  # dead
        return x * 2

    x = torch.randn(3)
    plain = make_fx(f, tracing_mode="real")(x)
    with trace.one_meta_mode():
        fast = make_fx(f, tracing_mode="real")(x)
        g = torch.fx.Graph()
        a = g.placeholder("a")
        g.call_function(torch.ops.aten.sin.default, (a,))
        g.output(a)
        assert g.eliminate_dead_code() and len(g.nodes) == 2  # other callers: fx's walk as ever
    assert str(fast.graph) == str(plain.graph)
    assert any(n.target is torch.ops.aten.sin.default for n in fast.graph.nodes)


def test_real_traces_drop_make_fx_torch_function_layer_and_record_the_same_graph() -> None:
    """trace_step records without make_fx's torch-function metadata layer (``RECORD_TORCH_FN``): it only
    names each node's torch function (meta that slim_meta drops) and rewrites symbolic size() calls."""
    graphs, calls = [], []
    layer = proxy_tensor.TorchFunctionMetadataMode
    original = layer.__torch_function__

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls[-1] += 1
        return original(self, *args, **kwargs)

    layer.__torch_function__ = counted  # type: ignore[method-assign]
    try:
        for keep in (True, False):
            calls.append(0)
            torch.manual_seed(0)
            net = _Net().double()
            fn, flat = _step(net)
            x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
            with torch.fx.traceback.preserve_node_meta(), trace.one_meta_mode():
                gm = make_fx(fn, tracing_mode="real", _disable_torch_fn_metadata_mode=not keep)(x, *flat)
            graphs.append(gm)
    finally:
        layer.__torch_function__ = original  # type: ignore[method-assign]
    assert calls[0] > 50 and calls[1] == 0
    assert str(graphs[0].graph) == str(graphs[1].graph)
    assert trace.RECORD_TORCH_FN is False


def test_append_node_names_and_files_nodes_as_create_node_does() -> None:
    """regions.append_node (the tracer's and the region copy's fast path) gives each candidate the name
    Graph.create_node would, files the node in fx's lookup table and counts it."""
    from mlocompile.regions import append_node

    candidates = ["getitem", "getitem", "convolution", "getitem_1", "getitem_7", "getitem", "sum", "sum", "max_1"]
    candidates += ["convolution_3", "convolution", "a_1_2", "a_1", "a", "_1", "list", "for", "getitem_7", "x-y", "9lives"]
    made = []
    for fast in (False, True):
        g = torch.fx.Graph()
        x = g.placeholder("x")
        for c in candidates:
            if fast:
                append_node(g, "call_function", torch.ops.aten.relu.default, (x,), {}, c)
            else:
                g.create_node("call_function", torch.ops.aten.relu.default, (x,), {}, name=c)
        g.output(x)
        g.lint()
        assert len(g.find_nodes(op="call_function", target=torch.ops.aten.relu.default)) == len(candidates)
        assert len(g.nodes) == len(candidates) + 2
        made.append([n.name for n in g.nodes])
    assert made[0] == made[1]


def test_the_id_indexed_tracker_answers_as_the_stock_one() -> None:
    """trace._TensorTracker (make_fx's tensor -> proxy map during a real trace) gives the stock
    WeakIdKeyDictionary's answers: entries set, replaced by other paths, deleted, and dropped when
    their tensor dies (also when a new tensor takes the dead one's id)."""
    import gc

    from torch.utils.weak import WeakIdKeyDictionary

    fast, stock = trace._TensorTracker(), WeakIdKeyDictionary()
    a, b, c = torch.zeros(1), torch.zeros(1), torch.zeros(1)

    def same(*keys):
        for key in keys:
            assert fast.get(key, "none") == stock.get(key, "none")
            assert (key in fast) == (key in stock)
        assert len(fast) == len(stock) and sorted(fast.values()) == sorted(stock.values())

    for d in (fast, stock):
        d[a] = 1
        d[b] = 2
    same(a, b, c)
    for d in (fast, stock):
        d.update({a: 3})  # replaced without __setitem__
        d.setdefault(c, 4)
        del d[b]
    same(a, b, c)
    for d in (fast, stock):
        d[b] = 5
        d.pop(a)
    same(a, b, c)

    del b
    gc.collect()
    same(a, c)
    reborn = [torch.zeros(1) for _ in range(64)]  # one may take the dead tensor's id
    same(a, c, *reborn)
