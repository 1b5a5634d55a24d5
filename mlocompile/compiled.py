"""CompiledProgram: what the compiler emitted, for people and tools to inspect."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch.fx import GraphModule

from mlocompile.ir import format_graph

if TYPE_CHECKING:  # NOTE: passes imports mlocompile; importing it here would make a cycle
    from mlocompile.engine import Engine
    from passes import PassReport


class CompiledProgram:
    """The program graph plus every emitted step graph of an Engine.

    ``.ir`` is deterministic text (golden tests compare it), ``.code`` the Python
    source FX generated for each step (it executes), ``.graph_modules`` the
    GraphModules by step name. With the fx backend an update step writes the new
    parameters and optimizer state into its parameter/state inputs (``addcmul_`` on
    ``params.*`` in the IR): call it on copies to inspect it without stepping.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.program = engine.program

    @property
    def graph_modules(self) -> dict[str, GraphModule]:
        """Every emitted step graph by name (latest trace per step), sorted by name."""
        latest = self.engine.executor.latest
        return {title: latest[title].gm for title in sorted(latest)}

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

    def to_dot(self, kind: str = "program") -> str:
        """Graphviz DOT text: ``"program"`` (problems, u2l red, l2u green, paths) or ``"step"``."""
        from mlocompile.viz import to_dot

        return to_dot(self, kind)

    def render(self, path: str, kind: str = "program") -> str:
        """Render a diagram to ``path`` (format from its extension: .svg, .png, .pdf, .dot)."""
        from mlocompile.viz import render

        return render(self, path, kind)

    def cost(self) -> Any:
        """Static per-step estimates: FLOPs, peak memory, and symbolic forms per method."""
        from mlocompile.cost import estimate_cost

        return estimate_cost(self)

    def report(self) -> PassReport:
        """Per pass and graph: nodes before/after and time spent."""
        return self.engine.executor.report


def compile(engine: Engine) -> CompiledProgram:
    """Trace and optimize every step of ``engine`` now; return what was emitted."""
    return engine.compile()  # type: ignore[no-any-return]
