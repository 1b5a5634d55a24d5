"""One problem's compiled step against the user's live objects: inputs, run, checks, write-back.

The user's ``module`` and ``optimizer`` objects are the source of truth: a step reads
their tensors (aliases, no copies), runs the compiled step and points them at the
results, so after (or during) training they hold the current parameters and optimizer
state and ``torch.save`` works as usual. Between steps each problem keeps its
accumulated gradient, its fp16 loss scale, and the snapshots a roll-back or an ``itd``
replay needs (``ProblemRun``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from mlocompile.compiler import CompileOptions, Compiler
from mlocompile.errors import CheckpointError, NonFiniteError
from mlocompile.functional import FunctionalProgram
from mlocompile.hypergrad import METHOD_RULES
from mlocompile.optim import FunctionalOptimizer
from mlocompile.program import ProgramGraph
from mlocompile.rng import record_rng_states, rng_devices
from mlocompile.step import StepVariant, needed_batches, needed_optimizers, needed_windows

log = logging.getLogger("mlocompile")


@dataclass
class LossScaler:
    """fp16 dynamic loss scaling with GradScaler's rule (``scale`` 0: not fp16)."""

    scale: float = 0.0
    good_steps: int = 0
    skipped_steps: int = 0

    def update(self, found_inf: bool, growth_interval: int, factor: float) -> bool:
        """Halve on overflow (return True: skip the step), grow by ``factor`` after a run of good steps."""
        if found_inf:
            self.scale *= 0.5
            self.good_steps = 0
            self.skipped_steps += 1
            return True
        self.good_steps += 1
        if self.good_steps >= growth_interval:
            self.scale *= factor
            self.good_steps = 0
        return False


@dataclass
class ProblemRun:
    """What one problem carries from step to step besides its parameters and optimizer state."""

    roll_back: bool = False  # EngineConfig.roll_back, for problems with parents
    cache: dict[str, Any] | None = None  # the window-start snapshot a roll-back returns to
    window: dict[str, Any] | None = None  # itd: the window start and every live step's inputs
    acc: dict[str, Tensor] = field(default_factory=dict)  # gradient accumulated so far
    last_loss: float = float("nan")
    scaler: LossScaler = field(default_factory=LossScaler)


@dataclass
class StepResult:
    """What the engine logs of one step."""

    loss: float
    logs: dict[str, float]
    skipped: bool = False  # fp16 overflow: the update was skipped inside the graph


