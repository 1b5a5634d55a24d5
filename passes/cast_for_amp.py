"""Pass: mixed precision — run matmul/conv-class ops in bf16/fp16, keep everything else fp32."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from mlocompile.analysis import meta_like

aten = torch.ops.aten
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class AmpRule:
    """Which positional arguments of an op are cast to the low-precision dtype."""

    cast_args: tuple[int, ...]


AMP_RULES: dict[torch._ops.OpOverload, AmpRule] = {}


def register_amp_rule(op: torch._ops.OpOverload, cast_args: tuple[int, ...]) -> None:
    """Declare that ``op`` runs in low precision with ``cast_args`` cast down."""
    AMP_RULES[op] = AmpRule(cast_args)


register_amp_rule(aten.mm.default, (0, 1))
register_amp_rule(aten.bmm.default, (0, 1))
register_amp_rule(aten.addmm.default, (0, 1, 2))
register_amp_rule(aten.baddbmm.default, (0, 1, 2))
register_amp_rule(aten.convolution.default, (0, 1, 2))
register_amp_rule(aten.convolution_backward.default, (0, 1, 2))

Policy = Callable[[Node], str]


def _cast(gm: GraphModule, arg: Node, dtype: torch.dtype, like: Node) -> Node:
    with gm.graph.inserting_before(like):
        new = gm.graph.call_function(aten._to_copy.default, (arg,), {"dtype": dtype})
    new.meta.update({k: v for k, v in like.meta.items() if k.startswith("mlo.")})
    if isinstance(arg.meta.get("val"), torch.Tensor):
        new.meta["val"] = meta_like(arg.meta["val"], dtype)
    return new


def cast_for_amp(gm: GraphModule, *, policy: Policy) -> GraphModule:
    """Run every registered op whose policy says "bf16"/"fp16" in that dtype.

    ``policy(node)`` returns "fp32", "bf16" or "fp16" for a node (from the problem's
    ``Config.precision``; neumann/cg hypergradient nodes stay fp32 by default).
    Floating inputs are cast down, the op runs low, its outputs are cast back to
    their original dtype: parameters (master weights), reductions, optimizer
    updates and everything else stay in fp32.

    Requires: a verified step graph with ``mlo.*`` annotations and ``val`` meta.
    Ensures: low-precision dtypes appear only between a cast-down and a cast-up.

    Before/after::

        %mm = aten.mm(%x, %w) : f32          %x16 = aten._to_copy(%x, dtype=bf16)
                                       =>    %w16 = aten._to_copy(%w, dtype=bf16)
                                             %mm = aten.mm(%x16, %w16) : bf16
                                             %mm_f = aten._to_copy(%mm, dtype=f32)
    """
    for node in list(gm.graph.nodes):
        rule = AMP_RULES.get(node.target) if node.op == "call_function" else None
        precision = policy(node) if rule is not None else "fp32"
        if rule is None or precision not in LOW:
            continue
        low = LOW[precision]
        args = list(node.args)
        for i in rule.cast_args:
            arg = args[i] if i < len(args) else None
            if not isinstance(arg, Node):
                continue
            val = arg.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dtype in (torch.float32, torch.float64):
                args[i] = _cast(gm, arg, low, node)
        if args == list(node.args):
            continue
        node.args = tuple(args)
        outs = node.meta.get("val")
        users = list(node.users)
        if isinstance(outs, torch.Tensor):
            node.meta["val"] = meta_like(outs, low)
            with gm.graph.inserting_after(node):
                up = gm.graph.call_function(aten._to_copy.default, (node,), {"dtype": outs.dtype})
            up.meta.update({k: v for k, v in node.meta.items() if k.startswith("mlo.")})
            up.meta["val"] = meta_like(outs, outs.dtype)
            for user in users:
                user.replace_input_with(node, up)
        else:  # tuple results (convolution_backward): cast each getitem back up
            for user in users:
                val = user.meta.get("val")
                if user.target is not operator.getitem or not isinstance(val, torch.Tensor):
                    continue
                with gm.graph.inserting_after(user):
                    up = gm.graph.call_function(aten._to_copy.default, (user,), {"dtype": val.dtype})
                up.meta.update({k: v for k, v in user.meta.items() if k.startswith("mlo.")})
                up.meta["val"] = meta_like(val, val.dtype)
                for uu in list(user.users):
                    if uu is not up:
                        uu.replace_input_with(user, up)
                user.meta["val"] = meta_like(val, low)
    gm.graph.lint()
    gm.recompile()
    return gm


def precision_policy(
    precision: str, keep_fp32_methods: tuple[str, ...] = ("darts", "sama", "neumann", "cg", "itd")
) -> Policy:
    """The default policy: a step runs at its stepping problem's precision, except the
    best-response products of ``keep_fp32_methods`` (finite differences and iterative
    solvers amplify round-off: a bf16 darts difference quotient or itd reverse pass
    is off by ~20% on the Meta-Weight-Net test program)."""

    def policy(node: Node) -> str:
        return "fp32" if node.meta.get("mlo.method") in keep_fp32_methods else precision

    return policy
