"""Graphviz diagrams of a compiled program: the problem graph and the annotated step graphs.

``to_dot`` builds DOT text as plain strings (no Graphviz needed); ``render`` writes that text
next to the output and runs Graphviz's ``dot`` for SVG/PNG/PDF.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.fx import GraphModule, Node

from mlocompile.errors import ProgramError, RenderError
from mlocompile.program import ProgramGraph

# Fill colour of a step-graph node by its ``mlo.role`` (every role in mlocompile.ir.ROLES).
ROLE_COLORS: dict[str, str] = {
    "io": "#e0e0e0",
    "forward": "#aec7e8",
    "grad": "#ffbb78",
    "direct": "#f7b6d2",
    "hypergrad": "#ff9896",
    "comm": "#dbdb8d",
    "update": "#98df8a",
    "callback": "#c5b0d5",
}
# Colour of a problem-graph edge by kind, as in the Betty paper's figure.
EDGE_COLORS: dict[str, str] = {"u2l": "#ff0000", "l2u": "#008000"}
KINDS = ("program", "step", "step:<title>")
FORMATS = ("dot", "svg", "png", "pdf")
_INSTALL_HINT = "apt-get install graphviz (Debian/Ubuntu), brew install graphviz (macOS) or conda install graphviz"


def _q(text: str) -> str:
    """Quote ``text`` as a DOT string identifier."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class _Quoted(str):
    """DOT text that is already quoted and escaped (``_attrs`` passes it through)."""


def _label(lines: list[str], align: str = "center") -> _Quoted:
    """Quote a multi-line label; ``align="left"`` left-justifies every line (DOT's ``\\l``)."""
    sep = "\\l" if align == "left" else "\\n"
    body = sep.join(_q(line)[1:-1] for line in lines)
    return _Quoted(f'"{body}{sep if align == "left" else ""}"')


def _attrs(**attrs: str) -> str:
    """Format ``key=value`` pairs, quoting every value not already ``_Quoted``."""
    items = [f"{key}={value if isinstance(value, _Quoted) else _q(value)}" for key, value in attrs.items()]
    return "[" + ", ".join(items) + "]"


def to_dot(program: ProgramGraph, graph_modules: Mapping[str, GraphModule], kind: str = "program") -> str:
    """Return deterministic Graphviz DOT text for one view of a compiled program.

    Args:
        program: The program graph (problems, edges, paths, VJP plans).
        graph_modules: The emitted step graphs by name (``CompiledProgram.graph_modules``).
        kind: ``"program"`` (problems by level, u2l red, l2u green, paths and VJP plan),
            ``"step"`` (every step graph, clustered by problem, coloured by role) or
            ``"step:<title>"`` (one step graph, e.g. ``"step:step_inner"``).

    Raises:
        ProgramError: ``kind`` is not one of the above or names no emitted step graph.
    """
    if kind == "program":
        return _program_dot(program)
    if kind == "step" or kind.startswith("step:"):
        graphs = graph_modules
        title = kind.partition(":")[2]
        if title and title not in graphs:
            raise ProgramError(f"to_dot: no step graph named {title!r}; emitted step graphs are {sorted(graphs)}")
        chosen = {title: graphs[title]} if title else dict(graphs)
        return _steps_dot(chosen, set(program.problems))
    raise ProgramError(f"to_dot: unknown kind {kind!r}; use one of {', '.join(KINDS)}")


def _program_dot(prog: ProgramGraph) -> str:
    out = [
        "digraph program {",
        '  graph [rankdir=TB, nodesep=0.6, ranksep=0.8, fontname="Helvetica"];',
        '  node [shape=box, style="rounded,filled", fillcolor="#f5f5f5", fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=10];',
    ]
    levels = sorted({prog.level(n) for n in prog.problems}, reverse=True)
    for lvl in levels:
        names = [n for n in prog.problems if prog.level(n) == lvl]
        out.append(f"  {{ rank=same; {_q(f'level {lvl}')} {_attrs(shape='plaintext', style='', fontcolor='gray40')};")
        for name in names:
            label = _label([name, f"level {lvl} · {prog.problems[name].config.type}"])
            out.append(f"    {_q('problem:' + name)} {_attrs(label=label)};")
        out.append("  }")
    # NOTE: an invisible chain of level labels pins higher levels above lower ones
    anchors = [f"level {lvl}" for lvl in levels] + ["paths"]
    out += [f"  {_q(a)} -> {_q(b)} [style=invis];" for a, b in zip(anchors, anchors[1:])]
    for kind in ("u2l", "l2u"):
        for u, v in prog.edges(kind):
            via = prog.graph.edges[u, v, kind].get("via", "loss")
            text = kind if kind == "l2u" or via == "loss" else f"{kind} ({via})"
            color = EDGE_COLORS[kind]
            # l2u edges point up: let u2l edges alone decide the vertical layout
            extra = {"constraint": "false"} if kind == "l2u" else {}
            attrs = _attrs(label=text, color=color, fontcolor=color, penwidth="1.6", **extra)
            out.append(f"  {_q('problem:' + u)} -> {_q('problem:' + v)} {attrs};")
    out.append(f"  {_q('paths')} {_attrs(shape='note', style='', label=_label(_path_lines(prog), 'left'))};")
    out.append("}")
    return "\n".join(out) + "\n"


def _path_lines(prog: ProgramGraph) -> list[str]:
    paths = [str(p) for ps in prog.paths.values() for p in ps]
    lines = ["hypergradient paths:"] + [f"  {p}" for p in paths or ["(none)"]]
    ops = [(upper, op) for upper, plan in prog.plans.items() for op in plan]
    if ops:
        lines.append("VJP plan:")
    for upper, op in ops:
        src = f"dC/d{op.curr}" if op.source is None else f"v{op.source}"
        method = prog.problems[op.curr].config.type
        lines.append(f"  {upper}.v{op.id} = vjp[{op.curr} ({method})]({src}) -> d/d{op.prev}")
    return lines


