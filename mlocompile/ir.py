"""The MLO IR: annotation keys on FX nodes, the deterministic printer and the verifier."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx.traceback as fx_traceback
from torch.fx import GraphModule, Node

from mlocompile.analysis import is_impure, meta_tensor, size_hint, symbolic_layout, writes_an_argument
from mlocompile.errors import IRVerificationError

# Every node.meta key mlocompile uses: who writes it, who reads it.
META_KEYS: dict[str, str] = {
    "mlo.problem": "trace (annotate) writes the problem whose loss/update made the node; printer, dot, amp read",
    "mlo.role": "trace writes forward|grad|direct|hypergrad|comm|update|callback|io; printer, dot, rematerialize read",
    "mlo.edge": "trace writes 'u2l'/'l2u' + endpoints for nodes inside a best-response product; printer reads",
    "mlo.path": "trace writes the VJP op id (e.g. 'outer.v0') a hypergradient node belongs to; printer reads",
    "mlo.input": "trace writes the input's path in the step's input tree (params.inner.0.weight); printer reads",
    "mlo.remat": "rematerialize writes, on a recomputed node, the name of the node it copies; printer reads",
    "mlo.segment": "itd writes 'sweep a-b' / 'replay a-b' on the steps of a checkpointed (segmented) unroll; printer reads",
    "mlo.method": "trace writes darts|sama|neumann|cg|itd for nodes inside a best-response product; printer reads",
    "mlo.sym": "trace writes, in a graph traced with symbolic batch dimensions, each value's symbolic shape and "
    "strides (its ``val`` holds the traced example's sizes); reinplace, simplify and the buffer planner read",
}
ROLES = ("io", "forward", "grad", "direct", "hypergrad", "comm", "update", "callback")


@contextlib.contextmanager
def annotate(**meta: str) -> Iterator[None]:
    """Tag every node traced inside the block with ``mlo.<key>`` annotations."""
    with fx_traceback.annotate({f"mlo.{k}": v for k, v in meta.items()}):
        yield


def slim_meta(gm: GraphModule, adopt: bool = False) -> None:
    """Keep only the meta the IR, passes and cost model read: ``mlo.*`` and ``val``. With ``adopt`` (a
    fresh trace) the ``mlo.*`` annotations it left in ``node.meta["custom"]`` (``annotate``) become
    top-level keys, and placeholders and the output get ``mlo.role = "io"``.

    make_fx stores every value as a FakeTensor, each with its own fake mode and a
    captured Python stack (~20 KB per node in all); a ``meta``-device tensor of the
    same shape, strides and dtype carries what is needed for a few hundred bytes.
    In a graph traced with symbolic sizes (``gm.meta["mlo.dynamic"]``) ``val`` holds
    the traced example's sizes and ``mlo.sym`` the symbolic layout
    (``analysis.symbolic_layout``), so passes that compare layouts stay exact for
    every size the graph accepts. One walk over the graph (a 4-level step has 110,000 nodes).
    """
    dynamic = bool(gm.meta.get("mlo.dynamic"))
    for node in gm.graph.nodes:
        meta = node.meta
        kept = {k: v for k, v in meta.items() if k.startswith("mlo.")}
        if adopt:
            custom = meta.get("custom")
            if custom:
                for key, value in custom.items():
                    if key.startswith("mlo."):
                        kept[key] = value
            if node.op in ("placeholder", "output"):
                kept["mlo.role"] = "io"
        if "val" in meta:
            val = meta["val"]
            if dynamic:
                kept["mlo.sym"] = symbolic_layout(val)
            kept["val"] = (
                _concrete(val) if isinstance(val, torch.Tensor) else torch.utils._pytree.tree_map(_concrete, val)
            )
        meta.clear()  # NOTE: in place: assigning node.meta re-files the node in fx's lookup table
        meta.update(kept)


def _concrete(x: Any) -> Any:
    """A traced value as plain data: a tensor as a meta tensor, a symbolic size as its example's value."""
    if isinstance(x, torch.Tensor):
        # a real trace records meta tensors already (trace.one_meta_mode)
        return x if type(x) is torch.Tensor and x.is_meta else meta_tensor(x)
    return size_hint(x)


def _fmt_arg(a: Any) -> str:
    if isinstance(a, Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]"
    if isinstance(a, float):
        return repr(a)
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "")
    return repr(a) if not isinstance(a, torch.device) else f"'{a}'"


