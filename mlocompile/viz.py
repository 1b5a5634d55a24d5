"""Graphviz diagrams of a compiled program: the problem graph and the annotated step graphs.

``to_dot`` builds DOT text as plain strings (no Graphviz needed); ``render`` writes that text
next to the output and runs Graphviz's ``dot`` for SVG/PNG/PDF. A step graph is drawn at one
of the ``DETAILS``: ``"blocks"`` (one box per problem, role and module, labelled with its op
count, FLOPs and bytes; edges carry tensor shapes) or ``"ops"`` (every aten node).
"""

from __future__ import annotations

import operator
import os
import shutil
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule, Node

from mlocompile.analysis import aliased_input, find_written_args, format_bytes, nbytes
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
DETAILS = ("blocks", "ops")
FORMATS = ("dot", "svg", "png", "pdf")
# FLOPs of one node: ``mlocompile.cost.estimate_node_flops``, passed in by the callers above
# (cost sits in this module's layer, so this module cannot import it)
NodeFlops = Callable[[Node], int]
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


def to_dot(
    program: ProgramGraph,
    graph_modules: Mapping[str, GraphModule],
    kind: str = "program",
    *,
    detail: str = "blocks",
    node_flops: NodeFlops | None = None,
) -> str:
    """Return deterministic Graphviz DOT text for one view of a compiled program.

    Args:
        program: The program graph (problems, edges, paths, VJP plans).
        graph_modules: The emitted step graphs by name (``CompiledProgram.graph_modules``).
        kind: ``"program"`` (problems by level, u2l red, l2u green, paths and VJP plan),
            ``"step"`` (every step graph, clustered by problem, coloured by role) or
            ``"step:<title>"`` (one step graph, e.g. ``"step:step_inner"``).
        detail: How a step graph is drawn: ``"blocks"`` (one box per problem, role and
            module, see :func:`find_modules` and :func:`find_blocks`; inputs summarized per
            group) or ``"ops"`` (every aten node). The program view ignores it.
        node_flops: FLOPs of one node, for the block labels (``CompiledProgram`` passes
            ``mlocompile.cost.estimate_node_flops``); None leaves FLOPs out.

    Raises:
        ProgramError: ``kind`` or ``detail`` is not one of the above, or ``kind`` names no
            emitted step graph.
    """
    if detail not in DETAILS:
        raise ProgramError(f"to_dot: unknown detail {detail!r}; use one of {', '.join(DETAILS)}")
    if kind == "program":
        return _program_dot(program)
    if kind == "step" or kind.startswith("step:"):
        graphs = graph_modules
        title = kind.partition(":")[2]
        if title and title not in graphs:
            raise ProgramError(f"to_dot: no step graph named {title!r}; emitted step graphs are {sorted(graphs)}")
        chosen = {title: graphs[title]} if title else dict(graphs)
        if detail == "ops":
            return _steps_dot(chosen, set(program.problems))
        return _blocks_dot(chosen, set(program.problems), node_flops)
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


# --- the block view: one box per (problem, role, module) -----------------------------------------
# Roles that run after the values they serve (gradients, hypergradients, updates): their module
# comes from their users, as a backward pass meets layers in reverse; other roles' from inputs.
_REVERSE_ROLES = frozenset({"grad", "hypergrad", "update"})
# Roles whose same-shaped results of a parameter are new values of it (darts' w ± εv, updates).
_UPDATING_ROLES = frozenset({"hypergrad", "update"})
# Roles drawn as one block per problem, whatever modules their nodes touch.
_WHOLE_ROLES = frozenset({"update", "comm"})
# Inputs summarized per problem (``params.<p>...``); the others by their first name alone.
_PER_PROBLEM_INPUTS = frozenset({"params", "buffers", "last", "windows", "lower_opt"})

_BlockKey = tuple[str, str, str | None]  # (problem, role, module or None)


@dataclass
class Block:
    """Nodes of one step graph drawn as one box: same problem, role and module (``find_blocks``)."""

    key: _BlockKey
    nodes: list[Node] = field(default_factory=list)
    feeds: set[int] = field(default_factory=set)  # indices of the blocks it reads from


def _param_module(node: Node, problems: set[str]) -> str | None:
    """``params.inner.0.weight`` -> ``inner.0``: the module a parameter or buffer input belongs to.

    An unrolled window's copies count too: ``windows.<p>.params.<path>`` and the other
    problems' ``windows.<p>.others.<k>.<q>.<path>``.
    """
    parts = str(node.meta.get("mlo.input", "")).split(".")
    if parts[0] == "windows" and len(parts) > 3 and parts[2] == "params":
        parts = ["params", parts[1], *parts[3:]]
    elif parts[0] == "windows" and len(parts) > 5 and parts[2] == "others":
        parts = ["params", *parts[4:]]
    if parts[0] in ("params", "buffers") and len(parts) > 2 and parts[1] in problems:
        return ".".join(parts[1:-1])
    return None


