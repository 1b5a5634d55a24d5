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

from mlocompile.analysis import estimate_peak_memory, nbytes
from mlocompile.program import ProgramGraph

aten = torch.ops.aten


# Symbols of the symbolic forms (all positive integers except the cost constant c).
d, p, K, iters, B, a = sympy.symbols("d p K I B a", positive=True, integer=True)
c = sympy.Symbol("c", positive=True)
SYMBOLS: dict[str, str] = {
    "d": "parameters of the lower problem (the one whose solution is differentiated)",
    "p": "parameters of the upper problem",
    "K": "unroll steps (itd replays K optimizer steps)",
    "I": "iterations (neumann_iterations / cg_iterations)",
    "B": "batch size of the lower problem's last batch",
    "a": "activation elements per sample kept by one forward of the lower loss",
    "c": "FLOPs per sample per parameter of one forward+backward",
}
HVP_FACTOR = 2  # reverse-over-reverse VJP of a gradient ~ 2x the gradient it reverses
UPDATE_FLOPS = 4  # per-parameter FLOPs of an SGD-with-momentum update (Adam ~ 12)

G = c * B * (d + p)  # one gradient of the lower loss L(w, λ): it evaluates both problems
SYMBOLIC_FLOPS: dict[str, sympy.Expr] = {
    # 2 gradients w.r.t. λ at w ± eps·v; ‖v‖ (2d), two axpys (4d), the difference quotient (3p)
    "darts": 2 * G + 6 * d + 3 * p,
    # linearize ∇_w L once, I Hessian VJPs + 1 mixed VJP; per iteration term/acc updates (3d)
    "neumann": G + HVP_FACTOR * G * (iters + 1) + 3 * iters * d + d + p,
    # as neumann, plus per iteration 2 dots and 3 axpys and a scale (11d)
    "cg": G + HVP_FACTOR * G * (iters + 1) + 11 * iters * d + 3 * d + p,
    # K replayed (gradient + update + shifted λ), then the reverse of each (HVP-class + update VJP)
    "itd": K * (G + UPDATE_FLOPS * d + p) + K * (HVP_FACTOR * G + UPDATE_FLOPS * d + p),
}
SYMBOLIC_MEMORY: dict[str, sympy.Expr] = {
    # w, v, one perturbed copy; λ and two λ-gradients; activations of one forward/backward
    "darts": 3 * d + 3 * p + B * a,
    # w, λ; residuals of the linearized gradient (2Ba); v, term, acc, Hv; the result
    "neumann": 5 * d + 2 * p + 2 * B * a,
    # w, λ; residuals (2Ba); v, x, r, p, Ap; the result
    "cg": 6 * d + 2 * p + 2 * B * a,
    # per replayed step: weights, optimizer state, shifted λ and the gradient's residuals; plus w, v, λ
    "itd": K * (2 * d + p + 2 * B * a) + 2 * d + p,
}


def path_flops(methods: Sequence[str]) -> sympy.Expr:
    """Return the FLOPs of one hypergradient path: the sum of its hops' VJP costs.

    A path is evaluated right to left as a chain of vector-Jacobian products, so
    each hop adds its own cost; no Jacobian is formed, so no hop multiplies another.
    """
    return sympy.Add(*(SYMBOLIC_FLOPS[m] for m in methods))


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
    symbolic: dict[str, sympy.Expr] = field(default_factory=lambda: dict(SYMBOLIC_FLOPS))
    symbolic_memory: dict[str, sympy.Expr] = field(default_factory=lambda: dict(SYMBOLIC_MEMORY))
    methods: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        rows = [f"{'step':<20} {'FLOPs':>10} {'peak mem':>11} {'inputs':>11}  peak at"]
        for s in self.steps.values():
            rows.append(
                f"{s.title:<20} {_si(s.flops):>10} {_bytes(s.peak_bytes):>11} {_bytes(s.input_bytes):>11}  {s.peak_node}"
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


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _breakdown(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {_si(v)}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"
