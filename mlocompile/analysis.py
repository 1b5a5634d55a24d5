"""Graph analyses the passes and the cost model share (torch.fx only): aliasing, writes, liveness, sizes.

Also the meta-tensor helpers passes use to keep ``val`` meta (shape, strides, dtype) right.

Analyses never mutate the graph (``find_*``). They read op schemas: a return with an
alias annotation shares storage with the argument of the same alias set (views,
in-place ops); a write annotation marks an argument the op overwrites.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten

# Ops that return a view of their input but whose schema carries no alias annotation.
UNANNOTATED_VIEWS: frozenset[Any] = frozenset({aten._unsafe_view.default, aten.lift_fresh.default})


# Ops that write arguments their schema does not mark as written: (argument positions, the
# ``training`` flag's position). Batch norm updates its running statistics in place in train mode.
HIDDEN_WRITES: dict[Any, tuple[tuple[int, ...], int]] = {
    aten.native_batch_norm.default: ((3, 4), 5),
    aten.cudnn_batch_norm.default: ((3, 4), 5),
    aten.miopen_batch_norm.default: ((3, 4), 5),
}


_HIDDEN_WRITERS = frozenset(map(id, HIDDEN_WRITES))

# NOTE: per operator overload, the (position, name) of each argument its schema marks written; the
# analyses below run over every node of 100,000-node steps several times, and a schema walk is slow.
# These caches are keyed by id(): an OpOverload compares by identity but hashes through a Python
# __hash__, a frame per lookup; each entry holds its target, so no other object can take its id.
_WRITTEN_SLOTS: dict[int, tuple[Any, tuple[tuple[int, str], ...]]] = {}


def written_slots(target: torch._ops.OpOverload) -> tuple[tuple[int, str], ...]:
    """The (position, name) of each argument ``target``'s schema marks written (none: the schema is not
    mutable)."""
    entry = _WRITTEN_SLOTS.get(id(target))
    if entry is not None and entry[0] is target:
        return entry[1]
    slots = tuple(
        (i, arg.name)
        for i, arg in enumerate(target._schema.arguments)
        if arg.alias_info is not None and arg.alias_info.is_write
    )
    _WRITTEN_SLOTS[id(target)] = (target, slots)
    return slots


def writes_an_argument(node: Node) -> bool:
    """``bool(find_written_args(node))`` or a mutable schema (a write into a non-node argument counts):
    whether ``node`` may write into anything it is given. Cheap for the common op that writes nothing."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if written_slots(target):
        return True
    return id(target) in _HIDDEN_WRITERS and bool(find_written_args(node))


def find_written_args(node: Node) -> list[Node]:
    """The argument nodes ``node`` writes into: schema write annotations plus ``HIDDEN_WRITES``."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return []
    written = []
    for i, name in written_slots(target):
        value = node.args[i] if i < len(node.args) else node.kwargs.get(name)
        if isinstance(value, Node):
            written.append(value)
    if id(target) in _HIDDEN_WRITERS:
        positions, training = HIDDEN_WRITES[target]
        if len(node.args) > training and node.args[training]:
            written += [a for i in positions if isinstance(a := node.args[i], Node)]
    return written


_IMPURE: dict[int, tuple[Any, bool]] = {}  # by id(), as _WRITTEN_SLOTS


def is_impure(node: Node) -> bool:
    """``node.is_impure()`` (placeholders, outputs, mutating, random and effectful ops), computed once
    per call target: for an operator overload or a plain function it reads only the schema, tags,
    registered effects and torch.fx's list of side-effectful functions."""
    target = node.target
    # NOTE: a higher-order op's purity depends on its arguments (auto_functionalized's op)
    if node.op != "call_function" or isinstance(target, torch._ops.HigherOrderOperator):
        return node.is_impure()
    entry = _IMPURE.get(id(target))
    if entry is not None and entry[0] is target:
        return entry[1]
    impure = node.is_impure()
    _IMPURE[id(target)] = (target, impure)
    return impure


_ALIAS_PLANS: dict[int, tuple[Any, tuple[tuple[int, str], ...] | None]] = {}  # by id(), as _WRITTEN_SLOTS


def alias_plan(target: torch._ops.OpOverload) -> tuple[tuple[int, str], ...] | None:
    """None if ``target``'s result shares no input's storage; else the (position, name) of the arguments
    it may share, in schema order (empty: it shares its first input's, e.g. ``UNANNOTATED_VIEWS``)."""
    entry = _ALIAS_PLANS.get(id(target))
    if entry is not None and entry[0] is target:
        return entry[1]
    plan: tuple[tuple[int, str], ...] | None = ()
    if target not in UNANNOTATED_VIEWS:
        infos = [r.alias_info for r in target._schema.returns if r.alias_info is not None]
        if not infos:
            plan = None
        else:
            # NOTE: list returns (split, unbind: Tensor(a)[]) expose empty alias sets to Python
            sets = {s for info in infos for s in info.before_set}
            plan = tuple(
                (i, arg.name)
                for i, arg in enumerate(target._schema.arguments)
                if arg.alias_info is not None and (not sets or sets & set(arg.alias_info.before_set))
            )
    _ALIAS_PLANS[id(target)] = (target, plan)
    return plan


