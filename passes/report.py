"""What the pass runner records: per pass and graph, node counts and time spent."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PassRecord:
    """What one pass did to one graph: node counts and time spent."""

    graph: str
    name: str
    nodes_before: int
    nodes_after: int
    seconds: float


@dataclass
class PassReport:
    """Every pass run, in order."""

    records: list[PassRecord] = field(default_factory=list)

    def __str__(self) -> str:
        rows = [f"{'graph':<28} {'pass':<34} {'before':>7} {'after':>7} {'ms':>8}"]
        for r in self.records:
            rows.append(f"{r.graph:<28} {r.name:<34} {r.nodes_before:>7} {r.nodes_after:>7} {1e3 * r.seconds:>8.2f}")
        return "\n".join(rows)
