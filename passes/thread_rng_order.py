"""Pass: chain a graph's random draws and generator swaps by data edges, so any scheduler keeps their order."""

from __future__ import annotations

import operator

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from mlocompile.rng import AFTER, SWAP_RNG_STATE


def _draws_randomness(node: Node) -> bool:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    return target is SWAP_RNG_STATE or torch.Tag.nondeterministic_seeded in target.tags


def thread_rng_order(gm: GraphModule) -> GraphModule:
    """Chain a graph's random draws and generator swaps by data dependencies, in graph order.

    The fx backend runs nodes in graph order, so a draw after ``swap_rng_state``
    reads the swapped generator. Inductor schedules by data dependencies only and
    would hoist the swaps (they read graph inputs) above the draws. Here each draw
    or swap takes its first tensor argument through ``after(arg, previous)``, where
    ``previous`` is the result of the draw or swap before it, so every schedule
    keeps their order. Only graphs with a swap (itd replays) need it.

    Requires: a verified step graph.
    Ensures: every draw and swap after the first depends on the one before it.

    Before/after::

        %s = swap_rng_state(%st, cpu)        %s = swap_rng_state(%st, cpu)
        %d = aten.bernoulli(%p)         =>   %p2 = mlocompile.after(%p, %s)
                                             %d = aten.bernoulli(%p2)
    """
    nodes = list(gm.graph.nodes)
    if not any(n.target is SWAP_RNG_STATE for n in nodes):
        return gm
    previous: Node | None = None
    for node in nodes:
        if not _draws_randomness(node):
            continue
        first = next((a for a in node.args if isinstance(a, Node)), None)
        chained = first is not None and first.target is AFTER and first.args[1] is previous
        if previous is not None and first is not None and not chained:  # NOTE: chained already: idempotent
            with gm.graph.inserting_before(node):
                dep = gm.graph.call_function(AFTER, (first, previous))
            dep.meta.update({k: v for k, v in node.meta.items() if k.startswith("mlo.")})  # the draw's tags
            if "val" in first.meta:
                dep.meta["val"] = first.meta["val"]
            node.replace_input_with(first, dep)
        if isinstance(node.meta.get("val"), Tensor):
            previous = node
        else:  # a tuple of results (native_dropout): order on its first
            after_it = node.next  # reused only right after the draw: defined before anything that follows
            previous = after_it if after_it.target is operator.getitem and after_it.args == (node, 0) else None
            if previous is None:
                with gm.graph.inserting_after(node):
                    previous = gm.graph.call_function(operator.getitem, (node, 0))
                previous.meta.update({k: v for k, v in node.meta.items() if k != "val"})
    gm.recompile()
    return gm
