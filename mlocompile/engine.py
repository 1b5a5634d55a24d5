"""The Engine: Betty's schedule over compiled per-problem steps, with state write-back.

The user's ``module`` and ``optimizer`` objects are the source of truth: each step
reads their tensors (aliases, no copies), runs the compiled step and points them at
the results, so after (or during) training they hold the current parameters and
optimizer state and ``torch.save`` works as usual.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mlocompile import checkpoint, distributed
from mlocompile.codegen import StepExecutor
from mlocompile.compiled import CompiledProgram
from mlocompile.config import EngineConfig
from mlocompile.decorator import declared_levels, find_all_uses, infer_dependencies, warn_undeclared_uses
from mlocompile.errors import NonFiniteError, ProgramError
from mlocompile.functional import FunctionalProgram
from mlocompile.monitor import MetricsLogger, ProgressBar
from mlocompile.optim import FunctionalOptimizer, StateDict, lower_optimizer
from mlocompile.problem import Problem
from mlocompile.program import ProgramGraph, build_program
from mlocompile.rng import record_rng_states, rng_devices
from mlocompile.step import StepVariant, needed_batches, needed_windows

log = logging.getLogger("mlocompile")


@dataclass
class _Runtime:
    """Schedule state of one problem (Betty's counters and flags)."""

    count: int = 0
    ready: dict[str, bool] = field(default_factory=dict)
    loop_start: bool = True
    roll_back: bool = False
    cache: dict[str, Any] | None = None
    window: dict[str, Any] | None = None
    acc: dict[str, Tensor] = field(default_factory=dict)
    last_loss: float = float("nan")
    scale: float = 0.0  # fp16 dynamic loss scale (0: not fp16)
    good_steps: int = 0
    skipped_steps: int = 0


class Engine:
    """Runs a multilevel optimization program with Betty's schedule and semantics.

    Args:
        problems: the problems of the program (each with a unique name).
        config: schedule, validation and compilation settings.
        dependencies: ``{"u2l": {upper: [lowers]}, "l2u": {lower: [uppers]}}`` with
            problems or their names as keys and values.
        env: unused; accepted for Betty compatibility (reinforcement-learning envs).
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
        self._attach_problems()
        from passes import run_program_passes  # NOTE: lazily: passes imports mlocompile

        explicit = dependencies is not None
        self.dependencies = (
            dependencies
            if dependencies is not None
            else infer_dependencies(self.problems, eager=self.config.compile == "eager")
        )
        self.program: ProgramGraph = run_program_passes(
            build_program(self.problems, self.dependencies, declared_levels(self.problems) or None)
        )
        self._warn_undeclared = explicit
        self.rank, self.world_size = 0, 1
        self._dist_ready = False
        self.global_step = 0
        self._checked = False
        self.fp = FunctionalProgram(self.program.problems)
        self.optimizers = {n: self._lower(p) for n, p in self.program.problems.items()}
        self.executor = StepExecutor(self.fp, self.program, self.optimizers, self.config.compile)
        self.executor.memory_budget = self.config.memory_budget
        # roll_back caches keep old parameters: then updates must not overwrite them (itd: see _donated)
        self.executor.donate = not self.config.roll_back
        self._run = {n: _Runtime(ready={c: False for c in self.program.children(n)}) for n in self.program.problems}
        for name, problem in self.program.problems.items():
            self._run[name].roll_back = self.config.roll_back and bool(self.program.parents(name))
            if problem.config.precision == "fp16":
                self._run[name].scale = problem.config.initial_dynamic_scale
        self.history: list[dict[str, Any]] = []
        self._metrics: MetricsLogger | None = None
        self.early_stopping_best: float | None = None
        self.early_stopping_counter = 0

    # -- set-up -------------------------------------------------------------------------
    def _attach_problems(self) -> None:
        for p in self.problems:
            if not isinstance(p, Problem):
                raise ProgramError(f"problems must be Problem instances, got {type(p).__name__}")
        names = [p.name for p in self.problems]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ProgramError(f"two problems are named {dupes[0]!r}; problem names must be unique")
        for problem in self.problems:
            name = problem.name
            if problem.module is None and problem.is_implemented("configure_module"):
                problem.module = problem.configure_module()  # type: ignore[attr-defined]
            if problem.module is not None and any(isinstance(m, nn.SyncBatchNorm) for m in problem.module.modules()):
                raise ProgramError(
                    f"problem {name!r}: nn.SyncBatchNorm is not supported (its statistics all-reduce is not "
                    "traced into the step); use nn.BatchNorm1d/2d/3d: under strategy='distributed' each rank "
                    "then normalizes with its own shard's batch statistics"
                )
            if problem.optimizer is None and problem.is_implemented("configure_optimizer"):
                problem.optimizer = problem.configure_optimizer()  # type: ignore[attr-defined]
            if problem.scheduler is None and problem.is_implemented("configure_scheduler"):
                problem.scheduler = problem.configure_scheduler()  # type: ignore[attr-defined]
            if hasattr(type(self), name) or name in vars(self):
                raise ProgramError(f"problem name {name!r} clashes with an Engine attribute; rename the problem")
            setattr(self, name, problem)
            problem._peers = tuple(n for n in names if n != name)
            for other in self.problems:
                if other is not problem:
                    if hasattr(type(other), name):
                        raise ProgramError(
                            f"problem name {name!r} clashes with an attribute of {other.name!r}; rename it"
                        )
                    setattr(other, name, problem)

    def _lower(self, problem: Problem) -> FunctionalOptimizer:
        if problem.module is None:
            raise ProgramError(f"problem {problem.name!r} has no module; pass module=... or define configure_module()")
        if problem.optimizer is None:
            raise ProgramError(
                f"problem {problem.name!r} has no optimizer; pass optimizer=torch.optim.SGD(...) or similar"
            )
        return lower_optimizer(problem.optimizer, problem.named_trainable_parameters())

    # -- public schedule ------------------------------------------------------------------
    def train_step(self) -> None:
        """Step every leaf problem once; uppers step when their children are ready (Betty)."""
        self._check_program()
        for leaf in self.program.leaves:
            self._step(leaf)
        every = self.config.dist_check_every
        if self.world_size > 1 and every > 0 and self.global_step % every == 0:
            tensors = {
                n: [t for p in prob.trainable_parameters() for t in (p, *self._opt_tensors(prob, p))]
                for n, prob in self.program.problems.items()
            }
            distributed.check_identical(tensors, self.global_step)

    @staticmethod
    def _opt_tensors(problem: Problem, param: Tensor) -> list[Tensor]:
        assert problem.optimizer is not None
        return [v for v in problem.optimizer.state.get(param, {}).values() if isinstance(v, Tensor)]

    def _setup_distributed(self) -> None:
        if self.config.strategy != "distributed" or self._dist_ready:
            return
        self._dist_ready = True
        self.rank, self.world_size = distributed.init_process_group(self.config.backend, self.config.dist_timeout_s)
        if self.world_size == 1:
            return
        distributed.broadcast_parameters(p.module for p in self.program.problems.values() if p.module is not None)
        for problem in self.program.problems.values():
            problem.train_data_loader = distributed.shard_loader(problem._loaders(), self.rank, self.world_size)
            if len(problem.train_data_loader) == 1:
                problem.train_data_loader = problem.train_data_loader[0]
            problem._iterators = None
        self.executor.world_size = self.world_size

    def run(self) -> None:
        """Train until ``train_iters`` global steps, with validation, early stopping and progress.

        A resumed engine (``load``) continues from its saved global step.
        """
        self.train()
        self._check_program()
        bar = ProgressBar(self.config.train_iters, self.config.progress and self.rank == 0)
        try:
            while self.global_step < self.config.train_iters:
                self.global_step += 1
                self.train_step()
                bar.update(self.global_step, {n: r.last_loss for n, r in self._run.items()})
                if self.global_step % self.config.valid_step == 0 and self.is_implemented("validation"):
                    bar.clear()
                    stop = self._validate() if self.rank == 0 else False
                    if self.world_size > 1:  # every rank must leave the loop together
                        stop = distributed.broadcast_flag(stop)
                    if stop:
                        log.info("early stopping at global step %d", self.global_step)
                        break
        finally:
            bar.close()
            self.train()

    def save(self, path: str) -> str:
        """Write a checkpoint atomically; ``load`` on an engine built the same way resumes exactly.

        Under ``strategy="distributed"`` rank 0 writes (ranks hold identical state) and
        the others wait for it; every rank can then ``load`` the file.
        """
        if self.rank == 0:
            checkpoint.save(self, path)
        if self.world_size > 1:
            dist.barrier()
        return path

    def load(self, path: str) -> None:
        """Restore a checkpoint written by ``save`` (weights, optimizer, schedule, data, RNG)."""
        self._setup_distributed()  # first: the saved data position is within this rank's shard
        checkpoint.load(self, path)

    @property
    def metrics(self) -> MetricsLogger | None:
        """The metric files writer (``EngineConfig.output_dir``), or None."""
        if self._metrics is None and self.config.output_dir and self.rank == 0:
            self._metrics = MetricsLogger(self.config.output_dir, tensorboard=self.config.logger_type == "tensorboard")
        return self._metrics

    def _record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.metrics is not None:
            self.metrics.log(record)

    def validation(self) -> dict[str, Any] | None:  # pragma: no cover - user override
        """Override to return validation metrics; runs every ``valid_step`` steps."""
        return None

    def is_implemented(self, name: str) -> bool:
        """Return whether the user overrode ``name`` (e.g. ``validation``)."""
        return getattr(type(self), name, None) is not getattr(Engine, name, None)

    def train(self) -> None:
        """Put every module in training mode."""
        for problem in self.program.problems.values():
            if problem.module is not None:
                problem.module.train()

    def eval(self) -> None:
        """Put every module in evaluation mode."""
        for problem in self.program.problems.values():
            if problem.module is not None:
                problem.module.eval()

    def _validate(self) -> bool:
        self.eval()
        stats = self.validation() or {}  # NOTE: grad mode as the user has it (Betty); MAML adapts here
        self.train()
        stats = {k: float(v) if isinstance(v, (Tensor, int, float)) else v for k, v in stats.items()}
        self._record({"tag": "validation", "step": self.global_step, **stats})
        log.info("[validation] step %d %s", self.global_step, stats)
        if not self.config.early_stopping:
            return False
        metric = self.config.early_stopping_metric
        if metric not in stats:
            raise ProgramError(f"early_stopping_metric={metric!r} is not in validation()'s result {sorted(stats)}")
        score = float(stats[metric])
        better = self.early_stopping_best is None or (
            score < self.early_stopping_best
            if self.config.early_stopping_mode == "min"
            else score > self.early_stopping_best
        )
        if better:
            self.early_stopping_best, self.early_stopping_counter = score, 0
        else:
            self.early_stopping_counter += 1
        return self.early_stopping_counter >= self.config.early_stopping_tolerance

    # -- Betty's recursive schedule ----------------------------------------------------------
    def _step(self, name: str) -> None:
        run, cfg = self._run[name], self.program.problems[name].config
        self._step_normal(name)
        if run.count % (cfg.unroll_steps * cfg.gradient_accumulation) == 0 and run.count > cfg.warmup_steps:
            self._step_after_roll_back(name)

    def _step_normal(self, name: str) -> None:
        run, problem = self._run[name], self.program.problems[name]
        cfg = problem.config
        if not all(run.ready.values()):
            return
        if run.loop_start:
            self._start_loop(name)
        run.count += 1
        batch = problem.cur_batch = problem.get_batch()
        if run.window is not None:
            run.window["hypers"].append(self.optimizers[name].hyperparameters())
            run.window["batches"].append(batch)
            run.window["others"].append(self.fp.read_params())
            run.window["rng"].append(record_rng_states(self._rng_devices(name)))  # replayed draws = live draws
        update = run.count % cfg.gradient_accumulation == 0
        self._execute(name, batch, update)
        if problem.scheduler is not None and not run.roll_back:
            problem.scheduler.step()
        if run.count % (cfg.unroll_steps * cfg.gradient_accumulation) == 0 and run.count > cfg.warmup_steps:
            for parent in self.program.parents(name):
                self._run[parent].ready[name] = True
                self._step_normal(parent)
            run.loop_start = True
        run.ready = dict.fromkeys(run.ready, False)

    def _step_after_roll_back(self, name: str) -> None:
        run, problem = self._run[name], self.program.problems[name]
        if not all(run.ready.values()):
            return
        if run.roll_back and run.cache is not None:
            self._restore(name, run.cache)
            self._execute(name, problem.cur_batch, True)
            if problem.scheduler is not None:
                problem.scheduler.step()
            for parent in self.program.parents(name):
                self._run[parent].ready[name] = True
                self._step_after_roll_back(parent)
        run.ready = dict.fromkeys(run.ready, False)

    def _start_loop(self, name: str) -> None:
        run, problem = self._run[name], self.program.problems[name]
        if problem.is_implemented("on_inner_loop_start"):
            problem.on_inner_loop_start()  # type: ignore[attr-defined]
            if problem._init_source is not None:
                self.executor.init_sources[name] = problem._init_source.name
        run.loop_start = False
        if run.roll_back or problem.config.type == "itd":
            snapshot = self._snapshot(name)
            run.cache = snapshot if run.roll_back else None
            if problem.config.type == "itd":
                run.window = {**snapshot, "hypers": [], "batches": [], "others": [], "rng": []}

    def _snapshot(self, name: str) -> dict[str, Any]:
        # NOTE: steps are pure (new tensors each step), so params/state alias safely;
        # buffers may be updated in place by modules (BatchNorm), so they are cloned.
        return {
            "params": self.fp.read_params()[name],
            "buffers": {k: b.clone() for k, b in self.fp.read_buffers()[name].items()},
            "opt_state": self.optimizers[name].read_state(),
        }

    def _restore(self, name: str, snap: dict[str, Any]) -> None:
        problem = self.program.problems[name]
        for key, param in self.fp.named_params()[name].items():
            param.data = snap["params"][key]
        assert problem.module is not None
        for key, buf in problem.module.named_buffers():
            buf.copy_(snap["buffers"][key])
        self.optimizers[name].write_state(snap["opt_state"])

    # -- one compiled step ---------------------------------------------------------------------
    def step_inputs(self, name: str, batch: Any, acc: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """Gather the explicit inputs of ``name``'s step from the live objects."""
        opt = self.optimizers[name]
        windows: dict[str, Any] = {}
        for q in needed_windows(self.program, name):
            win = self._run[q].window
            windows[q] = win if win is not None and win["batches"] else self._fresh_window(q)
        inputs: dict[str, Any] = {
            "params": self.fp.read_params(),
            "buffers": self.fp.read_buffers(),
            "batch": batch,
            "last": {q: self._current_batch(q) for q in needed_batches(self.program, name)},
            "opt": opt.read_state(),
            "hyper": opt.hyperparameters(),
            "acc": dict(acc or {}),
            "windows": windows,
        }
        if self._run[name].scale:
            inputs["scale"] = torch.tensor(self._run[name].scale, dtype=torch.float32)
        return inputs

    def _execute(self, name: str, batch: Any, update: bool) -> None:
        run, problem = self._run[name], self.program.problems[name]
        self._sync_executor()
        out = self.executor.run(StepVariant(name, update), self.step_inputs(name, batch, run.acc))
        loss = float(out["loss"])
        if "found_inf" in out and self._update_scale(name, bool(out["found_inf"])):
            self._write_buffers(out["buffers"])  # as with GradScaler: the forward happened, the update did not
            return  # fp16 overflow: the step was skipped inside the graph and the scale backed off
        if self.config.check_finite and not (math.isfinite(loss) and math.isfinite(float(out["grad_norm"]))):
            raise NonFiniteError(
                f"problem {name!r} at global step {self.global_step} (local step {run.count}): "
                f"loss={loss}, gradient norm={float(out['grad_norm'])}; lower the learning rate, clip gradients "
                "(Config(gradient_clipping=...)) or check the data"
            )
        self._write_buffers(out["buffers"])
        run.last_loss = loss
        if update:
            for key, param in self.fp.named_params()[name].items():
                param.data = out["params"][key]
            self.optimizers[name].write_state(out["opt"])
            # NOTE: LR schedulers check this flag (set by optimizer.step) to warn about call order
            problem.optimizer._opt_called = True  # type: ignore[union-attr]
            run.acc = {}
        else:
            run.acc = out["acc"]
        every = problem.config.log_step if problem.config.log_step > 0 else self.config.log_every
        if every > 0 and run.count % every == 0:
            record = {"tag": name, "step": self.global_step, "local_step": run.count, "loss": loss}
            record.update({k: float(v) for k, v in out["logs"].items()})
            self._record(record)
            log.info("[%s] step %d local %d %s", name, self.global_step, run.count, record)

    def _sync_executor(self) -> None:
        # NOTE: EngineConfig may be edited between steps; the executor's cache key covers these
        self.executor.backend = self.config.compile
        self.executor.memory_budget = self.config.memory_budget

    def _write_buffers(self, new: dict[str, dict[str, Tensor]]) -> None:
        """Copy a step's buffers (running statistics after its forward) into the user's modules, in place."""
        if not new:
            return
        live = self.fp.read_buffers()
        with torch.no_grad():
            for prob, tensors in new.items():
                for key, value in tensors.items():
                    live[prob][key].copy_(value)

    def _update_scale(self, name: str, found_inf: bool) -> bool:
        """GradScaler's rule: halve on overflow, grow by scale_factor after a run of good steps."""
        run, cfg = self._run[name], self.program.problems[name].config
        if found_inf:
            run.scale *= 0.5
            run.good_steps = 0
            run.skipped_steps += 1
            log.warning(
                "problem %r: fp16 overflow at global step %d; step skipped, loss scale now %g",
                name,
                self.global_step,
                run.scale,
            )
            return True
        run.good_steps += 1
        if run.good_steps >= cfg.scale_growth_interval:
            run.scale *= cfg.scale_factor
            run.good_steps = 0
        return False

    # -- compilation support ---------------------------------------------------------------------
    def _current_batch(self, name: str) -> Any:
        return self.program.problems[name].peek_batch()

    def peek_batch(self, name: str) -> Any:
        """Return problem ``name``'s last batch, or its next one without consuming data or RNG."""
        return self.program.problems[name].peek_batch()

    def _fresh_window(self, name: str) -> dict[str, Any]:
        snap = self._snapshot(name)
        k = self.program.problems[name].config.unroll_steps
        hyper = self.optimizers[name].hyperparameters()
        others = self.fp.read_params()
        rng = record_rng_states(self._rng_devices(name))
        batches = [self._current_batch(name)] * k
        return {**snap, "hypers": [hyper] * k, "batches": batches, "others": [others] * k, "rng": [rng] * k}

    def _rng_devices(self, name: str) -> list[str]:
        return rng_devices(list(self.fp.read_params()[name].values()))

    def _check_program(self) -> None:
        """Check, before the first step, that every declared dependency is used by a loss."""
        if self._checked:
            return
        self._setup_distributed()
        for name, problem in self.program.problems.items():
            if problem.is_implemented("on_inner_loop_start") and self._run[name].loop_start:
                self._start_loop(name)
        uses = find_all_uses(self.problems, eager=self.config.compile == "eager")
        if self._warn_undeclared:
            declared = {(u, v) for kind in ("u2l", "l2u") for u, v in self.program.edges(kind)}
            warn_undeclared_uses(uses, declared)
        for upper, lower in self.program.edges("u2l"):
            init = self.program.problems[lower]._init_source
            via = [
                tag
                for tag, hit in (("loss", upper in uses[lower]), ("init", init is not None and init.name == upper))
                if hit
            ]
            self.program.graph.edges[upper, lower, "u2l"]["via"] = "+".join(via) or "none"
            if not via:
                raise ProgramError(
                    f"u2l edge {upper} -> {lower}: the training_step of {lower!r} never uses {upper!r}'s parameters, "
                    f"so {upper!r}'s hypergradient would be zero; call self.{upper}(...) in {lower!r}'s loss, "
                    f"start {lower!r} from it with self.load_parameters_from(self.{upper}) in on_inner_loop_start, "
                    "or remove the edge"
                )
        for lower, upper in self.program.edges("l2u"):
            if lower not in uses[upper]:
                raise ProgramError(
                    f"l2u edge {lower} -> {upper}: the training_step of {upper!r} never uses {lower!r}'s parameters; "
                    f"call self.{lower}(...) in {upper!r}'s loss or remove the edge"
                )
        self._checked = True

    def compile(self) -> CompiledProgram:
        """Trace every problem's step now (normally done lazily) and return the CompiledProgram."""
        self._check_program()
        for name in self.program.problems:
            variants = [True] if self.program.problems[name].config.gradient_accumulation == 1 else [False, True]
            for update in variants:
                inputs = self.step_inputs(name, self._current_batch(name))
                if self.config.compile == "eager":
                    continue
                self.executor.traced(StepVariant(name, update), inputs)
        latest = self.executor.latest
        graphs = {title: latest[title].gm for title in sorted(latest)}
        return CompiledProgram(self.program, graphs, self.executor.report)

    def gradients(self, name: str, batch: Any = None) -> dict[str, Tensor]:
        """Return problem ``name``'s full gradient (direct + hypergradients) without stepping.

        Uses the compiled backend, ``batch`` (default: the problem's last batch, or
        the next one without consuming it) and the lower problems' last batches and
        unroll windows, exactly as ``name``'s next update would.
        """
        self._check_program()
        batch = self._current_batch(name) if batch is None else batch
        self._sync_executor()
        out = self.executor.run(StepVariant(name, update=False), self.step_inputs(name, batch))
        return dict(out["acc"])

    # -- state ----------------------------------------------------------------------------------
    def optimizer_state(self, name: str) -> StateDict:
        """Return problem ``name``'s optimizer state as the step sees it."""
        return self.optimizers[name].read_state()


def compile(engine: Engine) -> CompiledProgram:
    """Trace and optimize every step of ``engine`` now; return what was emitted."""
    return engine.compile()
