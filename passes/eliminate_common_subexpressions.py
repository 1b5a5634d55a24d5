"""Pass: merge nodes that compute the same pure function of the same inputs."""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node

from mlocompile.analysis import find_mutated_storages, find_storage_base, is_impure


def _key(arg: Any) -> Any:
    kind = type(arg)
    if kind is Node:
        return arg
    if kind is float:
        return ("float", repr(arg))  # 0.0 and -0.0 differ; NaN equals itself here
    if kind in _SCALARS:
        return (kind, arg)  # True and 1 differ
    if isinstance(arg, (list, tuple)):
        kinds = tuple(map(type, arg))
        if _FLAT.issuperset(kinds):  # NOTE: most lists are sizes and strides: keyed as in _args_key
            return (kind, kinds, tuple(arg))
        return (kind, tuple([_key(a) for a in arg]))
    if isinstance(arg, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in arg.items())))
    if isinstance(arg, float):
        return ("float", repr(arg))
    return (kind, arg)


# NOTE: dtypes, devices, layouts and memory formats hash and compare by value
_SCALARS = frozenset({int, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format})
_FLAT = _SCALARS | {Node}


def _args_key(args: tuple[Any, ...]) -> Any:
    """``_key(args)``'s distinctions at less cost: arguments that are all nodes and exact scalars (most
    nodes' are) key as their types and the tuple itself (``1`` and ``True`` differ by type; nodes compare
    by identity); anything else (floats, lists, dicts) through ``_key``."""
    kinds = tuple(map(type, args))
    if _FLAT.issuperset(kinds):
        return (kinds, args)
    return _key(args)


def eliminate_common_subexpressions(gm: GraphModule) -> GraphModule:
    """Replace each pure node by an earlier node with the same target and arguments.

    Shared path suffixes planned by ``order_vjps`` are already computed once; this
    catches what the plan cannot see (e.g. the same forward evaluated by two rules).

    The pipeline's graphs are functional (traced through functionalization), but the
    pass does not rely on it: a node is never merged when some op writes its storage
    (the two copies would share one buffer written twice) or an input's (equal
    arguments at two points need not hold equal values).

    Requires: a verified step graph.
    Ensures: no two pure call_function nodes have equal (target, args, kwargs), except
    across ``mlo.segment`` tags (deliberate recomputation, see ``hypergrad.itd_vjp``)
    and nodes whose storage is written in place.

    Before/after::

        %a = aten.mul(%x, %y)        %a = aten.mul(%x, %y)
        %b = aten.mul(%x, %y)   =>   %c = aten.add(%a, %a)
        %c = aten.add(%a, %b)
    """
    seen: dict[Any, Node] = {}
    written = find_mutated_storages(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or is_impure(node):
            continue
        if written and any(find_storage_base(x) in written for x in (node, *node.all_input_nodes)):
            continue  # its value, or an input's, changes in place: equal arguments need not mean equal values
        # NOTE: a checkpointed itd replay recomputes its forward on purpose; merging it
        # with the forward sweep would keep every step's values alive again. Targets compare by
        # identity (operator overloads, functions): keyed by id(), a graph node keeps each alive
        key = (
            id(node.target),
            _args_key(node.args),
            _key(node.kwargs) if node.kwargs else (),
            node.meta.get("mlo.segment"),
        )
        try:
            earlier = seen.get(key)
        except TypeError:  # an unhashable argument
            continue
        if earlier is not None:
            node.replace_all_uses_with(earlier)
            gm.graph.erase_node(node)
        else:
            seen[key] = node
    gm.recompile()
    return gm
