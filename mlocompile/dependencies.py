"""Dependencies from use: which problems each loss calls, edges inferred from levels, and checks.

A problem's loss *uses* another problem when that problem's parameters reach the
loss: found by running it once for real, without gradients, and recording which
parameters reach torch functions (``FunctionalProgram.find_uses``). That costs one
forward: tracing the loss forward found the same set at the cost of a trace (a
third of the time to the first step of a DARTS supernet). Under ``fx``/``inductor``
a loss that reads a tensor's value (``.item()``) then fails when its step is traced,
with the same ``TraceError``, before anything is updated.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import passes
from mlocompile.compat import check_unused_parameters
from mlocompile.errors import ProgramError
from mlocompile.functional import FunctionalProgram
from mlocompile.problem import Problem
from mlocompile.program import ProgramGraph, build_program


def declared_levels(problems: Sequence[Problem]) -> dict[str, int]:
    """Return the ``level=`` each problem declared (decorator API), by name."""
    return {p.name: int(p.__dict__["level"]) for p in problems if p.__dict__.get("level") is not None}


def find_parameter_uses(problems: Sequence[Problem]) -> dict[str, set[tuple[str, str]]]:
    """Evaluate every problem's loss once; return, per problem, the (problem, parameter) pairs it reads.

    The loss runs for real (no gradients, randomness restored) while recording which
    tensors reach torch functions, under every ``compile`` mode.
    """
    by_name = {p.name: p for p in problems}
    fp = FunctionalProgram(by_name)
    params, buffers = fp.read_params(), fp.read_buffers()
    return {n: fp.find_uses(n, params, buffers, p.peek_batch()) for n, p in by_name.items()}


def problem_uses(parameter_uses: dict[str, set[tuple[str, str]]]) -> dict[str, set[str]]:
    """Per problem, the other problems whose parameters its loss reads."""
    return {n: {p for p, _ in used} - {n} for n, used in parameter_uses.items()}


def find_all_uses(problems: Sequence[Problem]) -> dict[str, set[str]]:
    """Evaluate every problem's loss once and return, per problem, the other problems it uses."""
    return problem_uses(find_parameter_uses(problems))


def infer_dependencies(problems: Sequence[Problem]) -> dict[str, dict[str, list[str]]]:
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
    for user, used in find_all_uses(problems).items():
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


def check_uses(program: ProgramGraph, uses: dict[str, set[str]]) -> None:
    """Check that every declared edge is used, and label each u2l edge's ``via`` (loss, init).

    Raises:
        ProgramError: an edge whose lower loss (u2l) or upper loss (l2u) never uses the other
            problem, so its hypergradient would be zero.
    """
    for upper, lower in program.edges("u2l"):
        init = program.problems[lower]._init_source
        via = [
            tag
            for tag, hit in (("loss", upper in uses[lower]), ("init", init is not None and init.name == upper))
            if hit
        ]
        program.graph.edges[upper, lower, "u2l"]["via"] = "+".join(via) or "none"
        if not via:
            raise ProgramError(
                f"u2l edge {upper} -> {lower}: the training_step of {lower!r} never uses {upper!r}'s parameters, "
                f"so {upper!r}'s hypergradient would be zero; call self.{upper}(...) in {lower!r}'s loss, "
                f"start {lower!r} from it with self.load_parameters_from(self.{upper}) in on_inner_loop_start, "
                "or remove the edge"
            )
    for lower, upper in program.edges("l2u"):
        if lower not in uses[upper]:
            raise ProgramError(
                f"l2u edge {lower} -> {upper}: the training_step of {upper!r} never uses {lower!r}'s parameters; "
                f"call self.{lower}(...) in {upper!r}'s loss or remove the edge"
            )


def plan_program(problems: Sequence[Problem], dependencies: Any) -> tuple[Any, ProgramGraph]:
    """Validate the declared dependencies (or infer them from levels and use) into a planned ProgramGraph.

    Returns the dependencies used and the graph after the program passes (paths, VJP plans).
    """
    deps = dependencies if dependencies is not None else infer_dependencies(problems)
    program = passes.run_program_passes(build_program(problems, deps, declared_levels(problems) or None))
    return deps, program


def check_declared_relations(program: ProgramGraph) -> None:
    """Check relations recorded with ``Problem.add_child``/``add_parent`` against the graph, then drop them.

    Raises:
        ProgramError: a recorded relation that no l2u edge of ``dependencies`` declares.
    """
    for name, problem in program.problems.items():
        manual = problem._manual
        declared = {"parents": program.parents(name), "children": program.children(name)}
        for kind in ("parents", "children"):
            for other in manual[kind]:
                if other.name not in declared[kind]:
                    lower, upper = (name, other.name) if kind == "parents" else (other.name, name)
                    raise ProgramError(
                        f"{upper!r} was added as a parent of {lower!r} (add_child/add_parent), but dependencies "
                        f'has no l2u edge {lower} -> {upper}; declare it: "l2u": {{{lower}: [{upper}]}}'
                    )
        problem._manual = {"parents": [], "children": []}


def check_program(program: ProgramGraph, problems: Sequence[Problem], warn_undeclared: bool) -> None:
    """Evaluate every loss once and check the declared edges against what the losses use.

    With ``warn_undeclared`` (explicit dependencies), uses without an edge warn. A
    trainable parameter its own loss never reads is checked against ``allow_unused``.
    """
    parameter_uses = find_parameter_uses(problems)
    uses = problem_uses(parameter_uses)
    if warn_undeclared:
        declared = {(u, v) for kind in ("u2l", "l2u") for u, v in program.edges(kind)}
        warn_undeclared_uses(uses, declared)
    check_uses(program, uses)
    check_unused_parameters(program, parameter_uses)  # Config.allow_unused, as Betty's autograd.grad
