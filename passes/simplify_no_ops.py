"""Pass: drop operations that return their input unchanged (algebraic no-ops).

Traced steps carry many: ``t(t(w))`` from the transposes of a linear layer's
backward, ``x / 1`` and ``x * 1`` from loss scaling by ``gradient_accumulation = 1``,
``0 + x`` from Python's ``sum()``, ``zeros_like(w) + h`` where a problem's loss does
not read its own parameters and its gradient is all hypergradient, views to the
shape a tensor already has. Each costs a dispatch (and the arithmetic ones a fresh
tensor) in the fx backend; removing them leaves the values unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._ops import OpOverload
from torch.fx import GraphModule, Node

from mlocompile.analysis import find_mutated_storages, find_storage_base, same_symbolic_layout
from mlocompile.ir import remove_dead_nodes

aten = torch.ops.aten
_ADDS = {aten.add.Tensor, aten.add.Scalar}
_SUBS = {aten.sub.Tensor, aten.sub.Scalar}
_MULS = {aten.mul.Tensor, aten.mul.Scalar}
_DIVS = {aten.div.Tensor, aten.div.Scalar}
_ZEROS = {aten.zeros_like.default, aten.zeros.default, aten.new_zeros.default}
_SAME_SHAPE_VIEWS = {aten.view.default, aten.expand.default, aten.reshape.default, aten._unsafe_view.default}


def _is_number(arg: Any, value: float) -> bool:
    return isinstance(arg, (int, float)) and not isinstance(arg, bool) and arg == value


def _is_zeros(arg: Any, written: set[Node]) -> bool:
    return isinstance(arg, Node) and arg.op == "call_function" and arg.target in _ZEROS and arg not in written


def _alpha_is_one(node: Node) -> bool:
    return _is_number(node.kwargs.get("alpha", 1), 1)


NoopRule = Callable[[Node, set[Node]], "Node | None"]
# Per op: rules that return the input a node passes through unchanged (None: not a no-op), tried in order
NOOP_RULES: dict[OpOverload, list[NoopRule]] = {}


def register_noop(*targets: OpOverload) -> Callable[[NoopRule], NoopRule]:
    """Register a no-op rule for ``targets`` (as inductor's ``noop_registry``)."""

    def add(rule: NoopRule) -> NoopRule:
        for target in targets:
            NOOP_RULES.setdefault(target, []).append(rule)
        return rule

    return add


def _node_arg(arg: Any) -> Node | None:
    return arg if isinstance(arg, Node) else None


@register_noop(*_ADDS, *_SUBS)
def _plus_zero(node: Node, written: set[Node]) -> Node | None:
    """x + α·0, x − α·0"""
    args = node.args
    return _node_arg(args[0]) if len(args) == 2 and _is_number(args[1], 0) else None


@register_noop(*_MULS, *_DIVS)
def _times_one(node: Node, written: set[Node]) -> Node | None:
    """x · 1, x / 1"""
    args = node.args
    return _node_arg(args[0]) if len(args) == 2 and _is_number(args[1], 1) else None


@register_noop(aten.mul.Tensor)
def _one_times(node: Node, written: set[Node]) -> Node | None:
    """1 · x"""
    args = node.args
    return _node_arg(args[1]) if len(args) == 2 and _is_number(args[0], 1) else None


@register_noop(aten.add.Tensor)
def _plus_zeros(node: Node, written: set[Node]) -> Node | None:
    """zeros + x, x + zeros"""
    args = node.args
    if len(args) != 2 or not _alpha_is_one(node):
        return None
    if _is_zeros(args[0], written):
        return _node_arg(args[1])
    return _node_arg(args[0]) if _is_zeros(args[1], written) else None


@register_noop(aten.sub.Tensor)
def _minus_zeros(node: Node, written: set[Node]) -> Node | None:
    """x − α·zeros"""
    args = node.args
    return _node_arg(args[0]) if len(args) == 2 and _is_zeros(args[1], written) else None


@register_noop(aten.t.default)
def _double_transpose(node: Node, written: set[Node]) -> Node | None:
    """t(t(x))"""
    inner = node.args[0]
    if isinstance(inner, Node) and inner.op == "call_function" and inner.target is aten.t.default:
        return _node_arg(inner.args[0])
    return None


@register_noop(*_SAME_SHAPE_VIEWS)
def _same_shape_view(node: Node, written: set[Node]) -> Node | None:
    """view/expand/reshape of x: kept only if the shapes (and strides) match (checked by the pass)"""
    return _node_arg(node.args[0])


def _candidate(node: Node, written: set[Node], rules: dict[int, list[NoopRule]]) -> Node | None:
    """The input ``node`` returns unchanged, if a rule (``rules``: ``NOOP_RULES`` by id) says it is a no-op."""
    for rule in rules.get(id(node.target), ()):
        source = rule(node, written)
        if source is not None:
            return source
    return None


def _same_tensor_meta(a: Node, b: Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
        return False
    return (
        va.shape == vb.shape
        and va.dtype == vb.dtype
        and va.device == vb.device
        and va.stride() == vb.stride()
        and va.storage_offset() == vb.storage_offset()
        and same_symbolic_layout(a, b)
    )


def simplify_no_ops(gm: GraphModule) -> GraphModule:
    """Replace each node that returns one of its inputs unchanged by that input.

    Rewritten: ``x + 0``, ``x − 0``, ``x · 1``, ``1 · x``, ``x / 1``, ``x + zeros``,
    ``zeros + x``, ``x − zeros`` (``zeros`` made by ``zeros_like``/``zeros``/``new_zeros``),
    ``t(t(x))`` and ``view``/``expand``/``reshape`` to the shape ``x`` already has;
    each only when ``x``'s shape, dtype, device, strides and storage offset equal the
    node's (no broadcasting, no type promotion, same layout for later views). A
    rewrite makes the node's users share ``x``'s storage, so it is skipped when an op
    of the graph writes either storage, and for a node the graph returns (an output
    must not alias an input the caller may update).

    Requires: a verified step graph with ``val`` meta.
    Ensures: the same values; fewer nodes.

    Before/after::

        %a = aten.t(%w)                      %c = aten.mm(%g, %w)
        %b = aten.t(%a)              =>      %e = aten.add(%c, %c)
        %c = aten.mm(%g, %b)
        %d = aten.mul(%c, 1)
        %e = aten.add(%d, %d)
    """
    written = find_mutated_storages(gm)
    outputs = {a for n in gm.graph.nodes if n.op == "output" for a in n.all_input_nodes}
    # NOTE: by id: an operator overload hashes through a Python __hash__, once per node otherwise
    rules = {id(target): found for target, found in NOOP_RULES.items()}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node in outputs:
            continue
        source = _candidate(node, written, rules)
        if source is None or not _same_tensor_meta(node, source):
            continue
        if find_storage_base(node) in written or find_storage_base(source) in written:
            continue
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
    remove_dead_nodes(gm.graph)  # e.g. the zeros_like and inner t() a rewrite orphaned
    gm.recompile()
    return gm