def _stack_module(node: Node) -> str | None:
    """The innermost module of an FX ``nn_module_stack`` (``{key: (path, type)}``), if one was recorded."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    innermost = list(stack.values())[-1]
    return str(innermost[0] if isinstance(innermost, tuple) else innermost)


def _dims(node: Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _agreed(values: list[str | None]) -> str | None:
    """The one module all entries name; None if they disagree, one is None, or there are none."""
    return values[0] if values and None not in values and len(set(values)) == 1 else None


def _kin(a: Node, b: Node) -> bool:
    """Whether two nodes were traced for the same problem in the same role."""
    return all(a.meta.get(k) == b.meta.get(k) for k in ("mlo.problem", "mlo.role"))


def _users(node: Node) -> list[Node]:
    """The computing users of ``node``, looking through ``getitem`` of a tuple it returns."""
    found = []
    for user in node.users:
        if user.op != "call_function":
            continue
        found += _users(user) if user.target is operator.getitem else [user]
    return found


def find_modules(gm: GraphModule, problems: set[str]) -> dict[Node, str | None]:
    """Return the module path (``inner.0``) each node of a step graph computes for, or None.

    The step graphs carry no module stack (``slim_meta`` keeps only ``mlo.*`` and ``val``),
    so the module is read off the parameters, whose inputs are named
    ``params.<problem>.<path>``. An ``nn_module_stack`` entry wins where a tracer left one.
    Else a node reading a parameter, a view of one or, in ``_UPDATING_ROLES``, a same-shaped
    new value of one (darts' ``w ± εv``, an unrolled step) belongs to that parameter's
    module. A node reading none inherits, in forward roles, the module all its inputs of
    the same problem and role agree on when it keeps their shape (``relu`` after a
    ``Linear``); in backward roles (``_REVERSE_ROLES``) the module its users agree on, kept
    where the node has one of that module's forward shapes or reads a node already in it
    (so a loss's backward stays apart, as its forward does). An inference: second-order
    products (neumann, cg, itd) leave more nodes without a module than darts does.
    """
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    weight_of: dict[Node, str] = {}  # parameter-valued nodes -> their module
    module: dict[Node, str | None] = {}
    for node in nodes:
        owned = [i for i in node.all_input_nodes if i in weight_of]
        owners = {weight_of[i] for i in owned}
        own = _param_module(node, problems)
        source = aliased_input(node) if node.op == "call_function" else None
        if own is None and source in weight_of:
            own = weight_of[source]  # type: ignore[index]
        elif own is None and _role(node) in _UPDATING_ROLES and any(_dims(i) == _dims(node) for i in owned):
            own = next(iter(owners)) if len(owners) == 1 else None
        if own is not None:
            weight_of[node] = own
        module[node] = _stack_module(node) or own or (next(iter(owners)) if len(owners) == 1 else None)
    _inherit_forward(nodes, module)
    _inherit_backward(nodes, module)
    for node in nodes:
        if node.target is operator.getitem and isinstance(parent := node.args[0], Node):
            module[node] = module[parent]
    return module


def _inherit_forward(nodes: list[Node], module: dict[Node, str | None]) -> None:
    for node in nodes:
        if module[node] is not None or node.op != "call_function" or _role(node) in _REVERSE_ROLES:
            continue
        kin = [i for i in node.all_input_nodes if i.op != "placeholder" and _kin(i, node)]
        if all(_dims(i) == _dims(node) is not None for i in kin):
            module[node] = _agreed([module[i] for i in kin])


def _inherit_backward(nodes: list[Node], module: dict[Node, str | None]) -> None:
    backward = [n for n in nodes if module[n] is None and n.op == "call_function" and _role(n) in _REVERSE_ROLES]
    candidate: dict[Node, str | None] = {}
    for node in reversed(backward):
        # NOTE: users in the same problem and role must all agree; others count only if placed
        votes = [candidate.get(u, module[u]) for u in _users(node)]
        votes = [v for u, v in zip(_users(node), votes) if v is not None or _kin(u, node)]
        candidate[node] = _agreed(votes)
    shapes: dict[str, set[tuple[int, ...] | None]] = {}
    for node in nodes:
        if module[node] is not None and (node.op == "placeholder" or _role(node) not in _REVERSE_ROLES):
            shapes.setdefault(str(module[node]), set()).add(_dims(node))
    for node in backward:
        cand = candidate[node]
        if cand is not None and (
            _dims(node) in shapes.get(cand, set()) or any(module.get(i) == cand for i in node.all_input_nodes)
        ):
            module[node] = cand


def _role(node: Node) -> str:
    return str(node.meta.get("mlo.role", ""))


def _block_key(node: Node, module: dict[Node, str | None]) -> _BlockKey:
    role = _role(node)
    return str(node.meta.get("mlo.problem", "?")), role, None if role in _WHOLE_ROLES else module[node]


def _depends(blocks: list[Block], start: int, target: int) -> bool:
    """Whether block ``start`` reads, through any chain of blocks, from block ``target``."""
    seen, todo = set(), [start]
    while todo:
        b = todo.pop()
        if b == target:
            return True
        if b not in seen:
            seen.add(b)
            todo += blocks[b].feeds
    return False


def find_blocks(gm: GraphModule, module: dict[Node, str | None]) -> tuple[list[Block], dict[Node, int]]:
    """Group the computing nodes of ``gm`` by ``(problem, role, module)``, keeping the groups acyclic.

    Nodes are visited in execution order; a node joins the latest block of its key unless
    one of its inputs comes from a block that itself reads from that block (joining would
    draw a cycle): then it opens a new block of the same key (``#2``).
    """
    blocks: list[Block] = []
    latest: dict[_BlockKey, int] = {}
    where: dict[Node, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        key = _block_key(node, module)
        feeds = {where[i] for i in node.all_input_nodes if i in where}
        b = latest.get(key)
        if b is None or any(f != b and _depends(blocks, f, b) for f in feeds):
            b = latest[key] = len(blocks)
            blocks.append(Block(key))
        blocks[b].nodes.append(node)
        blocks[b].feeds |= feeds - {b}
        where[node] = b
    return blocks, where


def _input_group(node: Node, problems: set[str]) -> str:
    """``params.inner.0.weight`` -> ``params.inner``; ``opt.0.weight.step`` -> ``opt``."""
    parts = str(node.meta.get("mlo.input", node.name if node.op == "placeholder" else "constants")).split(".")
    if parts[0] in _PER_PROBLEM_INPUTS and len(parts) > 1 and parts[1] in problems:
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} "


def _shapes_label(producers: list[Node], limit: int = 3) -> str:
    """``[16x8]``, or ``2× [8]`` for repeats, one line per shape, ``+k more`` past ``limit``."""
    counts = Counter(s for n in producers if (s := _shape(n.meta.get("val"))) is not None)
    lines = [s if c == 1 else f"{c}× {s}" for s, c in counts.items()]
    return "\n".join(lines[:limit] + ([f"+{len(lines) - limit} more"] if len(lines) > limit else []))


def _block_node(nid: str, block: Block, repeat: int, node_flops: NodeFlops | None) -> str:
    problem, role, mod = block.key
    ops = [n for n in block.nodes if n.target is not operator.getitem]
    names = Counter(_op_label(n) for n in ops)
    head = f"{mod or problem} · {role}" + (f" #{repeat}" if repeat > 1 else "")
    lines = [head]
    first = next((n for n in block.nodes if "mlo.method" in n.meta), None)
    if first is not None:
        lines.append(f"{first.meta['mlo.method']} ({first.meta.get('mlo.path', '?')})")
    top = [name for name, _ in names.most_common(3)]
    lines.append(", ".join(top) + (", …" if len(names) > 3 else ""))
    # NOTE: a view writes nothing; an in-place or out= op writes its result like any other op
    written = sum(nbytes(n.meta.get("val")) for n in ops if aliased_input(n) is None or find_written_args(n))
    cost = [f"{len(ops)} ops"] + ([f"{_si(sum(node_flops(n) for n in ops))}FLOPs"] if node_flops else [])
    lines.append(" · ".join([*cost, f"{format_bytes(written)} written"]))
    tooltip = f"problem={problem} role={role} module={mod or '-'}: " + ", ".join(f"{k}×{c}" for k, c in names.items())
    return f"{_q(nid)} {_attrs(label=_label(lines), fillcolor=ROLE_COLORS.get(role, 'white'), tooltip=tooltip)};"


def _legend_node() -> str:
    cells = "".join(f'<td bgcolor="{c}">{r}</td>' for r, c in ROLE_COLORS.items())
    table = f'<<table border="0" cellspacing="2" cellpadding="3"><tr><td>mlo.role</td>{cells}</tr></table>>'
    return f"  legend {_attrs(shape='plaintext', style='', label=_Quoted(table))};"


_BLOCKS_HEADER = (
    "digraph step {",
    # NOTE: newrank: Graphviz 2.4x fails ranking nested clusters with this many edges without it
    '  graph [rankdir=TB, fontname="Helvetica", compound=true, newrank=true, nodesep=0.3, ranksep=0.35];',
    '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, margin="0.08,0.03"];',
    '  edge [color="#606060", arrowsize=0.6, fontname="Helvetica", fontsize=8, fontcolor="#404040"];',
)


def _blocks_dot(graphs: dict[str, GraphModule], problems: set[str], node_flops: NodeFlops | None) -> str:
    out = list(_BLOCKS_HEADER)
    for title, gm in graphs.items():
        out += _block_step_lines(title, gm, problems, node_flops)
    out += [_legend_node(), "}"]
    return "\n".join(out) + "\n"


def _block_step_lines(title: str, gm: GraphModule, problems: set[str], node_flops: NodeFlops | None) -> list[str]:
    """One step graph's cluster: input groups, a cluster of blocks per problem, outputs; then the edges."""
    blocks, where = find_blocks(gm, find_modules(gm, problems))
    source: dict[Node, str] = {n: f"{title}/{b}" for n, b in where.items()}
    out = [f"  subgraph {_q('cluster_' + title)} {{", f"    label={_q(title)}; fontsize=14; style=bold;"]
    groups: dict[str, list[Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder" or node.op == "get_attr" and not _is_planned_buffer(node):
            groups.setdefault(_input_group(node, problems), []).append(node)
    for group, members in groups.items():
        source.update((n, f"{title}/in:{group}") for n in members)
        lines = [group, f"{len(members)} tensors · {format_bytes(sum(nbytes(n.meta.get('val')) for n in members))}"]
        out.append(f"    {_q(f'{title}/in:{group}')} {_attrs(label=_label(lines), fillcolor=ROLE_COLORS['io'])};")
    seen: Counter[_BlockKey] = Counter()
    by_problem: dict[str, list[str]] = {}
    for b, block in enumerate(blocks):
        seen[block.key] += 1
        line = _block_node(f"{title}/{b}", block, seen[block.key], node_flops)
        by_problem.setdefault(block.key[0], []).append(line)
    for problem, lines in by_problem.items():
        out += [f"    subgraph {_q(f'cluster_{title}/{problem}')} {{", f"      label={_q(f'problem {problem}')};"]
        out += ["      style=dashed;"] + [f"      {line}" for line in lines] + ["    }"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    returned = _label(["outputs", f"{len(dict.fromkeys(output.all_input_nodes))} values"])
    out += [f"    {_q(f'{title}/outputs')} {_attrs(label=returned, fillcolor=ROLE_COLORS['io'])};", "  }"]
    return out + _edge_lines(gm, source, f"{title}/outputs")


def _is_planned_buffer(node: Node) -> bool:
    """A static buffer (``plan_static_buffers``) that ops only write into (``out=``): storage, not data."""
    return node.op == "get_attr" and bool(node.users) and all(node in find_written_args(u) for u in node.users)


def _edge_lines(gm: GraphModule, source: dict[Node, str], sink: str) -> list[str]:
    """One edge per pair of boxes a value crosses between, labelled with the shapes it carries."""
    carried: dict[tuple[str, str], dict[Node, None]] = {}
    for node in gm.graph.nodes:
        dst = sink if node.op == "output" else source.get(node) if node.op == "call_function" else None
        for inp in node.all_input_nodes if dst is not None else []:
            src = source.get(inp)
            if src is not None and src != dst:
                carried.setdefault((src, str(dst)), {})[inp] = None
    lines = []
    for (src, dst), values in carried.items():
        label = _shapes_label(list(values))
        lines.append(f"  {_q(src)} -> {_q(dst)}" + (f" {_attrs(label=label)}" if label else "") + ";")
    return lines


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
    program: ProgramGraph,
    graph_modules: Mapping[str, GraphModule],
    path: str | os.PathLike[str],
    kind: str = "program",
    *,
    detail: str = "blocks",
    node_flops: NodeFlops | None = None,
) -> str:
    """Write the diagram ``kind`` of a compiled program to ``path``; return the path written.

    The DOT text always goes to ``path`` with a ``.dot`` suffix; for ``.svg``, ``.png`` and
    ``.pdf`` Graphviz's ``dot`` then renders it. Both files are written atomically.

    Args:
        program: As for :func:`to_dot`.
        graph_modules: As for :func:`to_dot`.
        path: Output file; its extension picks the format (one of ``FORMATS``).
        kind: As for :func:`to_dot`.
        detail: As for :func:`to_dot`.
        node_flops: As for :func:`to_dot`.

    Raises:
        ProgramError: As for :func:`to_dot` (then nothing is written).
        RenderError: the extension is unknown, ``dot`` is not installed, or ``dot`` failed.
    """
    out = Path(path)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise RenderError(
            f"render: cannot tell the format of {str(out)!r}; end the path with one of .{', .'.join(FORMATS)}"
        )
    text = to_dot(program, graph_modules, kind, detail=detail, node_flops=node_flops)
    out.parent.mkdir(parents=True, exist_ok=True)
    dot_path = out.with_suffix(".dot")
    _write_atomic(dot_path, text.encode())
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