def _fmt_val(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        dims = "x".join(str(int(s)) for s in val.shape)
        return f"{str(val.dtype).replace('torch.', '')}[{dims}]"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(_fmt_val(v) for v in val) + ")"
    return type(val).__name__


def format_graph(gm: GraphModule, title: str) -> str:
    """Return a deterministic text form of one annotated step graph."""
    lines = [f"graph {title}:"]
    for node in gm.graph.nodes:
        tags = " ".join(
            f"{k[4:]}={node.meta[k]}"
            for k in ("mlo.problem", "mlo.role", "mlo.method", "mlo.edge", "mlo.path", "mlo.remat", "mlo.segment")
            if k in node.meta
        )
        val = _fmt_val(node.meta["val"]) if "val" in node.meta else "-"
        if node.op == "placeholder":
            body = f"input {node.name} = {node.meta.get('mlo.input', '?')}"
        elif node.op == "output":
            body = f"return {_fmt_arg(node.args[0])}"
        elif node.op == "get_attr":
            body = f"%{node.name} = constant {node.target}"
        else:
            args = ", ".join([_fmt_arg(a) for a in node.args] + [f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items()])
            body = f"%{node.name} = {node.target}({args})"
        lines.append(f"  {body} : {val}" + (f"  # {tags}" if tags else ""))
    return "\n".join(lines)


def is_mutating(node: Node) -> bool:
    """Whether ``node`` writes into one of its arguments (a mutable schema, or a known hidden write)."""
    return writes_an_argument(node)


def verify(gm: GraphModule, functional: bool = True) -> None:
    """Check the invariants every pass must preserve; raise IRVerificationError otherwise.

    The FX graph must lint, every computing node must carry ``mlo.problem`` and
    ``mlo.role`` with a known role, and the graph must have exactly one output.
    With ``functional`` (every graph before the passes that introduce mutation,
    ``reinplace_pointwise`` and ``plan_static_buffers``) no node may write into
    its arguments: no in-place op and no mutated input.
    """
    _lint(gm)
    outputs = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            outputs += node.op == "output"
            continue
        role = node.meta.get("mlo.role")
        if role not in ROLES or "mlo.problem" not in node.meta:
            raise IRVerificationError(
                f"node {node.name} ({node.target}) lacks mlo.problem/mlo.role annotations (role={role!r}); "
                "a pass that creates nodes must copy the meta of the node it replaces"
            )
        if functional and is_mutating(node):
            raise IRVerificationError(
                f"node {node.name} ({node.target}) writes into its input {_fmt_arg(node.args[0])} in a graph that "
                "must be functional; trace through functionalization, and introduce mutation only in the "
                "reinplace_pointwise / plan_static_buffers passes"
            )
    if outputs != 1:
        raise IRVerificationError(f"step graph has {outputs} outputs, expected 1")


_LEGAL_OPS = frozenset({"placeholder", "call_function", "call_method", "call_module", "get_attr", "output"})


def _lint(gm: GraphModule) -> None:
    """torch.fx's ``Graph.lint`` checks, in one walk: every node a legal opcode, owned by this graph,
    named once, after its inputs (each of this graph); call_function targets callable, other targets
    strings, get_attr/call_module targets present in the module. (fx's own lint also checks its
    node lookup side table and walks twice: ~3x the time on a 70,000-node step, after every pass.)"""
    graph = gm.graph
    nodes = list(graph.nodes)
    if len({n.name for n in nodes}) < len(nodes):
        names: set[str] = set()
        for node in nodes:
            if node.name in names:
                raise IRVerificationError(f"FX lint failed: node name {node.name} is defined twice")
            names.add(node.name)
    seen: set[Node] = set()
    add = seen.add
    # NOTE: the hot loop (~70,000 nodes after every pass) does only what each node needs
    for node in nodes:
        if node.graph is not graph:
            raise IRVerificationError(f"FX lint failed: node {node} does not belong to this graph")
        for arg in node._input_nodes:
            if arg not in seen:
                where = "belongs to another graph" if arg.graph is not graph else "is used before it is defined"
                raise IRVerificationError(f"FX lint failed: argument {arg} of node {node} {where}")
        add(node)
        op = node.op
        if op == "call_function":
            if not callable(node.target):
                raise IRVerificationError(f"FX lint failed: node {node} target {node.target} is not callable")
            continue
        if op not in _LEGAL_OPS:
            raise IRVerificationError(f"FX lint failed: node {node} has unknown opcode {op}")
        if not isinstance(node.target, str):
            raise IRVerificationError(f"FX lint failed: node {node} target {node.target} is not a string")
        elif op in ("get_attr", "call_module"):
            owner: Any = gm
            for atom in node.target.split("."):
                owner = getattr(owner, atom, None)
                if owner is None:
                    raise IRVerificationError(f"FX lint failed: node {node} target {node.target} does not exist")
            if op == "call_module" and not isinstance(owner, torch.nn.Module):
                raise IRVerificationError(f"FX lint failed: node {node} target {node.target} is not a module")


def remove_dead_nodes(graph: torch.fx.Graph) -> None:
    """Erase pure nodes without users, last first (so their inputs' users update as it goes).

    What torch.fx's ``Graph.eliminate_dead_code`` does, without its lint of the whole
    graph first and with purity decided once per operator (together ~1 s on a
    66,000-node step); the pipeline's graphs are verified (linted) after every pass.
    """
    for node in reversed(graph.nodes):
        if not node.users and not is_impure(node):
            graph.erase_node(node)
