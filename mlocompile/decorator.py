"""The decorator API: a loss function becomes a problem (``dependencies`` infers the edges from use)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from mlocompile.config import Config
from mlocompile.problem import Problem

LossFn = Callable[[Any, Any], Any]


def problem(
    fn: LossFn | None = None,
    *,
    level: int | None = None,
    name: str | None = None,
    module: nn.Module | None = None,
    optimizer: Any = None,
    scheduler: Any = None,
    train_data_loader: Any = None,
    config: Config | None = None,
) -> Any:
    """Turn ``fn(self, batch) -> loss`` into a ``Problem`` named after the function.

    With ``level`` given on every problem, ``Engine(problems=[...])`` infers the
    dependencies from which problems each loss actually calls.

    Example::

        @mlo.problem(level=0, module=net, optimizer=opt, train_data_loader=loader)
        def inner(self, batch):
            x, y = batch
            return (self.outer(x) * F.cross_entropy(self.module(x), y, reduction="none")).mean()
    """

    def wrap(loss_fn: LossFn) -> Problem:
        cls = type(f"{loss_fn.__name__}_problem", (Problem,), {"training_step": loss_fn, "__doc__": loss_fn.__doc__})
        inst = cls(name or loss_fn.__name__, config, module, optimizer, scheduler, train_data_loader)
        inst.level = level
        return inst

    return wrap(fn) if fn is not None else wrap
