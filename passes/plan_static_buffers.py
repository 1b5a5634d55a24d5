"""Pass: give large temporaries static buffers, reused across steps (fx backend).

Every op of a traced step allocates its result; the temporaries die within the step.
glibc serves these mid-sized blocks (here 16 KiB to a few MB) from its heap and
keeps what they fragment: a Meta-Weight-Net cycle that holds 1.7 MB of live
tensors left a transient resident set of 20-55 MB. This pass plans memory the way
a compiler plans registers: each large temporary gets a buffer allocated once, at
compile time, shared with every other temporary of the same shape and dtype whose
lifetime does not overlap (graphs of one compiler run one at a time, so they share
buffers too), and the op writes into it through its ``out=`` variant. The values
are unchanged (the same kernels run); the steady state allocates nothing large.
"""

from __future__ import annotations

from collections import defaultdict
from functools import cache
from typing import Any

import torch
from torch.fx import GraphModule, Node

from mlocompile.analysis import aliased_input, is_impure

BufferPool = dict[tuple[Any, ...], list[torch.Tensor]]
MIN_BYTES = 16 * 1024


@cache
def out_variant(op: torch._ops.OpOverload) -> tuple[torch._ops.OpOverload, str] | None:
    """``aten.mm.default`` -> (``aten.mm.out``, ``"out"``): same arguments plus one out tensor."""
    if len(op._schema.returns) != 1 or any(a.alias_info is not None for a in op._schema.arguments):
        return None
    signature = [(a.name, str(a.type)) for a in op._schema.arguments]
    packet = op.overloadpacket
    for overload in packet.overloads():
        candidate = getattr(packet, overload)
        args = candidate._schema.arguments
        outs = [a for a in args if a.is_out]
        same = [(a.name, str(a.type)) for a in args if not a.is_out] == signature
        if same and len(outs) == 1 and len(candidate._schema.returns) == 1:
            return candidate, outs[0].name
    return None


def _alias_closure(node: Node) -> set[Node]:
    """``node`` and every later node whose result shares its storage (views, in-place ops)."""
    closure, stack = {node}, [node]
    while stack:
        x = stack.pop()
        for u in x.users:
            if u not in closure and u.op == "call_function" and aliased_input(u) is x:
                closure.add(u)
                stack.append(u)
    return closure


def plan_static_buffers(
    gm: GraphModule, device: torch.device | None, pool: BufferPool | None = None, min_bytes: int = MIN_BYTES
) -> GraphModule:
    """Make ops with large contiguous temporary results write into planned static buffers.

    A node is planned when: its target is an aten op with an ``out=`` variant taking
    the same arguments; it is pure and its result is fresh (not a view or an in-place
    write), contiguous and at least ``min_bytes``; and neither it nor any view or
    in-place write of it (its alias closure) is returned by the graph (an output must
    outlive the step). Its lifetime runs from the node to the last user of its alias
    closure. Buffers are keyed by (shape, dtype, device); a node takes a buffer whose
    previous occupant's last use is strictly before the node (so it never reads what
    it writes), else a new one. ``pool`` (kept by the caller) holds the buffers, so
    the graphs of one compiler, which never run at the same time, share them.
    ``device`` is where the step's tensors live (node meta holds ``meta``-device
    values); None (inputs on several devices) plans nothing, and so does a graph
    traced with symbolic sizes (no fixed buffer fits every size it accepts).

    Requires: a verified step graph with ``val`` meta; run last (after reinplace).
    Ensures: the same values (bitwise); large temporaries are static buffers.

    Before/after::

                                             %_mlo_buffer0 = constant _mlo_buffer0
        %h = aten.mm(%x, %w)          =>     %h = aten.mm.out(%x, %w, out=%_mlo_buffer0)
        %y = aten.relu_(%h)                  %y = aten.relu_(%h)
    """
    pool = {} if pool is None else pool
    if device is None or gm.meta.get("mlo.dynamic"):  # symbolic sizes: no buffer fits every size
        return gm
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    busy_until: dict[tuple[Any, ...], list[int]] = defaultdict(list)  # per key: last use of each buffer
    for n in nodes:
        target = n.target
        if n.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or is_impure(n):
            continue
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor) or not val.is_contiguous():
            continue
        if val.numel() * val.element_size() < min_bytes or aliased_input(n) is not None:
            continue
        variant = out_variant(target)
        if variant is None:
            continue
        users = [u for x in _alias_closure(n) for u in x.users]
        if any(u.op == "output" for u in users):
            continue
        end = max((pos[u] for u in users), default=pos[n])
        key = (tuple(val.shape), val.dtype, str(device))
        slots = busy_until[key]
        slot = next((i for i, last in enumerate(slots) if last < pos[n]), len(slots))
        if slot == len(slots):
            slots.append(end)
        else:
            slots[slot] = end
        buffers = pool.setdefault(key, [])
        if slot == len(buffers):
            buffers.append(torch.empty(val.shape, dtype=val.dtype, device=device))
        name = f"_mlo_buffer_{'x'.join(map(str, val.shape)) or 'scalar'}_{str(val.dtype).split('.')[-1]}_{slot}"
        if not hasattr(gm, name):
            gm.register_buffer(name, buffers[slot], persistent=False)
        with gm.graph.inserting_before(n):
            attr = gm.graph.get_attr(name)
        attr.meta.update({k: v for k, v in n.meta.items() if k.startswith("mlo.")}, val=val)
        op, out_name = variant
        n.target = op
        n.kwargs = {**n.kwargs, out_name: attr}
    gm.recompile()
    return gm
