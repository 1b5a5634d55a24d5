"""Pass: remove nodes whose results nothing uses."""

from __future__ import annotations

from torch.fx import GraphModule

from mlocompile.ir import remove_dead_nodes


def eliminate_dead_code(gm: GraphModule) -> GraphModule:
    """Delete pure nodes without users (mutating and random ops are kept).

    Requires: a verified step graph.
    Ensures: every remaining pure node reaches the output.

    Before/after::

        %a = aten.mm(%x, %w)        %b = aten.add(%x, %x)
        %b = aten.add(%x, %x)  =>   return [%b]
        return [%b]
    """
    remove_dead_nodes(gm.graph)
    gm.recompile()
    return gm
