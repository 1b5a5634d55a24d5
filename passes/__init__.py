"""Compiler passes: the registry, the default pipelines and the verifying runner.

Program passes (``PROGRAM_PASSES``) rewrite the ProgramGraph; graph passes
(``GRAPH_PASSES``) rewrite one step's GraphModule; checks (``GRAPH_CHECKS``) read it.
Every one runs through the runner (``run_program_pass``, ``run_pass``, ``run_check``):
after every graph pass the IR is verified (it may be invalid during a pass, never
after), and a failure names the pass, the passes before it and the IR around the
node it failed at. Each pass lives in the file named after it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule, Node

from mlocompile.errors import MLOError, PassError, ProgramError
from mlocompile.ir import format_graph, verify
from mlocompile.program import ProgramGraph
from passes.cast_for_amp import cast_for_amp, precision_policy
from passes.eliminate_common_subexpressions import eliminate_common_subexpressions
from passes.eliminate_dead_code import eliminate_dead_code
from passes.enumerate_paths import enumerate_paths
from passes.opaque_bernoulli import opaque_bernoulli
from passes.order_vjps import check_no_jacobians, order_vjps
from passes.plan_static_buffers import BufferPool, plan_static_buffers
from passes.reinplace_pointwise import reinplace_pointwise
from passes.rematerialize import rematerialize
from passes.report import PassRecord, PassReport
from passes.simplify_no_ops import simplify_no_ops
from passes.split_foreach_norms import split_foreach_norms
from passes.thread_rng_order import thread_rng_order

GraphPass = Callable[..., GraphModule]
GraphCheck = Callable[..., None]
ProgramPass = Callable[[ProgramGraph], ProgramGraph]
# Passes that write in place: only these (and passes after them) may leave mutation in the IR
MUTATING_PASSES = frozenset({"reinplace_pointwise", "plan_static_buffers"})
PROGRAM_PASSES: dict[str, ProgramPass] = {
    "enumerate_paths": enumerate_paths,
    "order_vjps": order_vjps,
}
GRAPH_PASSES: dict[str, GraphPass] = {
    "simplify_no_ops": simplify_no_ops,
    "eliminate_dead_code": eliminate_dead_code,
    "eliminate_common_subexpressions": eliminate_common_subexpressions,
    "cast_for_amp": cast_for_amp,
    "rematerialize": rematerialize,
    "reinplace_pointwise": reinplace_pointwise,
    "plan_static_buffers": plan_static_buffers,
    "split_foreach_norms": split_foreach_norms,
    "opaque_bernoulli": opaque_bernoulli,
    "thread_rng_order": thread_rng_order,
}
# Checks read a graph and raise IRVerificationError; they never rewrite it
GRAPH_CHECKS: dict[str, GraphCheck] = {
    "verify": verify,
    "check_no_jacobians": check_no_jacobians,
}
CONTEXT_LINES = 3  # IR lines quoted on each side of the node a failing pass was at


def run_program_pass(program: ProgramGraph, name: str, done: list[str]) -> ProgramGraph:
    """Run one registered program pass.

    A ``ProgramError`` (the user's program is invalid: its message says how to fix it)
    passes through unchanged; any other failure is a PassError naming the pass and the
    passes before it.
    """
    try:
        program = PROGRAM_PASSES[name](program)
    except ProgramError:
        raise
    except Exception as exc:
        raise PassError(f"program pass {name} (after {done or 'nothing'}) failed: {_describe(exc)}") from exc
    done.append(name)
    return program


def run_program_passes(program: ProgramGraph) -> ProgramGraph:
    """Run the program-level pipeline."""
    done: list[str] = []
    program = run_program_pass(program, "enumerate_paths", done)  # every u2l-then-l2u path, Betty's DFS order
    program = run_program_pass(program, "order_vjps", done)  # needs paths; right-to-left VJP chains, shared suffixes
    return program


def run_check(gm: GraphModule, name: str, title: str, done: list[str], **options: Any) -> None:
    """Run one registered check; a failure is a PassError with the IR around the offending node."""
    try:
        GRAPH_CHECKS[name](gm, **options)
    except Exception as exc:
        raise PassError(_failure("check", name, title, done, gm, exc)) from exc


def run_pass(
    gm: GraphModule, name: str, title: str, done: list[str], report: PassReport | None, **options: Any
) -> GraphModule:
    """Run one registered graph pass, then verify.

    Any exception (from the pass or from verification) becomes a PassError naming the
    pass, the passes before it, and quoting the IR lines around the node the pass was
    working on (found in the failing frames' ``node`` variable, or named by the error).
    """
    before, start = _count(gm), time.perf_counter()
    try:
        gm = GRAPH_PASSES[name](gm, **options)
        verify(gm, functional=not MUTATING_PASSES.intersection([*done, name]))
    except Exception as exc:
        raise PassError(_failure("pass", name, title, done, gm, exc)) from exc
    if report is not None:
        report.records.append(PassRecord(title, name, before, _count(gm), time.perf_counter() - start))
    done.append(name)
    return gm


def _count(gm: GraphModule) -> int:
    return len(gm.graph.nodes)


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, MLOError) else f"{type(exc).__name__}: {exc}"


def _failure(kind: str, name: str, title: str, done: list[str], gm: GraphModule, exc: BaseException) -> str:
    message = f"{kind} {name} on {title} (after {done or 'nothing'}) failed: {_describe(exc)}"
    node = _failing_node(gm, exc)
    if node is None:
        return message
    try:
        lines = format_graph(gm, title).splitlines()
    except Exception:  # a pass may leave the graph unprintable mid-rewrite
        return message + f"\n  at node {node}"
    marks = (f"%{node} = ", f"input {node} = ")
    at = next((i for i, line in enumerate(lines) if line.strip().startswith(marks)), None)
    if at is None:
        return message + f"\n  at node {node}"
    lo, hi = max(at - CONTEXT_LINES, 1), min(at + CONTEXT_LINES + 1, len(lines))
    quoted = [(">> " if i == at else "   ") + lines[i] for i in range(lo, hi)]
    return message + f"\n  IR around {node}:\n" + "\n".join(quoted)


def _failing_node(gm: GraphModule, exc: BaseException) -> str | None:
    """The node a failure happened at: the innermost frame's ``node`` variable, or one the message names."""
    names = {n.name for n in gm.graph.nodes}
    tb, found = exc.__traceback__, None
    while tb is not None:  # NOTE: walk to the innermost frame: it was working on the most specific node
        local = tb.tb_frame.f_locals.get("node")
        if isinstance(local, Node) and local.name in names:
            found = local.name
        tb = tb.tb_next
    if found is not None:
        return found
    named = re.search(r"\bnode %?(\w+)", str(exc))
    return named.group(1) if named and named.group(1) in names else None


def run_graph_pipeline(
    gm: GraphModule,
    title: str,
    sizes: dict[str, int],
    report: PassReport | None = None,
    precision: str = "fp32",
    keep_fp32_methods: tuple[str, ...] = ("darts", "sama", "neumann", "cg", "itd"),
    memory_budget: float | None = None,
    inplace: bool = False,
    donated: frozenset[str] = frozenset(),
    buffers: BufferPool | None = None,
    device: torch.device | None = None,
) -> GraphModule:
    """Run the default graph pipeline on one traced step.

    ``inplace`` (the fx backend) ends it with ``reinplace_pointwise``, which may also
    write into the ``donated`` inputs (named by ``mlo.input``), and
    ``plan_static_buffers``, which keeps large temporaries in the ``buffers`` pool
    (tensors on ``device``).
    """
    done: list[str] = []
    run_check(gm, "verify", title, done)  # what tracing emitted: annotated and functional
    run_check(gm, "check_no_jacobians", title, done, sizes=sizes)  # VJP ordering never forms a d_i x d_j tensor
    if precision != "fp32":  # first, so CSE merges the repeated casts of a weight
        policy = precision_policy(precision, keep_fp32_methods)
        gm = run_pass(gm, "cast_for_amp", title, done, report, policy=policy)
    gm = run_pass(gm, "simplify_no_ops", title, done, report)  # t(t(w)), x / 1, zeros + h: before CSE keys on them
    gm = run_pass(gm, "eliminate_common_subexpressions", title, done, report)  # merges repeated forwards
    gm = run_pass(gm, "eliminate_dead_code", title, done, report)  # after CSE: drops what merging orphaned
    # NOTE: a checkpointed (segmented) itd replay already bounds its graph's peak; remat on
    # top cost more time than it saved there (MAML K=20: 0.45x -> 0.38x peak for +6% time)
    segmented = any("mlo.segment" in n.meta for n in gm.graph.nodes)
    if memory_budget is not None and not segmented:  # last: CSE after it would merge recomputations back
        gm = run_pass(gm, "rematerialize", title, done, report, memory_budget=memory_budget)
    if inplace:  # very last: other passes treat mutating nodes as impure
        gm = run_pass(gm, "reinplace_pointwise", title, done, report, donated=donated)
        gm = run_pass(gm, "plan_static_buffers", title, done, report, device=device, pool=buffers)
    return gm


def run_inductor_lowering(gm: GraphModule, title: str, report: PassReport | None = None) -> GraphModule:
    """Prepare an optimized step graph for inductor (run on a copy: the fx fallback keeps the original)."""
    done: list[str] = ["(graph pipeline)"]
    gm = run_pass(gm, "split_foreach_norms", title, done, report)  # inductor fuses per-tensor norms, not foreach
    gm = run_pass(gm, "opaque_bernoulli", title, done, report)  # inductor's bernoulli.p can be read before it is drawn
    gm = run_pass(gm, "thread_rng_order", title, done, report)  # itd replays: swaps and draws keep graph order
    return gm


__all__ = [
    "GRAPH_CHECKS",
    "GRAPH_PASSES",
    "MUTATING_PASSES",
    "PROGRAM_PASSES",
    "PassRecord",
    "PassReport",
    "cast_for_amp",
    "check_no_jacobians",
    "eliminate_common_subexpressions",
    "eliminate_dead_code",
    "enumerate_paths",
    "opaque_bernoulli",
    "order_vjps",
    "plan_static_buffers",
    "precision_policy",
    "reinplace_pointwise",
    "rematerialize",
    "run_check",
    "run_graph_pipeline",
    "run_inductor_lowering",
    "run_pass",
    "run_program_pass",
    "run_program_passes",
    "simplify_no_ops",
    "split_foreach_norms",
    "thread_rng_order",
]
