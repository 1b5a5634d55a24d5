"""mlocompile: gradient-based multilevel optimization as a graph-IR compiler over torch.fx.

The pipeline, in the order data flows:

1. ``Problem``/``Engine`` (Betty's API) declare problems and their u2l/l2u edges;
   ``program.build_program`` validates them into a typed ``ProgramGraph``.
2. Program passes (``passes.enumerate_paths``, ``passes.order_vjps``) find every
   hypergradient path and plan it as right-to-left VJP chains with shared suffixes.
3. ``step.build_step`` writes each problem's step (loss, gradients, best-response
   products from the method rules in ``hypergrad``, functional optimizer update from
   ``optim``) as one pure function; ``trace.trace_step`` traces it with make_fx over
   functionalization into an aten-level GraphModule annotated with ``mlo.*`` meta.
4. ``compiler.Compiler`` runs the graph pipeline (``passes``: simplification, CSE, DCE,
   AMP casts, rematerialization, reinplacing, buffer planning; verified after each
   pass) and hands the result to a backend (``backends``: the direct fx runner or
   inductor), caching it under a key of everything the trace read.
5. ``execution.StepRunner`` runs a step against the user's live modules and
   optimizers; ``schedule.Schedule`` decides when each problem steps (Betty's
   schedule); ``transaction.Transaction`` makes each ``train_step`` all or nothing;
   ``engine.Engine`` wires them together.
6. ``compile(engine)`` returns a ``CompiledProgram`` (plain data) with ``.ir``,
   ``.code``, ``.graph_modules``, diagrams (``viz``) and cost estimates (``cost``).

Layers (``LAYERS``, lowest first): a module imports only from layers below its own,
never from its own layer or above (``tests/test_layering.py`` checks this, and that
every module imports cleanly first and in any order). This file is the top: it loads
the engine and compiled program lazily, so importing a lower module never runs the
layers above it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mlocompile.config import Config, EngineConfig
from mlocompile.decorator import problem
from mlocompile.env import Env
from mlocompile.errors import (
    CheckpointError,
    CliError,
    DistributedError,
    IRVerificationError,
    MLOError,
    NonFiniteError,
    PassError,
    ProgramError,
    RenderError,
    TraceError,
)
from mlocompile.problem import HigherIterativeProblem, ImplicitProblem, IterativeProblem, Problem

if TYPE_CHECKING:
    from mlocompile.compiled import CompiledProgram
    from mlocompile.engine import Engine

# NOTE: the top layers load on first use, so importing a lower module (``passes``,
# ``mlocompile.ir``) runs this file without pulling in the engine that imports them
_LAZY = {"CompiledProgram": "mlocompile.compiled", "Engine": "mlocompile.engine"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mlocompile' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def compile(engine: Engine) -> CompiledProgram:
    """Trace and optimize every step of ``engine`` now; return what was emitted."""
    return engine.compile()


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "foundations",
        ("errors", "symbols", "analysis", "rng", "regions", "backends", "optim_rules", "symbolic", "passes.report"),
    ),
    ("settings, IR, tools", ("config", "ir", "optim", "schedulers", "distributed", "monitor", "checkpoint")),
    ("data cursors", ("data",)),
    ("problems", ("problem", "env")),
    ("problems as functions", ("functional", "decorator")),
    ("hypergradient methods", ("hypergrad",)),
    ("program graph", ("program",)),
    (
        "steps, schedule, passes, views",
        (
            "step",
            "schedule",
            "compat",
            "viz",
            "cost",
            "passes.cast_for_amp",
            "passes.eliminate_common_subexpressions",
            "passes.eliminate_dead_code",
            "passes.enumerate_paths",
            "passes.opaque_bernoulli",
            "passes.order_vjps",
            "passes.plan_static_buffers",
            "passes.reinplace_pointwise",
            "passes.rematerialize",
            "passes.simplify_no_ops",
            "passes.split_foreach_norms",
            "passes.thread_rng_order",
        ),
    ),
    ("tracing, pass pipeline, compiled output", ("trace", "passes", "compiled")),
    ("compiler, dependency checks", ("compiler", "dependencies")),
    ("running a step", ("execution",)),
    ("a step as a transaction", ("transaction",)),
    ("the engine", ("engine",)),
    ("public API", ("mlocompile",)),
    ("command line", ("__main__",)),
)

__all__ = [
    "CheckpointError",
    "CliError",
    "CompiledProgram",
    "Config",
    "DistributedError",
    "Engine",
    "EngineConfig",
    "Env",
    "HigherIterativeProblem",
    "IRVerificationError",
    "ImplicitProblem",
    "IterativeProblem",
    "MLOError",
    "NonFiniteError",
    "PassError",
    "Problem",
    "ProgramError",
    "RenderError",
    "TraceError",
    "compile",
    "problem",
]