def aliased_input(node: Node) -> Node | None:
    """Return the input node whose storage ``node``'s output shares (views, in-place ops), if any."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return None
    plan = alias_plan(target)
    if plan is None:
        return None
    for i, name in plan:
        value = node.args[i] if i < len(node.args) else node.kwargs.get(name)
        if isinstance(value, Node):
            return value
    return next((x for x in node.all_input_nodes), None)


def find_storage_base(node: Node) -> Node:
    """Walk back through views (and in-place ops) to the node that owns ``node``'s storage."""
    while node.op == "call_function" and (source := aliased_input(node)) is not None:
        node = source
    return node


def find_mutated_storages(gm: GraphModule) -> set[Node]:
    """The storage owners (``find_storage_base``) some op of the graph writes, through any view of them."""
    return {find_storage_base(value) for node in gm.graph.nodes for value in find_written_args(node)}


def estimate_peak_memory(gm: GraphModule) -> tuple[int, str]:
    """Return the peak bytes of live tensors over ``gm``'s execution and the node where it occurs.

    Inputs (and constants) are held by the caller for the whole step; a computed
    tensor lives from its producing node to its last user (the graph's outputs to
    the end). Views and in-place ops allocate nothing: they alias their input.
    """
    nodes = list(gm.graph.nodes)
    end = len(nodes) - 1
    size: list[int] = []
    span: list[list[int]] = []  # [born, last use] per buffer
    held: dict[Node, list[int]] = {}  # the buffers a node's value lives in
    items: dict[Node, list[int]] = {}  # per tuple element, for getitem

    def alloc(val: Any, born: int, last: int) -> int:
        size.append(nbytes(val))
        span.append([born, last])
        return len(size) - 1

    for i, node in enumerate(nodes):
        val = node.meta.get("val")
        if node.op in ("placeholder", "get_attr"):
            held[node] = [alloc(val, 0, end)]
        elif node.op == "call_function" and node.target is operator.getitem:
            parent, index = node.args
            assert isinstance(parent, Node)
            held[node] = [items[parent][index]] if parent in items else held[parent]  # type: ignore[index]
        elif node.op == "call_function":
            source = aliased_input(node)
            if source is not None:
                held[node] = held.get(source, [])
            elif isinstance(val, (tuple, list)):
                items[node] = [alloc(v, i, i) for v in val]
                held[node] = items[node]
            else:
                held[node] = [alloc(val, i, i)]
        for user_of in node.all_input_nodes:
            for buf in held.get(user_of, []):
                span[buf][1] = max(span[buf][1], end if node.op == "output" else i)
    delta = [0] * (len(nodes) + 1)
    for n_bytes, (born, last) in zip(size, span):
        delta[born] += n_bytes
        delta[last + 1] -= n_bytes
    live, peak, at = 0, 0, 0
    for i in range(len(nodes)):
        live += delta[i]
        if live > peak:
            peak, at = live, i
    return peak, nodes[at].name if nodes else ""


def nbytes(val: Any) -> int:
    """Bytes of a tensor, or of the tensors in a tuple or list (0 for anything else)."""
    if isinstance(val, torch.Tensor):
        return int(val.numel()) * val.element_size()
    if isinstance(val, (tuple, list)):
        return sum(nbytes(v) for v in val)
    return 0


def format_bytes(n: int) -> str:
    """``n`` bytes for people: ``"1.5 MiB"``, ``"12 B"``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def node_nbytes(node: Node) -> int:
    """Bytes of a node's tensor value (0 for tuples and non-tensor values)."""
    val = node.meta.get("val")
    return int(val.numel()) * val.element_size() if isinstance(val, torch.Tensor) else 0


def meta_tensor(t: torch.Tensor) -> torch.Tensor:
    """A ``meta``-device tensor with ``t``'s shape, strides and dtype (what ``val`` meta needs).

    Symbolic sizes (a graph traced with symbolic batch dimensions) take the traced
    example's values.
    """
    shape = tuple(size_hint(s) for s in t.shape)
    stride = tuple(size_hint(s) for s in t.stride())
    return torch.empty_strided(shape, stride, dtype=t.dtype, device="meta")


def size_hint(x: Any) -> Any:
    """A ``SymInt``'s value in the traced example (what it was when traced); anything else as it is."""
    if isinstance(x, torch.SymInt):
        return x.node.hint
    return x


def symbolic_layout(val: Any) -> Any:
    """A traced value's layout with its symbolic sizes as text: ``(("s0", "6"), ("6", "1"), "0")`` for a
    tensor, the expression for a size, None otherwise. Equal layouts are equal for every accepted size."""
    if isinstance(val, torch.Tensor):
        return (tuple(map(str, val.shape)), tuple(map(str, val.stride())), str(val.storage_offset()))
    if isinstance(val, torch.SymInt):
        return str(val)
    if isinstance(val, (tuple, list)):
        return tuple(symbolic_layout(v) for v in val)
    return None


def same_symbolic_layout(a: Node, b: Node) -> bool:
    """Whether two nodes' values have the same layout for every size their graph accepts.

    In a graph traced at fixed sizes, equal ``val`` layouts suffice (True here); in one
    traced with symbolic sizes both nodes must carry equal ``mlo.sym`` layouts (a node
    a pass created without one is not known to match).
    """
    gm = a.graph.owning_module
    if gm is None or not gm.meta.get("mlo.dynamic"):
        return True
    sa, sb = a.meta.get("mlo.sym"), b.meta.get("mlo.sym")
    return sa is not None and sa == sb


def meta_like(val: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous ``meta``-device tensor with ``val``'s shape and ``dtype`` (a cast's result)."""
    return torch.empty(val.shape, dtype=dtype, device="meta")
