"""The decorator API: a loss function becomes a problem; dependencies are inferred from use."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from mlocompile.config import Config
from mlocompile.errors import ProgramError
from mlocompile.functional import FunctionalProgram
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


def declared_levels(problems: Sequence[Problem]) -> dict[str, int]:
    """Return the ``level=`` each problem declared (decorator API), by name."""
    return {p.name: int(p.__dict__["level"]) for p in problems if p.__dict__.get("level") is not None}


def find_all_uses(problems: Sequence[Problem], eager: bool = False) -> dict[str, set[str]]:
    """Evaluate every problem's loss once and return, per problem, the other problems it uses.

    The loss is traced (forward only), or with ``eager`` (``compile="eager"``) run for real
    while recording which tensors reach torch functions, so a loss with ``.item()`` or
    Python control flow on values works there.
    """
    from mlocompile.trace import find_loss_uses

    by_name = {p.name: p for p in problems}
    fp = FunctionalProgram(by_name)
    params, buffers = fp.read_params(), fp.read_buffers()
    find = fp.find_uses if eager else lambda *a: find_loss_uses(fp, *a)
    return {n: find(n, params, buffers, p.peek_batch()) - {n} for n, p in by_name.items()}


def infer_dependencies(problems: Sequence[Problem], eager: bool = False) -> dict[str, dict[str, list[str]]]:
    """Infer u2l/l2u edges from traced use and declared levels.

    A higher-level problem used by a lower one's loss is a u2l edge; a lower one used
    by a higher one's loss is an l2u edge. Problems on one level may not use each other.
    """
    levels = declared_levels(problems)
    missing = [p.name for p in problems if p.name not in levels]
    if missing:
        raise ProgramError(
            f"problems {missing} have no level; without dependencies=..., every problem needs "
            "@mlocompile.problem(level=...) (0 = lowest) so edges can be inferred"
        )
    deps: dict[str, dict[str, list[str]]] = {"u2l": {}, "l2u": {}}
    for user, used in find_all_uses(problems, eager).items():
        for other in sorted(used):
            if levels[other] == levels[user]:
                raise ProgramError(
                    f"problem {user!r} (level {levels[user]}) uses {other!r} on the same level; "
                    "give them different levels or pass dependencies explicitly"
                )
            kind, src, dst = ("u2l", other, user) if levels[other] > levels[user] else ("l2u", other, user)
            deps[kind].setdefault(src, []).append(dst)
    return deps


def warn_undeclared_uses(uses: dict[str, set[str]], declared: set[tuple[str, str]]) -> None:
    """Warn about losses that use a problem with no declared edge between the two."""
    for user, used in uses.items():
        for other in sorted(used):
            # an edge src -> dst (u2l or l2u) always means: src's parameters appear in dst's loss
            if (other, user) not in declared:
                warnings.warn(
                    f"the training_step of {user!r} uses {other!r} but no dependency connects them, so no "
                    f"hypergradient flows between them; declare an edge or detach the use",
                    stacklevel=3,
                )
