"""Betty's schedule: when each problem steps, as per-problem counters over injected actions.

Leaves step on every ``Engine.train_step``; a problem whose unroll window ends
(``unroll_steps × gradient_accumulation`` local steps past ``warmup_steps``) marks
itself ready for its parents, and a parent steps once all its children are ready.
With ``roll_back`` a lower problem then returns to its window's start and steps once
more (Betty's ``step_after_roll_back``). The schedule decides *when*; *what* a step
does is injected: ``start`` (a window begins: hooks, snapshots), ``step`` (one local
step, ``update`` false while gradients accumulate) and ``redo`` (roll back and step
again; returns whether it did).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from mlocompile.errors import CheckpointError
from mlocompile.program import ProgramGraph


@dataclass
class Counters:
    """One problem's place in the schedule (Betty's ``_count``, ``ready`` and loop flag)."""

    count: int = 0
    ready: dict[str, bool] = field(default_factory=dict)
    loop_start: bool = True


class Schedule:
    """Per-problem counters and readiness, and Betty's recursion over them."""

    def __init__(
        self,
        program: ProgramGraph,
        start: Callable[[str], None],
        step: Callable[[str, bool], None],
        redo: Callable[[str], bool],
    ) -> None:
        self.program = program
        self._start, self._step, self._redo = start, step, redo
        self.counters = {n: Counters(ready={c: False for c in program.children(n)}) for n in program.problems}

    def set_program(self, program: ProgramGraph) -> None:
        """Follow a new dependency graph over the same problems (``Engine.set_dependency``).

        Local step counts and window starts carry on (as in Betty); readiness is kept
        for children that remain and starts False for new ones.
        """
        self.program = program
        for name, own in self.counters.items():
            own.ready = {c: own.ready.get(c, False) for c in program.children(name)}

    def window_ends(self, name: str) -> bool:
        """Whether ``name``'s local step just completed an unroll window (past warm-up)."""
        cfg, count = self.program.problems[name].config, self.counters[name].count
        return count % (cfg.unroll_steps * cfg.gradient_accumulation) == 0 and count > cfg.warmup_steps

    def step(self, name: str) -> None:
        """Step ``name`` if its children are ready, triggering its parents (Betty's ``step``)."""
        self._step_normal(name)
        if self.window_ends(name):
            self._step_after_roll_back(name)

    def start_loop(self, name: str) -> None:
        """Begin ``name``'s next unroll window now (also run before the first step)."""
        self.counters[name].loop_start = False
        self._start(name)

    def _step_normal(self, name: str) -> None:
        own = self.counters[name]
        if not all(own.ready.values()):
            return
        if own.loop_start:
            self.start_loop(name)
        own.count += 1
        self._step(name, own.count % self.program.problems[name].config.gradient_accumulation == 0)
        if self.window_ends(name):
            for parent in self.program.parents(name):
                self.counters[parent].ready[name] = True
                self._step_normal(parent)
            own.loop_start = True
        own.ready = dict.fromkeys(own.ready, False)

    def _step_after_roll_back(self, name: str) -> None:
        own = self.counters[name]
        if not all(own.ready.values()):
            return
        if self._redo(name):
            for parent in self.program.parents(name):
                self.counters[parent].ready[name] = True
                self._step_after_roll_back(parent)
        own.ready = dict.fromkeys(own.ready, False)

    def state_dict(self) -> dict[str, Any]:
        """Every problem's counters, as plain data."""
        return {name: asdict(c) for name, c in self.counters.items()}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise CheckpointError unless ``state`` has these problems' counters, with these children."""
        for name, counters in self.counters.items():
            saved = state.get(name)
            if saved is None or set(saved["ready"]) != set(counters.ready):
                raise CheckpointError(f"checkpoint schedule of problem {name!r} does not match this program's")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters written by ``state_dict``."""
        self.counters = {name: Counters(**c) for name, c in state.items()}
