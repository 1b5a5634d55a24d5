"""A training step as a transaction: what ``Engine.train_step`` may change, captured before it.

``Transaction`` records every piece of run state a step can touch — parameters and
buffers, optimizer and scheduler state (with the learning rates a scheduler writes into
the optimizer), data positions and the last batch, schedule counters, each problem's
``ProblemRun`` (accumulated gradient, loss scale, roll-back cache, ``itd`` window) and
the random streams — and ``roll_back`` puts all of it back. Steps are pure (every step
returns new tensors), so references are enough for parameters and optimizer state;
buffers are written in place (BatchNorm statistics) and are cloned, and so are the
parameters of problems whose ``on_inner_loop_start`` hook may copy into them
(``load_parameters_from``). The one thing a roll-back cannot undo is an update that
wrote into its old tensors (``EngineConfig(in_place_updates=True)``): ``roll_back``
returns the problems that did, and the engine refuses to go on until a checkpoint is
loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from mlocompile.checkpoint import rng_state, set_rng_state
from mlocompile.execution import ProblemRun, StepRunner
from mlocompile.problem import Problem
from mlocompile.schedule import Schedule


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block; raise it as KeyboardInterrupt after.

    Used around the roll-back itself, which must not stop half-way. Off the main thread
    (where Python cannot install handlers) the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _copy_run(run: ProblemRun) -> ProblemRun:
    """A copy of ``run`` that later steps cannot change (they append to windows, update the scaler)."""
    window = None if run.window is None else {k: list(v) if isinstance(v, list) else v for k, v in run.window.items()}
    return dataclasses.replace(run, window=window, acc=dict(run.acc), scaler=dataclasses.replace(run.scaler))


@dataclasses.dataclass
class _ProblemState:
    """One problem's live state before the step."""

    params: dict[str, Tensor]
    cloned: bool  # params are copies (a hook may write into the live ones)
    buffers: dict[str, Tensor]
    opt_state: dict[Tensor, dict[str, Any]]  # torch.optim's ``state``
    opt_extra: dict[str, Any]
    groups: list[dict[str, Any]]  # every param group's settings but its parameters (lr, ...)
    scheduler: dict[str, Any] | None
    data: dict[str, Any]
    fetches: int
    cur_batch: Any

    @classmethod
    def capture(cls, problem: Problem, runner: StepRunner, name: str) -> _ProblemState:
        named = runner.fp.named_params()[name]
        cloned = problem.is_implemented("on_inner_loop_start")
        params = {k: p.detach().clone() if cloned else p.data for k, p in named.items()}
        buffers = {k: b.clone() for k, b in runner.fp.read_buffers()[name].items()}
        assert problem.optimizer is not None  # attach_problems checked it
        # NOTE: torch.optim's state by reference (steps replace its tensors), but its step counters by
        # value: write_state advances those in place, as torch.optim does
        opt_state = {
            p: {k: v.clone() if k == "step" and isinstance(v, Tensor) else v for k, v in st.items()}
            for p, st in problem.optimizer.state.items()
        }
        groups = [{k: v for k, v in g.items() if k != "params"} for g in problem.optimizer.param_groups]
        sched = None if problem.scheduler is None else copy.deepcopy(problem.scheduler.state_dict())
        extra = runner.optimizers[name].state_dict()
        data = problem.data_state()
        return cls(params, cloned, buffers, opt_state, extra, groups, sched, data, problem.fetches, problem.cur_batch)

    def restore(self, problem: Problem, runner: StepRunner, name: str) -> None:
        for key, param in runner.fp.named_params()[name].items():
            param.data = self.params[key]
        live = runner.fp.read_buffers()[name]
        with torch.no_grad():
            for key, value in self.buffers.items():
                live[key].copy_(value)
        assert problem.optimizer is not None
        state = problem.optimizer.state
        for p in [p for p in state if p not in self.opt_state]:
            del state[p]  # a first step created it
        for p, saved in self.opt_state.items():
            entry = state[p]  # NOTE: the same dict, refilled: references to it (state_dict()) stay valid
            entry.clear()
            entry.update(saved)
        runner.optimizers[name].load_state_dict(self.opt_extra)
        for group, saved in zip(problem.optimizer.param_groups, self.groups):
            group.update(saved)
        if problem.scheduler is not None and self.scheduler is not None:
            problem.scheduler.load_state_dict(self.scheduler)
        if problem.fetches != self.fetches:  # NOTE: an iterator cut short inside next() has moved on regardless
            problem.load_data_state(self.data)  # recreates the iterators at the saved position
            problem.fetches = self.fetches
        problem.cur_batch = self.cur_batch


class Transaction:
    """The state of a program before a ``train_step``, to put back if the step fails."""

    def __init__(self, problems: dict[str, Problem], runner: StepRunner, schedule: Schedule) -> None:
        self.problems, self.runner, self.schedule = problems, runner, schedule
        self.rng = rng_state()
        self.counters = {n: dataclasses.replace(c, ready=dict(c.ready)) for n, c in schedule.counters.items()}
        self.runs = {n: _copy_run(r) for n, r in runner.runs.items()}
        self.states = {n: _ProblemState.capture(p, runner, n) for n, p in problems.items()}
        runner.in_place.clear()

    def roll_back(self) -> list[str]:
        """Put everything back; return the problems whose update wrote into the old tensors (lost)."""
        with sigint_deferred():
            torn = sorted(self.runner.in_place)
            for name, problem in self.problems.items():
                self.states[name].restore(problem, self.runner, name)
            self.schedule.counters = self.counters
            self.runner.runs = self.runs
            set_rng_state(self.rng)  # last: restoring data iterators draws random numbers
            return torn
