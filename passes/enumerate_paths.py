"""Pass: enumerate every hypergradient path of the program (Betty's modified DFS)."""

from __future__ import annotations

from mlocompile.errors import ProgramError
from mlocompile.program import HyperPath, ProgramGraph


def enumerate_paths(program: ProgramGraph) -> ProgramGraph:
    """Record on ``program.paths`` every u2l-then-l2u path, per upper problem.

    For each u2l edge ``k -> l`` (in declaration order) a depth-first search follows
    l2u edges from ``l`` (in declaration order) until it reaches ``k``; each hit is a
    path ``k -u2l-> l -l2u-> ... -l2u-> x`` where ``x`` is the problem whose l2u edge
    enters ``k``.

    Requires: a validated, acyclic ProgramGraph.
    Ensures: ``program.paths[k]`` lists k's paths in a deterministic order.

    Before/after (bilevel)::

        edge u2l outer -> inner          edge u2l outer -> inner
        edge l2u inner -> outer    =>    edge l2u inner -> outer
                                         path outer -u2l-> inner
    """
    paths: dict[str, list[HyperPath]] = {}
    for upper, lower in program.edges("u2l"):
        found: list[tuple[str, ...]] = []
        _dfs(program, lower, upper, [lower], found)
        if not found:
            raise ProgramError(
                f"u2l edge {upper} -> {lower} has no l2u path back from {lower} to {upper}; "
                f'add "l2u": {{{lower}: [{upper}]}} (or a chain of l2u edges) or remove the u2l edge'
            )
        paths.setdefault(upper, []).extend(HyperPath(upper, chain) for chain in found)
    program.paths = paths
    return program


def _dfs(program: ProgramGraph, node: str, target: str, trail: list[str], found: list[tuple[str, ...]]) -> None:
    for nxt in program.parents(node):
        if nxt == target:
            found.append(tuple(trail))
        else:
            trail.append(nxt)
            _dfs(program, nxt, target, trail, found)
            trail.pop()
