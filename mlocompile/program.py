"""The typed dependency graph of an MLO program (problems, u2l/l2u edges, levels, paths)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from mlocompile.config import Config
from mlocompile.errors import ProgramError
from mlocompile.hypergrad import METHOD_RULES
from mlocompile.problem import Problem

EDGE_KINDS = ("u2l", "l2u")


@dataclass(frozen=True)
class HyperPath:
    """One hypergradient path: ``upper`` -u2l-> ``chain[0]`` -l2u-> ... -l2u-> ``chain[-1]``.

    ``upper``'s loss depends on ``chain[-1]``'s parameters; the path contributes
    ``(dθ*_chain[0]/dθ_upper)ᵀ ··· (dθ*_chain[-1]/dθ*_chain[-2])ᵀ ∂C_upper/∂θ*_chain[-1]``.
    """

    upper: str
    chain: tuple[str, ...]

    def __str__(self) -> str:
        hops = " -l2u-> ".join(self.chain)
        return f"{self.upper} -u2l-> {hops}"


@dataclass(frozen=True)
class VjpOp:
    """One best-response vector-Jacobian product in an upper problem's plan.

    ``source`` is the id of the op whose output is the incoming vector, or ``None``
    when the vector is ``∂C_upper/∂θ_curr`` itself. The result is the vector for
    ``prev``'s parameters, computed with ``curr``'s method.
    """

    id: int
    source: int | None
    curr: str
    prev: str


@dataclass
class ProgramGraph:
    """Problems and their typed dependencies, validated; paths and plans are filled by passes."""

    graph: nx.MultiDiGraph
    problems: dict[str, Problem]
    paths: dict[str, list[HyperPath]] = field(default_factory=dict)
    plans: dict[str, list[VjpOp]] = field(default_factory=dict)
    path_ends: dict[str, list[int]] = field(default_factory=dict)
    _memo: dict[tuple[str, str], list[str]] = field(default_factory=dict, repr=False)
    _structure: tuple[Any, ...] | None = field(default=None, repr=False)

    # -- queries ----------------------------------------------------------------------
    def edges(self, kind: str) -> list[tuple[str, str]]:
        """Return the (src, dst) pairs of ``kind`` edges, in declaration order."""
        return [(u, v) for u, v, k in self.graph.edges(keys=True) if k == kind]

    def parents(self, name: str) -> list[str]:
        """Problems directly above ``name`` (its l2u targets), in declaration order."""
        key = ("parents", name)
        if key not in self._memo:  # NOTE: the schedule asks every step; networkx views are slow
            self._memo[key] = [v for u, v, k in self.graph.out_edges(name, keys=True) if k == "l2u"]
        return self._memo[key]

    def children(self, name: str) -> list[str]:
        """Problems directly below ``name`` (l2u sources into it), in declaration order."""
        key = ("children", name)
        if key not in self._memo:
            self._memo[key] = [u for u, v, k in self.graph.in_edges(name, keys=True) if k == "l2u"]
        return self._memo[key]

    def level(self, name: str) -> int:
        """Level of a problem: 0 for leaves, 1 + the highest child level otherwise."""
        return int(self.graph.nodes[name]["level"])

    def structure(self) -> tuple[Any, ...]:
        """The dependency structure as a hashable key: typed edges, paths and VJP plans.

        A traced step is valid for one structure (``Engine.set_dependency`` changes it);
        computed once, after the program passes have filled paths and plans.
        """
        if self._structure is None:
            paths = tuple((u, tuple((p.upper, p.chain) for p in ps)) for u, ps in self.paths.items())
            plans = tuple((u, tuple(plan)) for u, plan in self.plans.items())
            self._structure = (tuple(self.edges("u2l")), tuple(self.edges("l2u")), paths, plans)
        return self._structure

    @property
    def leaves(self) -> list[str]:
        """Problems with no lower problem; they step every ``train_step``."""
        return [n for n in self.problems if not self.children(n)]

    def describe(self) -> str:
        """Return the deterministic text form of the graph (levels, edges, paths, plans)."""
        lines = ["program:"]
        for name in self.problems:
            cfg = self.problems[name].config
            lines.append(f"  problem {name}: level={self.level(name)} method={cfg.type} unroll={cfg.unroll_steps}")
        for kind in EDGE_KINDS:
            for u, v in self.edges(kind):
                tag = self.graph.edges[u, v, kind].get("via", "loss")
                lines.append(f"  edge {kind} {u} -> {v} via={tag}")
        for paths in self.paths.values():
            for path in paths:
                lines.append(f"  path {path}")
        for upper, plan in self.plans.items():
            for op in plan:
                src = "dC/d" + op.curr if op.source is None else f"v{op.source}"
                lines.append(
                    f"  vjp {upper}.v{op.id} = vjp[{op.curr} ({self.problems[op.curr].config.type})]({src}) -> d/d{op.prev}"
                )
        return "\n".join(lines)


def _as_name(item: Any, where: str, problems: Mapping[str, Problem]) -> str:
    name = item.name if isinstance(item, Problem) else item
    if not isinstance(name, str) or name not in problems:
        raise ProgramError(
            f"{where}: {item!r} is not one of the engine's problems {sorted(problems)}; add it to problems=[...]"
        )
    if isinstance(item, Problem) and problems[name] is not item:
        raise ProgramError(f"{where}: a different problem object is named {name!r}; problem names must be unique")
    return name


def build_program(
    problems: Sequence[Problem],
    dependencies: Mapping[str, Mapping[Any, Iterable[Any]]],
    levels: Mapping[str, int] | None = None,
) -> ProgramGraph:
    """Build and validate the typed dependency graph.

    Raises ProgramError for duplicate or unknown names, unknown edge kinds,
    self-dependencies, cycles, u2l edges without an l2u path back, and declared
    levels that contradict the edges.
    """
    by_name: dict[str, Problem] = {}
    for p in problems:
        if not isinstance(p, Problem):
            raise ProgramError(f"problems must be Problem instances, got {type(p).__name__}")
        if p.name in by_name:
            raise ProgramError(f"two problems are named {p.name!r}; problem names must be unique")
        by_name[p.name] = p
    unknown_kinds = set(dependencies) - set(EDGE_KINDS)
    if unknown_kinds:
        raise ProgramError(f"dependencies has unknown keys {sorted(unknown_kinds)}; use 'u2l' and 'l2u'")
    g = nx.MultiDiGraph()
    g.add_nodes_from(by_name)
    for kind in EDGE_KINDS:
        for src, dsts in dependencies.get(kind, {}).items():
            s = _as_name(src, f"dependencies[{kind!r}] key", by_name)
            for dst in dsts:
                d = _as_name(dst, f"dependencies[{kind!r}][{s!r}]", by_name)
                if s == d:
                    raise ProgramError(f"{kind} edge {s} -> {d} points a problem at itself; remove it")
                if not g.has_edge(s, d, key=kind):
                    g.add_edge(s, d, key=kind, kind=kind)
    _check_acyclic(g)
    _assign_levels(g, levels)
    for u, v in [(u, v) for u, v, k in g.edges(keys=True) if k == "u2l"]:
        if g.has_edge(u, v, key="l2u"):
            raise ProgramError(f"{u} is declared both above (u2l) and below (l2u) {v}; keep one direction")
    for name, p in by_name.items():
        _check_method(name, p.config)
        p.config.validate(name)
    return ProgramGraph(graph=g, problems=by_name)


def _check_method(name: str, cfg: Config) -> None:
    where = f"Config of problem {name!r}"
    rule = METHOD_RULES.get(cfg.type)
    if rule is None:
        raise ProgramError(f"{where}: type={cfg.type!r} is not a hypergradient method; use one of {list(METHOD_RULES)}")
    if rule.window and cfg.gradient_accumulation != 1:
        raise ProgramError(
            f"{where}: type={cfg.type!r} differentiates through optimizer steps and needs "
            f"gradient_accumulation=1 (got {cfg.gradient_accumulation})"
        )


def _check_acyclic(g: nx.MultiDiGraph) -> None:
    l2u = nx.DiGraph([(u, v) for u, v, k in g.edges(keys=True) if k == "l2u"])
    try:
        cycle = nx.find_cycle(l2u)
    except nx.NetworkXNoCycle:
        return
    names = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
    raise ProgramError(f"l2u edges form a cycle {names}; a problem cannot be (indirectly) below itself")


def _assign_levels(g: nx.MultiDiGraph, declared: Mapping[str, int] | None) -> None:
    l2u = nx.DiGraph()
    l2u.add_nodes_from(g.nodes)
    l2u.add_edges_from((u, v) for u, v, k in g.edges(keys=True) if k == "l2u")
    for name in nx.topological_sort(l2u):
        below = [g.nodes[c]["level"] for c in l2u.predecessors(name)]
        g.nodes[name]["level"] = 1 + max(below) if below else 0
    if declared is None:
        return
    for u, v, k in g.edges(keys=True):
        lo, hi = (u, v) if k == "l2u" else (v, u)
        if lo in declared and hi in declared and declared[lo] >= declared[hi]:
            raise ProgramError(
                f"{k} edge {u} -> {v} makes {lo!r} lower than {hi!r}, but their declared levels are "
                f"{declared[lo]} and {declared[hi]}; fix the levels or the dependency"
            )