class StepRunner:
    """Gathers a step's inputs from the live objects, runs it, checks it and writes it back."""

    def __init__(
        self,
        program: ProgramGraph,
        fp: FunctionalProgram,
        optimizers: dict[str, FunctionalOptimizer],
        compiler: Compiler,
        options: Callable[[], CompileOptions],
        roll_back: bool,
    ) -> None:
        self.program, self.fp, self.optimizers, self.compiler = program, fp, optimizers, compiler
        self.options = options  # read at every step: EngineConfig may change between steps
        self.runs: dict[str, ProblemRun] = {}
        self.in_place: set[str] = set()  # problems whose update wrote into its old tensors (in_place_updates)
        for name, problem in program.problems.items():
            cfg = problem.config
            scaler = LossScaler(scale=cfg.initial_dynamic_scale if cfg.precision == "fp16" else 0.0)
            self.runs[name] = ProblemRun(roll_back=roll_back and bool(program.parents(name)), scaler=scaler)

    def set_program(self, program: ProgramGraph, roll_back: bool) -> None:
        """Run steps of ``program`` from now on (``Engine.set_dependency``): roll-back follows its parents."""
        self.program = program
        for name, run in self.runs.items():
            run.roll_back = roll_back and bool(program.parents(name))
            if not run.roll_back:
                run.cache = None

    # -- inputs ---------------------------------------------------------------------------
    def inputs(self, name: str, batch: Any, acc: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """Gather the explicit inputs of ``name``'s step from the live objects."""
        opt = self.optimizers[name]
        windows: dict[str, Any] = {}
        for q in needed_windows(self.program, name):
            win = self.runs[q].window
            windows[q] = win if win is not None and win["batches"] else self.fresh_window(q)
        inputs: dict[str, Any] = {
            "params": self.fp.read_params(),
            "buffers": self.fp.read_buffers(),
            "batch": batch,
            "last": {q: self.program.problems[q].peek_batch() for q in needed_batches(self.program, name)},
            "opt": opt.read_state(),
            "hyper": opt.hyperparameters(),
            "acc": dict(acc or {}),
            "windows": windows,
            "lower_opt": {q: self.lower_optimizer(q) for q in needed_optimizers(self.program, name)},
        }
        if self.runs[name].scaler.scale:
            inputs["scale"] = torch.tensor(self.runs[name].scaler.scale, dtype=torch.float32)
        return inputs

    def lower_optimizer(self, name: str) -> dict[str, Any]:
        """``name``'s optimizer state entries and hyperparameters, for the method of ``name`` that reads them."""
        rule = METHOD_RULES[self.program.problems[name].config.type]
        opt = self.optimizers[name]
        if rule.check_optimizer is not None:
            rule.check_optimizer(name, opt)
        return {"state": opt.read_entries(rule.optimizer_state.get(opt.kind, ())), "hyper": opt.hyperparameters()}

    # -- one step -------------------------------------------------------------------------
    def run(self, name: str, batch: Any, update: bool, where: str, check_finite: bool) -> StepResult:
        """Run one step of ``name`` on ``batch`` and write its results into the live objects.

        ``where`` (e.g. "at global step 3 (local step 2)") goes into error messages.
        """
        run, problem = self.runs[name], self.program.problems[name]
        variant, options = StepVariant(name, update), self.options()
        if self.compiler.donates(variant, options):
            self.in_place.add(name)  # from here on the old parameters may be gone
        out = self.compiler.run(variant, self.inputs(name, batch, run.acc), options)
        loss = float(out["loss"])
        logs = {k: float(v) for k, v in out["logs"].items()}
        cfg = problem.config
        if "found_inf" in out and run.scaler.update(
            bool(out["found_inf"]), cfg.scale_growth_interval, cfg.scale_factor
        ):
            log.warning("problem %r: fp16 overflow %s; step skipped, loss scale now %g", name, where, run.scaler.scale)
            self.write_buffers(out["buffers"])  # as with GradScaler: the forward happened, the update did not
            return StepResult(loss, logs, skipped=True)
        if check_finite and not (math.isfinite(loss) and math.isfinite(float(out["grad_norm"]))):
            self.in_place.discard(name)  # the update was guarded: it wrote the old values back
            raise NonFiniteError(
                f"problem {name!r} {where}: loss={loss}, gradient norm={float(out['grad_norm'])}; lower the "
                "learning rate, clip gradients (Config(gradient_clipping=...)) or check the data"
            )
        self.write_buffers(out["buffers"])
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
        return StepResult(loss, logs)

    def gradients(self, name: str, batch: Any) -> dict[str, Tensor]:
        """``name``'s full gradient on ``batch`` (direct + hypergradients), changing nothing."""
        out = self.compiler.run(StepVariant(name, update=False), self.inputs(name, batch), self.options())
        return dict(out["acc"])

    def write_buffers(self, new: dict[str, dict[str, Tensor]]) -> None:
        """Copy a step's buffers (running statistics after its forward) into the user's modules, in place."""
        if not new:
            return
        live = self.fp.read_buffers()
        with torch.no_grad():
            for prob, tensors in new.items():
                for key, value in tensors.items():
                    live[prob][key].copy_(value)

    # -- windows and snapshots ------------------------------------------------------------------
    def start_window(self, name: str) -> None:
        """Start an unroll window of ``name``: its ``on_inner_loop_start`` hook, then a snapshot
        for a roll-back or an itd replay."""
        problem = self.program.problems[name]
        if problem.is_implemented("on_inner_loop_start"):
            problem.on_inner_loop_start()  # type: ignore[attr-defined]
        run = self.runs[name]
        replays = METHOD_RULES[problem.config.type].window
        if run.roll_back or replays:
            snapshot = self.snapshot(name)
            run.cache = snapshot if run.roll_back else None
            if replays:
                run.window = {**snapshot, "hypers": [], "batches": [], "others": [], "rng": []}

    def record(self, name: str, batch: Any) -> None:
        """Add a live step's inputs to ``name``'s itd window (replayed draws = live draws)."""
        window = self.runs[name].window
        if window is not None:
            window["hypers"].append(self.optimizers[name].hyperparameters())
            window["batches"].append(batch)
            window["others"].append(self.fp.read_params())
            window["rng"].append(record_rng_states(self._rng_devices(name)))

    def snapshot(self, name: str) -> dict[str, Any]:
        """``name``'s parameters, buffers and optimizer state now."""
        # NOTE: steps are pure (new tensors each step), so params/state alias safely;
        # buffers may be updated in place by modules (BatchNorm), so they are cloned.
        return {
            "params": self.fp.read_params()[name],
            "buffers": {k: b.clone() for k, b in self.fp.read_buffers()[name].items()},
            "opt_state": self.optimizers[name].read_state(),
        }

    def restore(self, name: str, snap: dict[str, Any]) -> None:
        """Point ``name``'s live objects back at a ``snapshot``."""
        module = self.program.problems[name].module
        for key, param in self.fp.named_params()[name].items():
            param.data = snap["params"][key]
        assert module is not None
        for key, buf in module.named_buffers():
            buf.copy_(snap["buffers"][key])
        self.optimizers[name].write_state(snap["opt_state"])

    def fresh_window(self, name: str) -> dict[str, Any]:
        """A window of ``unroll_steps`` copies of ``name``'s current state (before its first step)."""
        snap = self.snapshot(name)
        k = self.program.problems[name].config.unroll_steps
        hyper = self.optimizers[name].hyperparameters()
        others = self.fp.read_params()
        rng = record_rng_states(self._rng_devices(name))
        batches = [self.program.problems[name].peek_batch()] * k
        return {**snap, "hypers": [hyper] * k, "batches": batches, "others": [others] * k, "rng": [rng] * k}

    def _rng_devices(self, name: str) -> list[str]:
        return rng_devices(list(self.fp.read_params()[name].values()))

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every problem's ``ProblemRun``, as plain data (snapshots included)."""
        return {name: asdict(run) for name, run in self.runs.items()}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise CheckpointError naming the first saved window or snapshot that does not fit this program."""
        for name, problem in self.program.problems.items():
            saved = state.get(name)
            if saved is None:
                raise CheckpointError(f"checkpoint has no step state for problem {name!r}")
            if saved["window"] is not None and not METHOD_RULES[problem.config.type].window:
                raise CheckpointError(
                    f"checkpoint problem {name!r} holds an unroll window, but its method here is {problem.config.type!r}"
                )
            params = self.fp.named_params()[name]
            for what in ("cache", "window"):
                snap = saved[what]
                if snap is None:
                    continue
                shapes = {k: tuple(t.shape) for k, t in snap["params"].items()}
                if shapes != {k: tuple(p.shape) for k, p in params.items()}:
                    raise CheckpointError(f"checkpoint problem {name!r}: its {what} holds other parameters than here")
                if what == "window" and len(snap["batches"]) > problem.config.unroll_steps:
                    raise CheckpointError(
                        f"checkpoint problem {name!r}: its window holds {len(snap['batches'])} steps, "
                        f"more than unroll_steps={problem.config.unroll_steps}"
                    )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` wrote."""
        self.runs = {name: ProblemRun(**{**run, "scaler": LossScaler(**run["scaler"])}) for name, run in state.items()}
