"""Pass: run pointwise ops in place on temporaries nothing reads afterwards (fx backend).

Step graphs are functional: every op allocates its result. On CPU a fresh large
tensor costs more than its arithmetic (glibc maps it and the kernel zero-fills
every page on first touch), so the fx backend rewrites ``c = add(a, b)`` into
``c = add_(a, b)`` whenever ``a``'s buffer is provably dead after the op. The
values computed are unchanged bit for bit (the same kernels run); only where they
are written changes. Inductor plans its own buffers, so this runs for fx only.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from mlocompile.analysis import alias_plan, same_symbolic_layout

aten = torch.ops.aten


def _inplace_variant(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """``aten.add.Tensor`` -> ``aten.add_.Tensor`` (same overload), or None."""
    packet = getattr(aten, f"{op._schema.name.split('::')[-1]}_", None)
    if packet is None or op._overloadname not in packet.overloads():
        return None
    inplace = getattr(packet, op._overloadname)
    args, iargs = op._schema.arguments, inplace._schema.arguments
    if len(args) != len(iargs) or any(a.name != b.name for a, b in zip(args, iargs)):
        return None
    return inplace  # type: ignore[no-any-return]


def _aliases(node: Node) -> bool:
    """Whether ``node``'s result may share storage with one of its inputs (views, in-place ops)."""
    if node.op != "call_function":
        return node.op != "output"
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return True  # getitem of a multi-output op, Python builtins: be conservative
    return alias_plan(target) is not None


def _read_later(a: Node, n: Node, pos: dict[Node, int]) -> bool:
    """Whether anything other than ``n`` reads ``a``'s buffer at or after ``n``.

    Views of ``a`` (and views of those) count as ``a``: a view used after ``n``, or
    used by ``n`` itself (``add(a, a.t())`` would overwrite what it still reads), or
    returned by the graph, keeps ``a``'s buffer from being written.
    """
    stack, seen = [a], {a}
    while stack:
        x = stack.pop()
        for u in x.users:
            if u is n:
                if x is a:
                    continue
                return True
            if pos[u] > pos[n]:
                return True
            if _aliases(u) and u not in seen:
                seen.add(u)
                stack.append(u)
    return False


def _write_where_into_its_else_input(n: Node, owned: set[Node], returned: set[Node], pos: dict[Node, int]) -> bool:
    """``where(c, x, y)`` -> ``where(c, x, y, out=x)`` when ``x`` is an owned, dead buffer of the result's layout.

    A guarded update (``where(non_finite, old, new)``) then writes into the donated old
    parameter: each element reads ``x`` before it writes it.
    """
    x = n.args[1]
    if not isinstance(x, Node) or x in returned or x not in owned or _read_later(x, n, pos):
        return False
    vx, vn = x.meta.get("val"), n.meta.get("val")
    if not isinstance(vx, torch.Tensor) or not isinstance(vn, torch.Tensor):
        return False
    if vx.shape != vn.shape or vx.dtype != vn.dtype or vx.stride() != vn.stride() or not same_symbolic_layout(x, n):
        return False
    n.target = aten.where.self_out
    n.kwargs = {"out": x}
    owned.add(n)
    return True


def reinplace_pointwise(gm: GraphModule, donated: frozenset[str] = frozenset()) -> GraphModule:
    """Turn pointwise ops whose first input is a dead temporary into their in-place variants.

    ``n = op(a, ...)`` becomes ``op_(a, ...)`` when: ``op`` is pointwise and has an
    in-place variant with the same arguments; ``a`` is a buffer the graph owns (the
    fresh result of a non-aliasing op, of an op this pass already made in place, or a
    *donated* input: a placeholder whose ``mlo.input`` is in ``donated``, which the
    caller will replace by the step's output, like a parameter the optimizer updates);
    nothing else reads ``a`` at or after ``n``, directly or through a view of it
    (``_read_later``); ``a`` is not a graph output; and ``a`` and ``n`` have the same shape, dtype and strides
    (no broadcasting into ``a``, no type promotion).

    Requires: a verified step graph with ``val`` meta (run last: later passes such as
    CSE and DCE treat mutating nodes as impure).
    Ensures: the graph computes the same values (bitwise) with fewer allocations.

    Before/after::

        %m = aten.mul(%buf, %mom)          %m = aten.mul(%buf, %mom)
        %b = aten.add(%m, %g)        =>    %b = aten.add_(%m, %g)
        return [%b]                        return [%b]
    """
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    output = nodes[-1]
    returned = set(output.all_input_nodes)
    owned = {n for n in nodes if n.op == "placeholder" and n.meta.get("mlo.input") in donated}
    for n in nodes:
        target = n.target
        if n.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target is aten.where.self and _write_where_into_its_else_input(n, owned, returned, pos):
            continue
        if torch.Tag.pointwise not in target.tags or not n.args or not isinstance(n.args[0], Node):
            continue
        a = n.args[0]
        if a in returned or (a not in owned and (a.op != "call_function" or _aliases(a))):
            continue
        if _read_later(a, n, pos):
            continue
        va, vn = a.meta.get("val"), n.meta.get("val")
        if not isinstance(va, torch.Tensor) or not isinstance(vn, torch.Tensor):
            continue
        if va.shape != vn.shape or va.dtype != vn.dtype or va.stride() != vn.stride():
            continue
        if not same_symbolic_layout(a, n):  # symbolic sizes: equal example sizes need not stay equal
            continue
        inplace = _inplace_variant(target)
        if inplace is None:
            continue
        n.target = inplace
        owned.add(n)
    gm.recompile()
    return gm