def _op_label(node: Node) -> str:
    if node.op == "placeholder":
        return str(node.meta.get("mlo.input", node.name))
    if node.op in ("output", "get_attr"):
        return node.op if node.op == "output" else str(node.target)
    target = node.target
    name = str(target) if hasattr(target, "overloadpacket") else getattr(target, "__name__", str(target))
    return name.removeprefix("aten.").removesuffix(".default")


def _shape(val: Any) -> str | None:
    shape = getattr(val, "shape", None)
    return None if shape is None else "[" + "x".join(str(int(s)) for s in shape) + "]"


def _node_problem(node: Node, problems: set[str]) -> str | None:
    if "mlo.problem" in node.meta:
        return str(node.meta["mlo.problem"])
    parts = str(node.meta.get("mlo.input", "")).split(".")
    if len(parts) > 1 and parts[1] in problems:  # params.<p>..., last.<p>..., windows.<p>...
        return parts[1]
    return "inputs" if node.op == "placeholder" else None


def _step_node(nid: str, node: Node) -> str:
    role = str(node.meta.get("mlo.role", ""))
    shape = _shape(node.meta.get("val"))
    tags = [f"{k[4:]}={node.meta[k]}" for k in ("mlo.role", "mlo.method", "mlo.path", "mlo.edge") if k in node.meta]
    tooltip = " ".join([f"{node.name} = {_op_label(node)}", *tags])
    label = _label([_op_label(node)] + ([shape] if shape else []))
    return f"{_q(nid)} {_attrs(label=label, fillcolor=ROLE_COLORS.get(role, 'white'), tooltip=tooltip)};"


def _steps_dot(graphs: dict[str, GraphModule], problems: set[str]) -> str:
    out = [
        "digraph step {",
        '  graph [rankdir=TB, fontname="Helvetica", compound=true];',
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=9, height=0.2, margin="0.05,0.02"];',
        '  edge [color="#606060", arrowsize=0.5];',
    ]
    for title, gm in graphs.items():
        out += [f"  subgraph {_q('cluster_' + title)} {{", f"    label={_q(title)}; fontsize=14; style=bold;"]
        groups: dict[str | None, list[str]] = {}
        for node in gm.graph.nodes:
            groups.setdefault(_node_problem(node, problems), []).append(_step_node(f"{title}/{node.name}", node))
        for group, lines in groups.items():
            if group is None:
                out += [f"    {line}" for line in lines]
                continue
            name = "step inputs" if group == "inputs" and group not in problems else f"problem {group}"
            out += [f"    subgraph {_q(f'cluster_{title}/{group}')} {{", f"      label={_q(name)}; style=dashed;"]
            out += [f"      {line}" for line in lines] + ["    }"]
        out.append("  }")
        for node in gm.graph.nodes:
            for inp in node.all_input_nodes:
                out.append(f"  {_q(f'{title}/{inp.name}')} -> {_q(f'{title}/{node.name}')};")
    out += ['  subgraph "cluster_legend" {', '    label="mlo.role"; style=solid;', "    { rank=same;"]
    out += [f"      {_q('legend:' + r)} {_attrs(label=r, fillcolor=c)};" for r, c in ROLE_COLORS.items()]
    keys = [_q("legend:" + r) for r in ROLE_COLORS]
    out += [f"      {a} -> {b} [style=invis];" for a, b in zip(keys, keys[1:])] + ["    }", "  }", "}"]
    return "\n".join(out) + "\n"


def _temp_beside(path: Path) -> Path:
    # NOTE: not mkstemp: its 0600 mode would outlive os.replace; a plain open honours the umask
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = _temp_beside(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def render(
    program: ProgramGraph, graph_modules: Mapping[str, GraphModule], path: str | os.PathLike[str], kind: str = "program"
) -> str:
    """Write the diagram ``kind`` of a compiled program to ``path``; return the path written.

    The DOT text always goes to ``path`` with a ``.dot`` suffix; for ``.svg``, ``.png`` and
    ``.pdf`` Graphviz's ``dot`` then renders it. Both files are written atomically.

    Args:
        program: As for :func:`to_dot`.
        graph_modules: As for :func:`to_dot`.
        path: Output file; its extension picks the format (one of ``FORMATS``).
        kind: As for :func:`to_dot`.

    Raises:
        RenderError: the extension is unknown, ``dot`` is not installed, or ``dot`` failed.
    """
    out = Path(path)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise RenderError(
            f"render: cannot tell the format of {str(out)!r}; end the path with one of .{', .'.join(FORMATS)}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    dot_path = out.with_suffix(".dot")
    _write_atomic(dot_path, to_dot(program, graph_modules, kind).encode())
    if fmt == "dot":
        return str(dot_path)
    exe = shutil.which("dot")
    if exe is None:
        raise RenderError(
            f"render: Graphviz's `dot` is not installed (not on PATH), so {str(out)!r} cannot be drawn; "
            f"install it with {_INSTALL_HINT}. The DOT text was written to {str(dot_path)!r}."
        )
    tmp = _temp_beside(out)
    try:
        proc = subprocess.run([exe, f"-T{fmt}", str(dot_path), "-o", str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RenderError(
                f"render: `dot -T{fmt} {dot_path}` failed (exit {proc.returncode}): {proc.stderr.strip()}"
            )
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return str(out)
