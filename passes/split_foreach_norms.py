"""Pass: rewrite one ``_foreach_norm`` over many tensors as one norm per tensor (for inductor)."""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule

aten = torch.ops.aten


def split_foreach_norms(gm: GraphModule) -> GraphModule:
    """Rewrite ``_foreach_norm(ts)[i]`` as ``linalg_vector_norm(ts[i])``.

    One foreach call is what the fx backend wants (one dispatch); inductor has no
    lowering for it and runs it as a fallback kernel, while it fuses per-tensor norms
    into its reductions. The values are the same: ``_foreach_norm`` computes each
    tensor's ``linalg_vector_norm``. Calls with a non-2 order, keyword arguments or a
    user other than ``getitem`` are left alone.

    Requires: a verified step graph.
    Ensures: no rewritten ``_foreach_norm`` remains; each norm keeps the call's ``mlo.*`` meta.

    Before/after::

        %n = aten._foreach_norm([%a, %b])      %n0 = aten.linalg_vector_norm(%a)
        %n0 = getitem(%n, 0)              =>   %n1 = aten.linalg_vector_norm(%b)
        %n1 = getitem(%n, 1)
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten._foreach_norm.Scalar:
            continue
        if node.kwargs or len(node.args) > 1 and node.args[1] != 2:
            continue
        if any(u.target is not operator.getitem for u in node.users):
            continue
        with gm.graph.inserting_before(node):
            norms = [gm.graph.call_function(aten.linalg_vector_norm.default, (t,)) for t in node.args[0]]
        vals = node.meta.get("val")
        for i, norm in enumerate(norms):
            norm.meta.update({k: v for k, v in node.meta.items() if k.startswith("mlo.")})
            if isinstance(vals, (list, tuple)):
                norm.meta["val"] = vals[i]
        for user in list(node.users):
            user.replace_all_uses_with(norms[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm
