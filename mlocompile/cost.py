"""Static cost model: FLOPs and peak memory of every emitted step, and symbolic forms per method.

Numbers come from the step graphs alone (shapes in ``node.meta["val"]``), nothing runs:
FLOPs use torch's own per-op formulas (``torch.utils.flop_counter.flop_registry``, the
ones ``FlopCounterMode`` counts: matmul, convolution and attention class ops), peak
memory is a liveness walk in execution order. The symbolic forms state what one
best-response VJP of each method costs in the sizes of the problem it differentiates.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.utils._pytree as pytree
from torch.fx import GraphModule, Node
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from mlocompile.analysis import estimate_peak_memory, format_bytes, nbytes
from mlocompile.hypergrad import METHOD_RULES
from mlocompile.program import ProgramGraph
from mlocompile.symbols import HVP_FACTOR, SYMBOLS, UPDATE_FLOPS, B, G, K, a, c, d, iters, p  # noqa: F401 - re-exported

aten = torch.ops.aten


# One best-response VJP of each built-in method, in the symbols of ``mlocompile.symbols``; the
# source of truth is each method's rule (reports read ``METHOD_RULES`` itself, so methods
# registered later appear too)
SYMBOLIC_FLOPS: dict[str, sympy.Expr] = {m: rule.flops for m, rule in METHOD_RULES.items()}
SYMBOLIC_MEMORY: dict[str, sympy.Expr] = {m: rule.memory for m, rule in METHOD_RULES.items()}


def path_flops(methods: Sequence[str]) -> sympy.Expr:
    """Return the FLOPs of one hypergradient path: the sum of its hops' VJP costs.

    A path is evaluated right to left as a chain of vector-Jacobian products, so
    each hop adds its own cost; no Jacobian is formed, so no hop multiplies another.
    """
    return sympy.Add(*(METHOD_RULES[m].flops for m in methods))


@dataclass
class StepCost:
    """Static estimates for one emitted step graph (bytes, FLOPs as FlopCounterMode counts them)."""

    title: str
    flops: int
    flops_by_role: dict[str, int]
    flops_by_problem: dict[str, int]
    peak_bytes: int
    peak_node: str
    input_bytes: int
    flops_by_method: dict[str, int] = field(default_factory=dict)  # nodes inside best-response VJPs


@dataclass
class CostReport:
    """Per-step estimates plus the symbolic cost of one best-response VJP per method."""

    steps: dict[str, StepCost]
    symbolic: dict[str, sympy.Expr] = field(default_factory=lambda: {m: r.flops for m, r in METHOD_RULES.items()})
    symbolic_memory: dict[str, sympy.Expr] = field(
        default_factory=lambda: {m: r.memory for m, r in METHOD_RULES.items()}
    )
    methods: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        rows = [f"{'step':<20} {'FLOPs':>10} {'peak mem':>11} {'inputs':>11}  peak at"]
        for s in self.steps.values():
            rows.append(
                f"{s.title:<20} {_si(s.flops):>10} {format_bytes(s.peak_bytes):>11} {format_bytes(s.input_bytes):>11}  {s.peak_node}"
            )
            rows.append("    by role:    " + _breakdown(s.flops_by_role))
            rows.append("    by problem: " + _breakdown(s.flops_by_problem))
            if s.flops_by_method:
                rows.append("    in VJPs:    " + _breakdown(s.flops_by_method))
        used = ", ".join(f"{n}={m}" for n, m in sorted(self.methods.items())) or "none"
        rows.append(f"symbolic, one best-response VJP (methods in use: {used}):")
        rows += [f"    {k} = {v}" for k, v in SYMBOLS.items()]
        for method in self.symbolic:
            mark = "*" if method in self.methods.values() else " "
            rows.append(f"  {mark}{method:<8} flops  = {sympy.expand(self.symbolic[method])}")
            rows.append(f"   {'':<8} memory = {sympy.expand(self.symbolic_memory[method])} elements")
        return "\n".join(rows)


def estimate_cost(program: ProgramGraph, graph_modules: Mapping[str, GraphModule]) -> CostReport:
    """Estimate FLOPs and peak memory of every emitted step graph of ``program``."""
    steps = {title: estimate_step_cost(gm, title) for title, gm in graph_modules.items()}
    methods = {n: prob.config.type for n, prob in program.problems.items() if program.parents(n)}
    return CostReport(steps=steps, methods=methods)


def estimate_step_cost(gm: GraphModule, title: str = "step") -> StepCost:
    """Estimate one step graph's FLOPs (per role and problem) and its peak live memory."""
    by_role: dict[str, int] = defaultdict(int)
    by_problem: dict[str, int] = defaultdict(int)
    by_method: dict[str, int] = defaultdict(int)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        flops = estimate_node_flops(node)
        if flops:
            by_role[str(node.meta.get("mlo.role", "?"))] += flops
            by_problem[str(node.meta.get("mlo.problem", "?"))] += flops
            if "mlo.method" in node.meta:
                by_method[str(node.meta["mlo.method"])] += flops
    peak, at = estimate_peak_memory(gm)
    inputs = sum(nbytes(n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder")
    total = sum(by_role.values())
    return StepCost(title, total, dict(by_role), dict(by_problem), peak, at, inputs, dict(by_method))


def estimate_node_flops(node: Node) -> int:
    """Return the FLOPs of one call_function node from its shapes, by torch's formulas."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return 0
    args, kwargs = pytree.tree_map_only(Node, lambda n: n.meta["val"], (node.args, node.kwargs))
    formula: Callable[..., int] | None = flop_registry.get(target.overloadpacket)
    if formula is not None:
        return int(formula(*args, **kwargs, out_val=node.meta.get("val")))
    if torch._C._dispatch_has_kernel_for_dispatch_key(target.name(), "CompositeImplicitAutograd"):
        return _decomposed_flops(target, args, kwargs)
    return 0


def _decomposed_flops(target: Any, args: Any, kwargs: Any) -> int:
    """Count a composite op as FlopCounterMode does: run its decomposition on meta tensors."""

    def to_meta(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")

    args, kwargs = pytree.tree_map_only(torch.Tensor, to_meta, (args, kwargs))
    with FlopCounterMode(display=False) as counter:
        target(*args, **kwargs)
    return int(counter.get_total_flops())


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)}"


def _breakdown(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {_si(v)}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"
