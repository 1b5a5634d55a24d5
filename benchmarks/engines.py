"""Build a workload as a Betty 0.2.1 or an mlocompile ``Engine`` and run one cycle of it.

Porting between the two is a change of imports, so one builder serves both: it puts
each problem's loss mixin on top of the chosen library's ``ImplicitProblem``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from benchmarks.workloads import Program, Workload, build_program


def library(impl: str) -> SimpleNamespace:
    """Return the Engine/Config/problem classes of Betty or of mlocompile."""
    if impl == "betty":
        from betty.configs import Config, EngineConfig
        from betty.engine import Engine
        from betty.problems import ImplicitProblem, IterativeProblem

        return SimpleNamespace(
            name="betty",
            Engine=Engine,
            Config=Config,
            EngineConfig=EngineConfig,
            ImplicitProblem=ImplicitProblem,
            IterativeProblem=IterativeProblem,
            # strategy="cpu": Betty 0.2.1 would otherwise move everything to a GPU if one exists
            engine_kw={"strategy": "cpu"},
        )
    import mlocompile

    return SimpleNamespace(
        name="mlocompile",
        Engine=mlocompile.Engine,
        Config=mlocompile.Config,
        EngineConfig=mlocompile.EngineConfig,
        ImplicitProblem=mlocompile.ImplicitProblem,
        IterativeProblem=mlocompile.IterativeProblem,
        engine_kw={
            "compile": "fx" if impl == "fx_inplace" else impl,
            "in_place_updates": impl == "fx_inplace",
            "progress": False,
            "log_every": 0,
        },
    )


class EngineRunner:
    """One workload in one library; ``cycle()`` runs ``unroll`` global train steps."""

    def __init__(self, w: Workload, impl: str) -> None:
        self.workload, self.impl = w, impl
        self.program: Program = build_program(w)
        lib = library(impl)
        problems = {}
        for name, spec in self.program.problems.items():
            mixin = spec.betty_mixin if lib.name == "betty" and spec.betty_mixin else spec.mixin
            base = lib.IterativeProblem if spec.iterative else lib.ImplicitProblem
            cls = type(f"{lib.name}_{mixin.__name__}", (mixin, base), {})
            problems[name] = cls(
                name=name,
                config=lib.Config(**spec.config),
                module=spec.module,
                optimizer=spec.optimizer(spec.module),
                train_data_loader=spec.data,
            )
        deps = {
            "u2l": {problems[u]: [problems[x] for x in ls] for u, ls in self.program.u2l.items()},
            "l2u": {problems[lo]: [problems[x] for x in us] for lo, us in self.program.l2u.items()},
        }
        self.problems = problems
        self.engine: Any = lib.Engine(
            problems=list(problems.values()),
            dependencies=deps,
            config=lib.EngineConfig(train_iters=10**9, valid_step=10**9, **lib.engine_kw),
        )
        self.engine.train()

    def cycle(self) -> None:
        """Run one cycle: ``unroll`` lowest-level steps and the upper steps they trigger."""
        for _ in range(self.workload.unroll):
            self.engine.global_step += 1
            self.engine.train_step()
