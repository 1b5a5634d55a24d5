"""The Engine: wires problems, compiler, step runner (``execution``) and Betty's schedule into a run.

The Engine owns the run (loop, validation, early stopping, logging, distributed set-up)
and its state (``state_dict``); steps are ``execution``'s, when they happen ``schedule``'s.
"""

from __future__ import annotations

import copy
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mlocompile import checkpoint, compat, distributed
from mlocompile.compiled import CompiledProgram
from mlocompile.compiler import CompileOptions, Compiler
from mlocompile.config import EngineConfig
from mlocompile.dependencies import check_declared_relations, check_program, plan_program
from mlocompile.errors import CheckpointError, ProgramError
from mlocompile.execution import StepRunner
from mlocompile.functional import FunctionalProgram
from mlocompile.monitor import EarlyStopping, MetricsLogger, ProgressBar
from mlocompile.optim import StateDict, lower_optimizers
from mlocompile.problem import Problem, attach_problems
from mlocompile.schedule import Schedule
from mlocompile.schedulers import check_schedulers, step_after_update, step_on_validation
from mlocompile.transaction import Transaction

log = logging.getLogger("mlocompile")
HISTORY_LIMIT = 100_000  # records kept in Engine.history; output_dir's metric files keep them all


class Engine:
    """Runs a multilevel optimization program with Betty's schedule and semantics.

    Args:
        problems: the problems of the program (each with a unique name).
        config: schedule, validation and compilation settings.
        dependencies: ``{"u2l": {upper: [lowers]}, "l2u": {lower: [uppers]}}`` with
            problems or their names as keys and values.
        env: Betty's ``Env`` (``mlocompile.Env``): shared state the problems read as
            ``self.env`` and the user steps (e.g. from an overridden ``train_step``).
    """

    def __init__(
        self,
        problems: Sequence[Problem],
        config: EngineConfig | None = None,
        dependencies: Mapping[str, Mapping[Any, Sequence[Any]]] | None = None,
        env: Any = None,
    ) -> None:
        self.config = config if config is not None else EngineConfig()
        self.config.validate()
        self.problems = list(problems)
        self.env = env
        attach_problems(self.problems, self)
        self._warn_undeclared = dependencies is not None
        self.dependencies, self.program = plan_program(self.problems, dependencies)
        compat.check_betty_settings(self, Engine, self.program, self.config.strategy)
        check_declared_relations(self.program)
        self._attach_env()
        self.rank, self.world_size = 0, 1
        self._dist_ready = False
        self.global_step = 0
        self._checked = False
        self.fp = FunctionalProgram(self.program.problems)
        self.optimizers = lower_optimizers(self.program.problems)
        distributed = self.config.strategy == "distributed"
        check_schedulers(
            self.program.problems, self.is_implemented("validation"), self.config.early_stopping_metric, distributed
        )
        self.compiler = Compiler(self.fp, self.program, self.optimizers)
        opts = self.compile_options
        self.runner = StepRunner(self.program, self.fp, self.optimizers, self.compiler, opts, self.config.roll_back)
        self.schedule = Schedule(self.program, self.runner.start_window, self._step_once, self._redo)
        self.history: list[dict[str, Any]] = []
        self._metrics: MetricsLogger | None = None
        self.early_stopping = EarlyStopping.from_config(self.config)
        self._pending: list[dict[str, Any]] | None = None  # metric records of the open transaction
        self._torn: str | None = None  # why the state mixes two steps (a failed in-place update)
        self._stepping = False  # inside the schedule of a train_step (its state half updated)
        self._run_start: int | None = None  # global step at which the run in progress began
        self._history_dropped = 0  # oldest records dropped from history (still in the metric files)
        self.run_id: str | None = None  # names this engine's metrics in output_dir, once it writes any

    # -- Betty's surface: leaves, device, rank, env, set_dependency, Problem.step/log ------------
    @property
    def leaves(self) -> list[Problem]:
        """The problems with no problem below them; each ``train_step`` steps them (Betty)."""
        return [self.program.problems[n] for n in self.program.leaves]

    @property
    def device(self) -> torch.device:
        """The device the problems' modules are on (the first problem's, if they differ)."""
        return self.problems[0].device or torch.device("cpu")

    def is_rank_zero(self) -> bool:
        """Whether this process is rank 0 (always, without ``strategy="distributed"``)."""
        return self.rank == 0

    def _attach_env(self) -> None:
        """Betty's env set-up: configure it, make every problem an attribute of it, give it to the problems."""
        env = self.env
        if env is None:
            return
        strategy = self.config.strategy
        if strategy == "distributed":
            raise ProgramError(
                "an Env under EngineConfig(strategy='distributed') is not supported: the engine would not "
                "shard its data or synchronize it across ranks; give the problems train_data_loaders "
                "(sharded by the engine), or run one process"
            )
        for problem in self.problems:
            setattr(env, problem.name, problem)
        if callable(getattr(env, "configure_distributed_training", None)):
            env.configure_distributed_training(
                {"strategy": strategy, "backend": self.config.backend, "world_size": 1, "rank": 0, "local_rank": 0}
            )
        if callable(getattr(env, "configure_device", None)):
            env.configure_device(self.device)
        if callable(getattr(env, "initialize", None)):
            env.initialize()
        for problem in self.problems:
            if problem.env is None:
                problem.env = env

    def set_dependency(self, dependencies: Mapping[str, Mapping[Any, Sequence[Any]]]) -> None:
        """Replace the program's dependencies between steps (Betty's ``set_dependency``).

        The graph is parsed and validated again (edges, levels, paths, and, once
        training has begun, that every edge is used by a loss); steps traced for the
        old graph are not reused (the dependency structure is in the trace key).
        Local step counts, data positions and optimizer state carry on; readiness
        starts afresh for new children, and ``roll_back`` follows the new parents.

        Raises:
            ProgramError: an invalid graph (the old one stays), or a call inside a step.
        """
        if self._stepping:
            raise ProgramError("set_dependency() was called inside a train_step; call it between steps")
        deps, program = plan_program(self.problems, dependencies)
        if self._checked:  # otherwise the first step checks the new graph
            check_program(program, self.problems, True)
        self.dependencies, self.program = deps, program
        self._warn_undeclared = True
        self.compiler.set_program(program)
        self.runner.set_program(program, self.config.roll_back)
        self.schedule.set_program(program)

    def _check_training(self) -> None:
        evaluating = sorted(n for n, p in self.program.problems.items() if not p._training)
        if evaluating:
            raise ProgramError(
                f"problems {evaluating} are in evaluation mode (Problem.eval() or Engine.eval()) and cannot step "
                "(Betty would update them without counting the step); call engine.train() first"
            )

    def _step_problem(self, name: str, global_step: int | None) -> None:
        """``Problem.step``: one step of ``name`` in the schedule, all or nothing, checked first."""
        if global_step is not None and global_step != self.global_step:
            raise ProgramError(
                f"problem {name!r}.step(global_step={global_step}) but the engine is at global step "
                f"{self.global_step}; pass global_step=self.global_step (run() advances it) or leave it out"
            )
        with self.transaction():
            self._check_program()
            self._check_training()
            outer, self._stepping = self._stepping, True
            try:
                self.schedule.step(name)
            finally:
                self._stepping = outer

    def _log_problem(self, name: str, stats: Mapping[str, Any], global_step: int | None) -> None:
        """``Problem.log``: a record tagged ``name`` at ``global_step`` (default: the engine's) and its local step."""
        values = {k: float(v) if isinstance(v, (Tensor, int, float)) else v for k, v in stats.items()}
        step = self.global_step if global_step is None else global_step
        self._record({"tag": name, "step": step, "local_step": self.schedule.counters[name].count, **values})

    # -- public schedule ------------------------------------------------------------------
    def train_step(self) -> None:
        """Step every leaf problem once; uppers step when their children are ready (Betty).

        All or nothing: if anything raises (a non-finite step, user code, Ctrl-C), every
        parameter, buffer, optimizer, scheduler, data position, counter, window and random
        stream is put back as it was before the step, and the error propagates.
        """
        with self.transaction():
            self._check_program()
            self._check_training()
            self._stepping = True
            try:
                for leaf in self.program.leaves:
                    self.schedule.step(leaf)
            finally:
                self._stepping = False
            every = self.config.dist_check_every
            if self.world_size > 1 and every > 0 and self.global_step % every == 0:
                distributed.check_problems_identical(self.program.problems.values(), self.global_step)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the block as one step: on any exception, put the engine back as it was, then re-raise.

        Metric records of the block reach ``output_dir`` only when it completes. Nested
        blocks are part of the outer one.
        """
        if self._torn is not None:
            raise ProgramError(self._torn)
        if self._pending is not None:  # nested: the outer transaction decides
            yield
            return
        txn = Transaction(self.program.problems, self.runner, self.schedule)
        step, checked, n_history = self.global_step, self._checked, len(self.history)
        stopping = self.early_stopping.state_dict()
        self._pending = []
        try:
            yield
            self._write_records(self._pending)
            self._trim_history()
        except BaseException as exc:
            torn = txn.roll_back()
            self.global_step, self._checked = step, checked
            self.early_stopping.load_state_dict(stopping)
            del self.history[n_history:]
            if torn:
                self._torn = (
                    f"a step failed after problems {torn} had updated their parameters and optimizer state in "
                    "place (EngineConfig(in_place_updates=True)), so it could not be undone: load a checkpoint "
                    "(Engine.load) to continue, or leave in_place_updates off for all-or-nothing steps"
                )
                log.error("%s (%s: %s)", self._torn, type(exc).__name__, exc)
            raise
        finally:
            self._pending = None

    def _setup_distributed(self) -> None:
        if self.config.strategy == "distributed" and not self._dist_ready:
            self._dist_ready = True
            cfg = self.config
            self.rank, self.world_size = distributed.setup(
                cfg.backend, cfg.dist_timeout_s, self.program.problems.values()
            )

    def run(self) -> None:
        """Train ``train_iters`` global steps, with validation, early stopping and progress.

        As in Betty, each call trains ``train_iters`` more steps; a run cut short (an
        error, Ctrl-C) or saved mid-way and loaded continues to the end of that run.
        """
        self.train()
        if not self.is_implemented("train_step"):
            # NOTE: an overridden train_step may prepare data first (Betty's env.step()): the check
            # then runs at its first Problem.step, when the batches it looks at exist
            self._check_program()
        if self._run_start is None:
            self._run_start = self.global_step
        end = self._run_start + self.config.train_iters
        bar = ProgressBar(self.config.train_iters, self.config.progress and self.rank == 0)
        try:
            while self.global_step < end:
                with self.transaction():  # NOTE: a step and its validation: both or neither
                    self.global_step += 1
                    self.train_step()
                    bar.update(
                        self.global_step - self._run_start, {n: r.last_loss for n, r in self.runner.runs.items()}
                    )
                    stop = False
                    if self.global_step % self.config.valid_step == 0 and self.is_implemented("validation"):
                        bar.clear()
                        stop = self._validate() if self.rank == 0 else False
                        bar.validation(self.history[-1] if self.rank == 0 else {})  # the record _validate wrote
                        if self.world_size > 1:  # every rank must leave the loop together
                            stop = distributed.broadcast_flag(stop)
                if stop:
                    log.info("early stopping at global step %d", self.global_step)
                    break
            self._run_start = None  # this run is over: the next trains train_iters more
        finally:
            bar.close()
            self.train()

    def save(self, path: str) -> str:
        """Write a checkpoint atomically; ``load`` on an engine built the same way resumes exactly.

        Under ``strategy="distributed"`` rank 0 writes (ranks hold identical state) and
        the others wait for it; every rank can then ``load`` the file.
        """
        if self._torn is not None:
            raise CheckpointError(f"nothing saved to {path}: {self._torn}")
        if self._stepping:
            raise CheckpointError(
                f"nothing saved to {path}: save() was called inside a train_step, which would write a half-done "
                "step; save between steps (or from validation(), which runs after the step)"
            )
        if self.rank == 0:
            checkpoint.write(path, self.state_dict())
        if self.world_size > 1:
            dist.barrier()
        return path

    def load(self, path: str) -> None:
        """Restore a checkpoint written by ``save`` (weights, optimizer, schedule, data, RNG)."""
        self._setup_distributed()  # first: the saved data position is within this rank's shard
        state = checkpoint.read(path)
        self.load_state_dict(state)
        checkpoint.set_rng_state(state["rng"])  # last: restoring data iterators may draw random numbers

    @property
    def metrics(self) -> MetricsLogger | None:
        """The metric files writer (``EngineConfig.output_dir``), or None."""
        if self._metrics is None and self.config.output_dir and self.rank == 0:
            if self.run_id is None:
                self.run_id = uuid.uuid4().hex  # NOTE: from os.urandom, not from the random streams a run uses
            local = frozenset(n for n, p in self.program.problems.items() if p.config.log_local_step)
            self._metrics = MetricsLogger.for_run(
                self.config.output_dir,
                self.run_id,
                self.history,
                self.config.logger_type,
                keep=self._history_dropped,
                local_step_tags=local,
            )
        return self._metrics

    def _record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self._pending is not None:
            self._pending.append(record)  # written when the step completes
        else:
            self._write_records([record])
            self._trim_history()

    def _trim_history(self) -> None:
        """Keep ``history`` within ``HISTORY_LIMIT`` records, dropping the oldest (warned once)."""
        extra = len(self.history) - HISTORY_LIMIT
        if extra <= 0:
            return
        extra = max(extra, HISTORY_LIMIT // 10)  # NOTE: in chunks, so a long run pays O(1) per record
        if self._history_dropped == 0:
            log.warning(
                "Engine.history keeps the last %d records; older ones are dropped from memory (and from checkpoints)%s",
                HISTORY_LIMIT - HISTORY_LIMIT // 10,
                "; the metric files in output_dir keep all of them" if self.config.output_dir else "",
            )
        del self.history[:extra]
        self._history_dropped += extra

    def _write_records(self, records: list[dict[str, Any]]) -> None:
        """Append the latest ``records`` of ``history`` to the metric files."""
        opened = self._metrics is not None
        logger = self.metrics  # NOTE: opening the files writes the whole history, these records included
        if logger is not None and opened:
            for record in records:
                logger.log(record)

    def validation(self) -> dict[str, Any] | None:  # pragma: no cover - user override
        """Override to return validation metrics; runs every ``valid_step`` steps."""
        return None

    def is_implemented(self, name: str) -> bool:
        """Return whether the user overrode ``name`` (e.g. ``validation``)."""
        return getattr(type(self), name, None) is not getattr(Engine, name, None)

    def train(self) -> None:
        """Put every problem (and its module) in training mode."""
        for problem in self.program.problems.values():
            problem.train()

    def eval(self) -> None:
        """Put every problem (and its module) in evaluation mode."""
        for problem in self.program.problems.values():
            problem.eval()

    def _validate(self) -> bool:
        self.eval()
        stats = self.validation() or {}  # NOTE: grad mode as the user has it (Betty); MAML adapts here
        self.train()
        stats = {k: float(v) if isinstance(v, (Tensor, int, float)) else v for k, v in stats.items()}
        step_on_validation(
            self.program.problems, stats, self.config.early_stopping_metric, f"at global step {self.global_step}"
        )
        self._record({"tag": "validation", "step": self.global_step, **stats})
        log.info("[validation] step %d %s", self.global_step, stats)
        return self.config.early_stopping and self.early_stopping.update(stats)

    # -- what the schedule's steps do ------------------------------------------------------------
    def _step_once(self, name: str, update: bool) -> None:
        problem = self.program.problems[name]
        batch = problem.cur_batch = problem.get_batch()
        self.runner.record(name, batch)
        self._execute(name, batch, update)
        if not self.runner.runs[name].roll_back:
            step_after_update(problem)

    def _redo(self, name: str) -> bool:
        run, problem = self.runner.runs[name], self.program.problems[name]
        if not (run.roll_back and run.cache is not None):
            return False
        self.runner.restore(name, run.cache)
        self._execute(name, problem.cur_batch, True)
        step_after_update(problem)
        return True

    def _execute(self, name: str, batch: Any, update: bool) -> None:
        count = self.schedule.counters[name].count
        where = f"at global step {self.global_step} (local step {count})"
        result = self.runner.run(name, batch, update, where, self.config.check_finite)
        problem = self.program.problems[name]
        every = problem.config.log_step if problem.config.log_step > 0 else self.config.log_every
        if not result.skipped and every > 0 and count % every == 0:
            record = {"tag": name, "step": self.global_step, "local_step": count, "loss": result.loss, **result.logs}
            self._record(record)
            log.info("[%s] step %d local %d %s", name, self.global_step, count, record)

    def compile_options(self) -> CompileOptions:
        """How steps are compiled now (``EngineConfig`` may be edited between steps)."""
        return CompileOptions.from_config(self.config, self.world_size, self.program.problems)

    # -- compilation support ---------------------------------------------------------------------
    def peek_batch(self, name: str) -> Any:
        """Return problem ``name``'s last batch, or its next one without consuming data or RNG."""
        return self.program.problems[name].peek_batch()

    def step_inputs(self, name: str, batch: Any, acc: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """Gather the explicit inputs of ``name``'s step from the live objects."""
        return self.runner.inputs(name, batch, acc)

    def _check_program(self) -> None:
        """Check, before the first step, that every declared dependency is used by a loss."""
        if self._checked:
            return
        self._setup_distributed()
        with self.transaction():  # the first windows start here: hooks run, counters move
            for name, problem in self.program.problems.items():
                if problem.is_implemented("on_inner_loop_start") and self.schedule.counters[name].loop_start:
                    self.schedule.start_loop(name)
            check_program(self.program, self.problems, self._warn_undeclared)
            self._checked = True

    def compile(self) -> CompiledProgram:
        """Trace every problem's step now (normally done lazily) and return the CompiledProgram."""
        self._check_program()
        for name in self.program.problems:
            inputs = self.step_inputs(name, self.peek_batch(name))  # NOTE: also under "eager": inputs must gather
            if self.config.compile != "eager":
                self.compiler.trace_all(name, inputs, self.compile_options())
        return self.compiler.snapshot()

    def gradients(self, name: str, batch: Any = None) -> dict[str, Tensor]:
        """Return problem ``name``'s full gradient (direct + hypergradients) without stepping.

        Uses the compiled backend, ``batch`` (default: the problem's last batch, or
        the next one without consuming it) and the lower problems' last batches and
        unroll windows, exactly as ``name``'s next update would.
        """
        self._check_program()
        return self.runner.gradients(name, self.peek_batch(name) if batch is None else batch)

    # -- state ----------------------------------------------------------------------------------
    def optimizer_state(self, name: str) -> StateDict:
        """Return problem ``name``'s optimizer state as the step sees it."""
        return self.optimizers[name].read_state()

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, as plain data: weights, buffers, optimizer and scheduler
        state, data positions, schedule counters, unroll windows, early stopping and history."""
        problems = {
            name: {**p.state_dict(), "functional_optimizer": self.optimizers[name].state_dict()}
            for name, p in self.program.problems.items()
        }
        return {
            "global_step": self.global_step,
            "problems": problems,
            "schedule": self.schedule.state_dict(),
            "runs": self.runner.state_dict(),
            "checked": self._checked,
            "early_stopping": self.early_stopping.state_dict(),
            "history": list(self.history),
            "run": {"id": self.run_id, "start": self._run_start, "history_dropped": self._history_dropped},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned, into an engine built the same way; all or nothing.

        Raises:
            CheckpointError: naming the first mismatch (problems, parameter and buffer names, shapes
                and dtypes, optimizer and scheduler kinds, schedule, unroll windows); nothing changed.
        """
        saved, mine = sorted(state.get("problems", {})), sorted(self.program.problems)
        if saved != mine:
            raise CheckpointError(f"checkpoint problems {saved} differ from the engine's {mine}; build it the same way")
        for name, p in self.program.problems.items():
            p.check_state_dict(state["problems"][name])
        self.schedule.check_state_dict(state.get("schedule", {}))
        self.runner.check_state_dict(state.get("runs", {}))
        before = copy.deepcopy(self.state_dict())
        try:
            self._apply_state(state)
        except BaseException:
            self._apply_state(before)  # NOTE: a failure half-way leaves the engine as it was
            raise

    def _apply_state(self, state: dict[str, Any]) -> None:
        for name, p in self.program.problems.items():
            p.load_state_dict(state["problems"][name])
            self.optimizers[name].load_state_dict(state["problems"][name]["functional_optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.runner.load_state_dict(state["runs"])
        self._checked = state["checked"]
        self._torn = None
        self.global_step = state["global_step"]
        self.early_stopping.load_state_dict(state["early_stopping"])
        self.history = list(state["history"])
        self.run_id, self._run_start = state["run"]["id"], state["run"]["start"]
        self._history_dropped = state["run"]["history_dropped"]
        if self._metrics is not None:  # rewritten from the restored history when next needed
            self._metrics.close()
            self._metrics = None
