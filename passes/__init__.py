"""Compiler passes: the registry, the default pipelines and the verifying runner.

Program passes rewrite the ProgramGraph; graph passes rewrite one step's
GraphModule. After every graph pass the IR is verified (the IR may be invalid
during a pass, never after).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule

from mlocompile.errors import MLOError, PassError
from mlocompile.ir import verify
from mlocompile.program import ProgramGraph
from passes.cast_for_amp import cast_for_amp, precision_policy
from passes.eliminate_common_subexpressions import eliminate_common_subexpressions
from passes.eliminate_dead_code import eliminate_dead_code
from passes.enumerate_paths import enumerate_paths
from passes.order_vjps import check_no_jacobians, order_vjps
from passes.plan_static_buffers import BufferPool, plan_static_buffers
from passes.reinplace_pointwise import reinplace_pointwise
from passes.rematerialize import rematerialize
from passes.report import PassRecord, PassReport
from passes.simplify_no_ops import simplify_no_ops
from passes.split_foreach_norms import split_foreach_norms
from passes.thread_rng_order import thread_rng_order

GraphPass = Callable[..., GraphModule]
# Passes that write in place: only these (and passes after them) may leave mutation in the IR
MUTATING_PASSES = frozenset({"reinplace_pointwise", "plan_static_buffers"})
PROGRAM_PASSES: dict[str, Callable[[ProgramGraph], ProgramGraph]] = {
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
    "thread_rng_order": thread_rng_order,
}


def run_program_passes(program: ProgramGraph) -> ProgramGraph:
    """Run the program-level pipeline."""
    program = enumerate_paths(program)  # every u2l-then-l2u path, Betty's DFS order
    program = order_vjps(program)  # needs paths; plans right-to-left VJP chains with shared suffixes
    return program


def _count(gm: GraphModule) -> int:
    return len(gm.graph.nodes)


def run_pass(
    gm: GraphModule, name: str, title: str, done: list[str], report: PassReport | None, **options: Any
) -> GraphModule:
    """Run one registered graph pass, then verify; failures name the pass and its predecessors."""
    before, start = _count(gm), time.perf_counter()
    try:
        gm = GRAPH_PASSES[name](gm, **options)
        verify(gm, functional=not MUTATING_PASSES.intersection([*done, name]))
    except MLOError as exc:
        raise PassError(f"pass {name} on {title} (after {done or 'nothing'}) failed: {exc}") from exc
    if report is not None:
        report.records.append(PassRecord(title, name, before, _count(gm), time.perf_counter() - start))
    done.append(name)
    return gm


def run_graph_pipeline(
    gm: GraphModule,
    title: str,
    sizes: dict[str, int],
    report: PassReport | None = None,
    precision: str = "fp32",
    keep_fp32_methods: tuple[str, ...] = ("darts", "neumann", "cg", "itd"),
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
    verify(gm)
    check_no_jacobians(gm, sizes)  # the VJP ordering must never materialize a d_i x d_j tensor
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
    gm = run_pass(gm, "thread_rng_order", title, done, report)  # itd replays: swaps and draws keep graph order
    return gm


__all__ = [
    "GRAPH_PASSES",
    "cast_for_amp",
    "PROGRAM_PASSES",
    "PassReport",
    "check_no_jacobians",
    "eliminate_common_subexpressions",
    "eliminate_dead_code",
    "enumerate_paths",
    "rematerialize",
    "order_vjps",
    "plan_static_buffers",
    "reinplace_pointwise",
    "run_graph_pipeline",
    "run_inductor_lowering",
    "run_pass",
    "run_program_passes",
    "simplify_no_ops",
    "split_foreach_norms",
    "thread_rng_order",
]
