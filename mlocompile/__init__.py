"""mlocompile: gradient-based multilevel optimization as a graph-IR compiler over torch.fx.

The pipeline, in the order data flows:

1. ``Problem``/``Engine`` (Betty's API) declare problems and their u2l/l2u edges;
   ``program.build_program`` validates them into a typed ``ProgramGraph``.
2. Program passes (``passes.enumerate_paths``, ``passes.order_vjps``) find every
   hypergradient path and plan it as right-to-left VJP chains with shared suffixes.
3. ``step.build_step`` writes each problem's step (loss, gradients, best-response
   products from ``hypergrad``, functional optimizer update from ``optim``) as one
   pure function; ``trace.trace_step`` traces it with make_fx into an aten-level
   GraphModule annotated with ``mlo.*`` meta (``ir.META_KEYS``).
4. Graph passes (CSE, DCE, checks) run with verification after each one;
   ``codegen.StepExecutor`` runs the result with the eager, fx or inductor backend.
5. ``compile(engine)`` returns a ``CompiledProgram`` with ``.ir``, ``.code`` and
   ``.graph_modules``.
"""

from __future__ import annotations

from mlocompile.compiled import CompiledProgram
from mlocompile.config import Config, EngineConfig
from mlocompile.decorator import problem
from mlocompile.engine import Engine, compile
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
from mlocompile.problem import ImplicitProblem, IterativeProblem, Problem

__all__ = [
    "CheckpointError",
    "CliError",
    "CompiledProgram",
    "Config",
    "DistributedError",
    "Engine",
    "EngineConfig",
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
