"""Trace a repeated call once: the second call's graph nodes are copied from the first's.

A darts hypergradient evaluates the same gradient twice, at ``w + εv`` and ``w − εv``.
make_fx records each evaluation op by op at ~0.5 ms an op (dispatch through the
functorch levels, fake metadata, proxies): in a DARTS supernet step that is several
thousand ops per evaluation, and in a 4-level program whose lower loss runs a 7-step
attack, tens of thousands. The second evaluation is the same function of inputs of the
same shapes, so its nodes are the first's with the inputs swapped: ``call_twice`` copies
them, runs the copies on the real values (plain kernels, no tracing), and hands the
results back as traced tensors. The graph is the one two traces would give, with random
ops copied as new draws (darts draws fresh randomness in each evaluation, as Betty
does), so every backend computes the same numbers.

The copy is exactly as sound as reusing a trace at the next step, which the compiler
already does: a traced region is a function of its inputs' shapes, not of Python state.
It applies only where it can be checked: a real (not symbolic) make_fx trace with only
functionalization above the call, and a region without in-place ops; anywhere else the
second call simply runs (and is traced) again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.fx import Node, Proxy
from torch.fx import graph as fx_graph
from torch.fx.immutable_collections import immutable_dict as fx_immutable_dict
from torch.fx.node import map_arg


def call_twice(
    fn: Callable[..., Any], first: tuple[Any, ...], second: Callable[[], tuple[Any, ...]]
) -> tuple[Any, Any]:
    """Return ``(fn(*first), fn(*second()))``; under a real make_fx trace the second is copied from the first.

    ``second`` makes the second call's arguments after the first call (so the graph
    keeps the order of two plain calls); they must have ``first``'s structure, with
    tensors of the same sizes, strides and dtypes where they differ.
    """
    tracer = _real_tracer()
    if tracer is None:
        return fn(*first), fn(*second())
    graph = tracer.graph
    before = graph._root.prev  # NOTE: make_fx appends every node at the end of its graph
    out1 = fn(*first)
    region: list[Node] = []
    node = before.next
    while node is not graph._root:
        region.append(node)
        node = node.next
    args2 = second()
    leaves1, spec1 = pytree.tree_flatten(first)
    leaves2, spec2 = pytree.tree_flatten(args2)
    if spec1 != spec2 or not _same_layouts(leaves1, leaves2):
        return out1, fn(*args2)
    copied = _copy_region(tracer, region, leaves1, leaves2, out1)
    if copied is None:
        return out1, fn(*args2)
    return out1, copied


def _real_tracer() -> Any:
    """The make_fx tracer of a real-mode trace with functionalization the only transform active, or None."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    mode = get_proxy_mode()
    if mode is None or mode.tracing_mode != "real":
        return None
    levels = retrieve_all_functorch_interpreters()
    if len(levels) != 1 or levels[0].key() != torch._C._functorch.TransformType.Functionalize:
        return None
    return mode.tracer


def _same_layouts(a: list[Any], b: list[Any]) -> bool:
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if (x.shape, x.stride(), x.dtype, x.device) != (y.shape, y.stride(), y.dtype, y.device):
                return False
        elif x != y:
            return False
    return True


