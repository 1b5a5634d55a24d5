"""Graph analyses the passes share (torch.fx only): which storage a node's value lives in, what is written.

Analyses never mutate the graph (``find_*``). They read op schemas: a return with an
alias annotation shares storage with the argument of the same alias set (views,
in-place ops); a write annotation marks an argument the op overwrites.
"""

from __future__ import annotations

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


def find_written_args(node: Node) -> list[Node]:
    """The argument nodes ``node`` writes into: schema write annotations plus ``HIDDEN_WRITES``."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return []
    written = []
    for i, arg in enumerate(target._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if isinstance(value, Node):
            written.append(value)
    if target in HIDDEN_WRITES:
        positions, training = HIDDEN_WRITES[target]
        if len(node.args) > training and node.args[training]:
            written += [a for i in positions if isinstance(a := node.args[i], Node)]
    return written


def aliased_input(node: Node) -> Node | None:
    """Return the input node whose storage ``node``'s output shares (views, in-place ops), if any."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return None
    first = next((x for x in node.all_input_nodes), None)
    if target in UNANNOTATED_VIEWS:
        return first
    infos = [r.alias_info for r in target._schema.returns if r.alias_info is not None]
    if not infos:
        return None
    # NOTE: list returns (split, unbind: Tensor(a)[]) expose empty alias sets to Python
    sets = {s for info in infos for s in info.before_set}
    for i, arg in enumerate(target._schema.arguments):
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if arg.alias_info is not None and isinstance(value, Node):
            if not sets or sets & set(arg.alias_info.before_set):
                return value
    return first


def find_storage_base(node: Node) -> Node:
    """Walk back through views (and in-place ops) to the node that owns ``node``'s storage."""
    while node.op == "call_function" and (source := aliased_input(node)) is not None:
        node = source
    return node


def find_mutated_storages(gm: GraphModule) -> set[Node]:
    """The storage owners (``find_storage_base``) some op of the graph writes, through any view of them."""
    return {find_storage_base(value) for node in gm.graph.nodes for value in find_written_args(node)}
