"""Pass: run ``aten.bernoulli.p`` as an opaque operator under inductor (its in-place lowering misorders reads)."""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from mlocompile.rng import BERNOULLI

aten = torch.ops.aten


def opaque_bernoulli(gm: GraphModule) -> GraphModule:
    """Replace ``aten.bernoulli.p(x, p)`` by ``mlocompile.bernoulli(x, p)``, the same ATen call in a custom op.

    Inductor (torch 2.13, ``fallback_random``) lowers ``bernoulli.p`` as a copy of
    ``x`` filled in place by a ``bernoulli_`` fallback kernel, and can fuse a reader
    of the mask into the kernel that makes the copy, ahead of the fill: it then reads
    ``x`` itself, which for dropout is an ``empty`` tensor inductor fills with NaN.
    A BatchNorm + dropout step gave a NaN loss, or a wrong one where the memory held
    numbers. A custom op is a fallback kernel with a fresh output, which every reader
    waits for. It calls ``aten.bernoulli.p``, so the draws are the fx backend's.

    Requires: a verified step graph.
    Ensures: no ``aten.bernoulli.p`` remains; each replacement keeps the node's meta.

    Before/after::

        %m = aten.bernoulli.p(%e, 0.8)    =>   %m = mlocompile.bernoulli(%e, 0.8)
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.bernoulli.p:
            continue
        if node.kwargs.get("generator") is not None or len(node.args) > 2:
            continue  # NOTE: a generator argument: left to inductor (the custom op has none)
        x, p = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(BERNOULLI, (x, float(p)))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm
