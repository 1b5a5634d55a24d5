"""When each problem's LR scheduler steps, and with what.

Every ``torch.optim.lr_scheduler`` scheduler steps after each optimizer step of its
problem (as in Betty), with no argument: the lowered update reads the learning rates,
momenta and betas it writes into ``param_groups`` at every step (``optim``), so no
retrace is needed. ``ReduceLROnPlateau`` needs a metric instead: it steps after each
``Engine.validation()`` with the value under ``EngineConfig.early_stopping_metric``
(default ``"loss"``). ``check_schedulers`` refuses, before the first step, the
programs where that cannot happen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch.optim.lr_scheduler import ReduceLROnPlateau

from mlocompile.errors import ProgramError


def check_schedulers(problems: Mapping[str, Any], validates: bool, metric: str, distributed: bool) -> None:
    """Raise ProgramError, naming the problem, for a scheduler the engine could not step right.

    Args:
        problems: Problem name -> problem (its ``scheduler`` may be None).
        validates: Whether the engine implements ``validation()``.
        metric: ``EngineConfig.early_stopping_metric``, the key ReduceLROnPlateau reads.
        distributed: Whether the engine runs data-parallel (validation runs on rank 0 only).
    """
    for name, problem in problems.items():
        scheduler = problem.scheduler
        if not isinstance(scheduler, ReduceLROnPlateau):
            continue
        if not validates:
            raise ProgramError(
                f"problem {name!r}: ReduceLROnPlateau steps on a validation metric, but the engine has no "
                f"validation(); override Engine.validation() to return {{{metric!r}: value, ...}} (the key is "
                "EngineConfig.early_stopping_metric), or use a scheduler that needs no metric"
            )
        if distributed:
            raise ProgramError(
                f"problem {name!r}: ReduceLROnPlateau is not supported with strategy='distributed' yet "
                "(validation runs on rank 0 only, so the ranks' learning rates would differ); use a "
                "scheduler that needs no metric"
            )


def step_after_update(problem: Any) -> None:
    """Step ``problem``'s scheduler after its optimizer step (not ReduceLROnPlateau: see ``step_on_validation``)."""
    scheduler = problem.scheduler
    if scheduler is not None and not isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step()


def step_on_validation(problems: Mapping[str, Any], stats: Mapping[str, Any], metric: str, where: str) -> None:
    """Step every ReduceLROnPlateau with ``stats[metric]``, the result of ``validation()``.

    Raises:
        ProgramError: ``stats`` has no finite number under ``metric``.
    """
    plateaus = {n: p.scheduler for n, p in problems.items() if isinstance(p.scheduler, ReduceLROnPlateau)}
    if not plateaus:
        return
    value = stats.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        found = f"{metric!r} = {value!r}" if metric in stats else f"no {metric!r} (keys: {sorted(stats)})"
        raise ProgramError(
            f"problem {sorted(plateaus)[0]!r}: ReduceLROnPlateau steps on validation()'s {metric!r} "
            f"(EngineConfig.early_stopping_metric), but validation() {where} returned {found}; return a "
            f"finite number under {metric!r} or set early_stopping_metric to the key to watch"
        )
    for scheduler in plateaus.values():
        scheduler.step(value)
