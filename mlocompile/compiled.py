"""CompiledProgram: what the compiler emitted, as plain data for people and tools to inspect."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.fx import GraphModule

from mlocompile import cost, viz
from mlocompile.ir import format_graph
from mlocompile.program import ProgramGraph
from passes.report import PassReport


@dataclass(frozen=True)
class CompiledProgram:
    """The program graph, every emitted step graph and the pass report of one compile.

    A snapshot: ``Engine.compile()`` (or ``mlocompile.compile(engine)``) builds it from
    the latest trace of every step. ``.ir`` is deterministic text (golden tests compare
    it), ``.code`` the Python source FX generated for each step (it executes),
    ``.graph_modules`` the GraphModules by step name. With the fx backend an update step
    writes the new parameters and optimizer state into its parameter/state inputs
    (``addcmul_`` on ``params.*`` in the IR): call it on copies to inspect it without stepping.
    """

    program: ProgramGraph
    graph_modules: dict[str, GraphModule] = field(default_factory=dict)  # by step name, sorted
    pass_report: PassReport = field(default_factory=PassReport)

    @property
    def ir(self) -> str:
        """The dependency graph and every annotated step graph, as deterministic text."""
        parts = [self.program.describe()]
        parts += [format_graph(gm, title) for title, gm in self.graph_modules.items()]
        return "\n\n".join(parts) + "\n"

    @property
    def code(self) -> str:
        """Python source of every emitted step, one function per step."""
        chunks = []
        for title, gm in self.graph_modules.items():
            body = gm.code.replace("def forward(self,", f"def {title}(self,", 1)
            chunks.append(f"# ---- {title} ----{body}")
        return "\n".join(chunks)

    def to_dot(self, kind: str = "program", detail: str = "blocks") -> str:
        """Graphviz DOT text: ``"program"`` (problems, u2l red, l2u green, paths) or ``"step"``.

        A step view draws one box per problem, role and module (``detail="blocks"``, with
        op counts, FLOPs and bytes) or every aten node (``detail="ops"``).
        """
        return viz.to_dot(self.program, self.graph_modules, kind, detail=detail, node_flops=cost.estimate_node_flops)

    def render(self, path: str, kind: str = "program", detail: str = "blocks") -> str:
        """Render a diagram to ``path`` (format from its extension: .svg, .png, .pdf, .dot)."""
        flops = cost.estimate_node_flops
        return viz.render(self.program, self.graph_modules, path, kind, detail=detail, node_flops=flops)

    def cost(self) -> Any:
        """Static per-step estimates: FLOPs, peak memory, and symbolic forms per method."""
        return cost.estimate_cost(self.program, self.graph_modules)

    def report(self) -> PassReport:
        """Per pass and graph: nodes before/after and time spent."""
        return self.pass_report