def _inner(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor under a functional wrapper (the one make_fx tracks), pending updates applied."""
    if not torch._is_functional_tensor(t):
        return t
    torch._sync(t)
    return torch._C._functorch._unwrap_functional_tensor(t, True)


def _copy_region(tracer: Any, region: list[Node], leaves1: list[Any], leaves2: list[Any], out1: Any) -> Any:
    """Append a copy of ``region`` with ``leaves1``'s nodes replaced by ``leaves2``'s; return its outputs as
    traced tensors shaped like ``out1``, or None (nothing appended) where the copy cannot be made."""
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, get_proxy_slot, track_tensor_tree

    def node_of(t: torch.Tensor) -> Node | None:
        slot = get_proxy_slot(_inner(t), tracer, None)
        return None if slot is None else slot.proxy.node

    if any(n.op not in ("call_function", "get_attr") or _mutates(n) for n in region):
        return None
    remap: dict[Node, Node] = {}
    for a, b in zip(leaves1, leaves2):
        if isinstance(a, torch.Tensor) and a is not b:
            na, nb = node_of(a), node_of(b)
            if na is None or nb is None:
                return None
            remap[na] = nb
    outs, spec = pytree.tree_flatten(out1)
    if not all(isinstance(t, torch.Tensor) for t in outs):
        return None
    out_nodes = [node_of(t) for t in outs]
    if any(n is None for n in out_nodes):
        return None
    inside = set(region)
    external = {a for n in region for a in n.all_input_nodes if a not in inside}
    external |= {n for n in out_nodes if n not in inside}  # type: ignore[misc]
    needed = {remap.get(n, n) for n in external}
    values: dict[Node, Any] = {n: getattr(tracer.root, n.target) for n in needed if n.op == "get_attr"}  # type: ignore[arg-type]
    for tensor, slot in tracer.tensor_tracker.items():
        if slot.proxy.node in needed:
            values.setdefault(slot.proxy.node, tensor)
    if len(values) < len(needed):
        return None  # an input's value is gone: trace the second call instead
    env: dict[Node, Any] = {n: values[remap.get(n, n)] for n in external}
    copies: dict[Node, Node] = {}
    graph = tracer.graph
    with disable_proxy_modes_tracing(), temporarily_clear_interpreter_stack():
        for n in region:
            # NOTE: graph.node_copy, by the tracer's fast path (append_node): the same node and name
            args, kwargs = map_arg((n.args, n.kwargs), lambda x: copies.get(x) or remap.get(x, x))
            copied = copies[n] = append_node(graph, n.op, n.target, args, kwargs, n.name, n.type)
            copied.meta.update(n.meta)  # NOTE: node_copy's shallow copy, without re-filing the node (__setattr__)
            if n.op == "get_attr":
                env[n] = getattr(tracer.root, n.target)  # type: ignore[arg-type]
            else:
                args, kwargs = map_arg((n.args, n.kwargs), env.__getitem__)
                target = n.target
                call = target._op if type(target) is torch._ops.OpOverload else target  # its C++ entry point
                env[n] = call(*args, **kwargs)  # type: ignore[operator]
    level = torch._C._functorch.maybe_current_level()
    assert level is not None  # _real_tracer checked: functionalization is active
    results = []
    for out in out_nodes:
        assert out is not None
        value = env[out]
        track_tensor_tree(value, Proxy(copies.get(out) or remap.get(out, out), tracer), constant=None, tracer=tracer)
        results.append(torch._C._functorch._wrap_functional_tensor(value, level))
    return pytree.tree_unflatten(results, spec)


def _mutates(node: Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable


_NAME_BASES: dict[str, tuple[str, str, int | None]] = {}  # a name candidate -> (candidate, base, its number)


def _name_base(candidate: str) -> tuple[str, str, int | None]:
    """``_Namespace.create_name``'s reading of a candidate: itself (made an identifier), its base, and
    its numeric suffix (``getitem_12`` -> base ``getitem``, 12), cached per candidate."""
    parsed = _NAME_BASES.get(candidate)
    if parsed is None:
        match = fx_graph._name_regex.match(candidate)
        if match is None:  # not an identifier: fx's own path cleans it
            return candidate, "", None
        base, num = match.group(1, 2)
        parsed = (candidate, base, None if num is None else int(num))
        if len(_NAME_BASES) < 65536:  # NOTE: node names as candidates (copies) are mostly unique
            _NAME_BASES[candidate] = parsed
    return parsed


def append_node(
    graph: torch.fx.Graph,
    op: str,
    target: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    candidate: str,
    type_expr: Any = None,
) -> Node:
    """``graph.create_node(op, target, args, kwargs, candidate, type_expr)`` for a tracer's hot path: the same
    node, name and bookkeeping without its per-call argument scan and name parsing.

    A trace records ~100,000 nodes, each through ``create_node``: its scan of the arguments
    for raw SymInts (a real trace has none) and its regular-expression parse of the name
    (repeated candidates: cached here) cost as much as the node. The name is chosen as
    ``_Namespace.create_name`` chooses it; a candidate it would have to clean, or a graph
    with creation hooks, goes through ``create_node`` itself.
    """
    owner = graph.owning_module
    candidate, base, num = _name_base(candidate)
    if not base or (owner is not None and getattr(owner, "_create_node_hooks", None)):
        return graph.create_node(op, target, args, kwargs, candidate, type_expr)
    namespace = graph._graph_namespace
    used = namespace._used_names
    if num is None or candidate in used:
        num = namespace._base_count.get(base, 0)
        if fx_graph._illegal_names.get(candidate) is not None:  # a keyword or builtin: numbered
            num += 1
            candidate = f"{base}_{num}"
    while candidate in used:
        num += 1
        candidate = f"{base}_{num}"
    used.add(candidate)
    namespace._base_count[base] = num
    node = Node(graph, candidate, op, target, args or (), kwargs or fx_immutable_dict(), type_expr)
    namespace._obj_to_name[node] = candidate
    graph._insert(node)
    graph._find_nodes_lookup_table.insert(node)
    graph._len += 1
    return node
