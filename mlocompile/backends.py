"""Backends: what executes a step graph after the pass pipeline.

``direct_runner`` (the fx backend) runs the GraphModule's generated code with each aten
call bound to the operator's C++ entry point; ``compile_with_inductor`` hands the graph
to inductor. The eager backend has no graph: it calls the step function itself.
"""

from __future__ import annotations

import copy
import math
import operator
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import GraphModule

_OP_CALL = re.compile(r"\btorch\.ops\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)\(")


class _SourceLoader:
    """Serves a generated step's source to ``linecache`` so tracebacks show its lines."""

    def __init__(self, src: str) -> None:
        self.src = src

    def get_source(self, name: str) -> str:
        return self.src


def direct_runner(gm: torch.fx.GraphModule, title: str) -> Any:
    """Return a function that runs ``gm`` calling each aten op's C++ entry point directly.

    FX's generated code calls ``torch.ops.aten.mul.Tensor(...)``: four attribute lookups
    and ``OpOverload.__call__``, a Python frame that only forwards to the operator's
    C++ binding (``OpOverload._op``). The fx backend runs hundreds of small ops a step,
    so this costs ~1 µs an op: the same source with each such call bound to a module
    global holding ``_op`` runs the same operators in the same order, ~10% faster on
    Meta-Weight-Net and ~17% on small HPO steps (``benchmarks/README.md``). Only plain
    ``OpOverload``s are rebound; anything else is called as FX wrote it.

    The source is written by ``step_source`` (the statements FX's ``python_code`` writes,
    in the same order, freeing each value after its last use as FX does, in a third of
    the time: a 69,000-node step takes ~1.5 s in FX's code generator); a graph it does
    not cover (call_method/call_module nodes, unusual placeholders) gets FX's source with
    the calls rebound. A source longer than ``CHUNK_LINES`` statements is compiled and run
    in pieces (``_chunked_runner``).
    """
    written = step_source(gm)
    if written is None:
        src, scope = _fx_source(gm)
    else:
        src, scope = written
    filename = f"<mlocompile {title}>.{id(gm):x}"
    scope.update(torch=torch, __name__=filename, __loader__=_SourceLoader(src))
    lines = src.splitlines()
    if written is not None and len(lines) > CHUNK_LINES:
        return _chunked_runner(gm, lines, scope, filename)
    exec(compile(src, filename, "exec"), scope)  # noqa: S102 - our own generated code
    forward = scope["forward"]

    def run(*tensors: torch.Tensor) -> Any:
        return forward(gm, *tensors)

    return run


CHUNK_LINES = 2000  # a longer step source is compiled (and run) this many statements at a time
_RESULT = "_mlo_result"


def _chunked_runner(gm: GraphModule, lines: list[str], scope: dict[str, Any], filename: str) -> Any:
    """Run a long step source (``step_source``'s: a header, one statement per line, a return) as
    module-level statements compiled ``CHUNK_LINES`` at a time, in one namespace per call.

    Python's compiler holds the whole syntax tree and symbol table of what it compiles:
    for the 49,000 statements of a 4-level step that is ~450 MB, and on a machine where
    fresh pages are expensive (a VM's first touch), a compile of it took 2.4 s where a
    second compile of the same source took 1.2 s. Compiled in pieces, the memory is
    reused from piece to piece. Each piece keeps its lines' numbers in the one source
    (it is padded with blank lines), so tracebacks quote the statement that failed.
    The statements read and write a dict instead of a frame's fast locals: ~30 ns more
    per name, below 1% of any step this long.
    """
    header, body, ret = lines[0], lines[1:-1], lines[-1]
    params = [p.strip() for p in header[header.index("(") + 1 : header.rindex(")")].split(",")][1:]
    assert ret.startswith("    return ") and all(line.startswith("    ") for line in body)
    codes = []
    for start in range(0, len(body), CHUNK_LINES):
        piece = [line[4:] for line in body[start : start + CHUNK_LINES]]
        if start + CHUNK_LINES >= len(body):
            piece.append(f"{_RESULT} = {ret[len('    return ') :]}")
        codes.append(compile("\n" * (start + 1) + "\n".join(piece) + "\n", filename, "exec"))

    def run(*tensors: torch.Tensor) -> Any:
        env = dict(scope)
        env["self"] = gm
        env.update(zip(params, tensors))
        for code in codes:
            exec(code, env)  # noqa: S102 - our own generated code
        return env[_RESULT]

    return run


def _fx_source(gm: GraphModule) -> tuple[str, dict[str, Any]]:
    """FX's generated source for ``gm`` with every plain ``OpOverload`` call bound to its C++ entry point."""
    code = gm.graph.python_code(root_module="self")
    scope = dict(code.globals)

    def bind(m: re.Match[str]) -> str:
        namespace, name, overload = m.groups()
        try:
            op = getattr(getattr(getattr(torch.ops, namespace), name), overload)
        except (AttributeError, RuntimeError):
            return m.group(0)
        if type(op) is not torch._ops.OpOverload:  # e.g. higher-order or TorchBind ops
            return m.group(0)
        alias = f"_{namespace}_{name}_{overload}"
        scope[alias] = op._op
        return alias + "("

    return _OP_CALL.sub(bind, code.src), scope


_IDENTIFIER = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\Z")
_LITERALS = frozenset({int, bool, str, type(None)})
_TORCH_NAMED = frozenset({torch.dtype, torch.memory_format, torch.layout})


def _unpacking(node: torch.fx.Node) -> list[torch.fx.Node | None] | None:
    """For an op returning a fixed-size tuple whose every user is a ``getitem`` of it: the item nodes in
    order (None where nobody takes the item); else None."""
    target = node.target
    if type(target) is not torch._ops.OpOverload or len(target._schema.returns) < 2 or not node.users:
        return None
    items: list[torch.fx.Node | None] = [None] * len(target._schema.returns)
    for user in node.users:
        if user.target is not operator.getitem or user.kwargs or len(user.args) != 2 or user.args[0] is not node:
            return None
        index = user.args[1]
        if type(index) is not int or not 0 <= index < len(items) or items[index] is not None:
            return None
        items[index] = user
    return items


def step_source(gm: GraphModule) -> tuple[str, dict[str, Any]] | None:
    """Write ``gm``'s forward as Python source and the globals it needs, or None for a graph outside
    what step graphs hold (placeholders, get_attr, call_function and one output).

    The statements are FX's: one per node in graph order, ``x = op(args)`` with each plain
    ``OpOverload`` bound to its C++ entry point (``_aten_mm_default``), ``x = t[i]`` for
    ``operator.getitem``, ``x = self.path`` for get_attr, and ``; a = b = None`` after
    the last use of each value (and right after a node nobody uses); except that an op
    returning a fixed-size tuple that only ``getitem`` nodes use binds its items in one
    statement (``out, mean, rstd, = _aten_native_batch_norm_default(...)``): a quarter of
    a BatchNorm network's nodes are such items, and each line costs compile time. Arguments are
    written as literals (ints, bools, strings, None, finite floats by ``repr``, lists
    and tuples of them, nodes by name, dtypes, layouts and memory formats as ``torch.*``);
    any other value (a device, a non-finite float) is a global holding that object, as
    FX's globals do.
    """
    nodes = list(gm.graph.nodes)
    names = {n.name for n in nodes}
    scope: dict[str, Any] = {}
    constants: dict[int, str] = {}

    def global_name(base: str, value: Any) -> str:
        name = base
        while name in names or (name in scope and scope[name] is not value):
            name += "_"
        scope[name] = value
        return name

    def constant(value: Any) -> str:
        key = id(value)
        if key not in constants:
            constants[key] = global_name(f"_mlo_c{len(constants)}", value)
        return constants[key]

    def arg(a: Any) -> str:
        kind = type(a)
        if kind is torch.fx.Node:
            return a.name  # type: ignore[no-any-return]
        if kind in _LITERALS:
            return repr(a)
        if kind is float:
            return repr(a) if math.isfinite(a) else constant(a)
        if isinstance(a, list):
            return "[" + ", ".join([arg(x) for x in a]) + "]"
        if kind is tuple:
            return "(" + ", ".join([arg(x) for x in a]) + ("," if len(a) == 1 else "") + ")"
        if kind in _TORCH_NAMED:  # torch.float64, torch.preserve_format, torch.strided: as FX writes them
            text = str(a)
            if text.startswith("torch.") and getattr(torch, text[6:], None) is a:
                return text
        return constant(a)

    last_uses: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    seen: set[torch.fx.Node] = set()
    for node in reversed(nodes):
        for used in node._input_nodes:
            if used not in seen:
                seen.add(used)
                last_uses.setdefault(node, []).append(used)
    params: list[str] = []
    body: list[str] = []
    ops: dict[Any, str] = {}
    unpacked: set[torch.fx.Node] = set()
    unused = "_mlo_unused"
    while unused in names:
        unused += "_"
    for node in nodes:
        op = node.op
        if op == "placeholder":
            if node.args or not _IDENTIFIER.match(str(node.target)) or "." in str(node.target):
                return None
            params.append(node.name)
            continue
        if op == "output":
            body.append(f"    return {arg(node.args[0])}")
            continue
        freed = [n.name for n in last_uses.get(node, [])]
        if op == "get_attr":
            if not isinstance(node.target, str) or not _IDENTIFIER.match(node.target):
                return None
            line = f"    {node.name} = self.{node.target}"
        elif op == "call_function":
            target = node.target
            if target is operator.getitem and not node.kwargs and len(node.args) == 2:
                if node.args[0] in unpacked:
                    continue  # bound where its tuple is made
                line = f"    {node.name} = {arg(node.args[0])}[{arg(node.args[1])}]"
            else:
                fn = ops.get(target)
                if fn is None:
                    if type(target) is torch._ops.OpOverload:
                        base = f"_{target.namespace}_{target._opname}_{target._overloadname}"
                        fn = ops[target] = global_name(base, target._op)
                    else:
                        fn = ops[target] = global_name(f"_mlo_f{len(ops)}", target)
                call = ", ".join([arg(a) for a in node.args] + [f"{k}={arg(v)}" for k, v in node.kwargs.items()])
                items = _unpacking(node)
                if items is None:
                    line = f"    {node.name} = {fn}({call})"
                else:  # one statement binds the tuple's items (FX: the tuple, then a getitem line per item)
                    unpacked.add(node)
                    bound = [item.name if item is not None else unused for item in items]
                    line = f"    {', '.join(bound)}, = {fn}({call})"
                    freed += [item.name for item in items if item is not None and not item.users]
                    freed += [unused] if None in items else []
        else:
            return None
        if node not in unpacked and not node.users:
            freed.append(node.name)
        if freed:
            line += ";  " + " = ".join(freed) + " = None"
        body.append(line)
    header = f"def forward(self{''.join(', ' + p for p in params)}):"
    return "\n".join([header, *body]) + "\n", scope


def _compile_restarting(compile_fx: Any, gm: GraphModule, inputs: list[torch.Tensor]) -> Any:
    """Run inductor's compile, restarting it as Dynamo would when AOTAutograd asks to.

    With symbolic sizes, AOTAutograd's scalar pass may decide that a float computed from a
    size is better specialized, record that, and raise ``TensorifyScalarRestartAnalysis``:
    Dynamo catches it and starts over, and the second attempt specializes. The guard the
    compiler evaluates is read from the shape environment after this, so it includes what
    was specialized.
    """
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis

    for _ in range(3):
        try:
            return compile_fx(copy.deepcopy(gm), inputs)
        except TensorifyScalarRestartAnalysis:
            continue
    return compile_fx(gm, inputs)


def compile_with_inductor(gm: GraphModule, tensors: Sequence[torch.Tensor], title: str) -> Any:
    """Compile a step graph with inductor; on failure warn, name the op, and return None.

    ``gm`` is consumed (compile_fx may rewrite the module it is given): pass a copy.

    The graph goes to inductor directly (``torch._inductor.compile``: AOTAutograd and
    inductor, no TorchDynamo), compiled for these inputs' shapes, dtypes and devices.
    Dynamo would re-check those on every call (~40 µs of guards); the compiler's
    cache key already does, so a changed signature traces and compiles anew.
    Inductor's FX-graph and AOT caches (on by default) make a second process reuse
    the compiled kernels instead of compiling again. Random ops use torch's
    generators (``fallback_random``): the same numbers as the other backends.
    """
    from torch import _inductor  # NOTE: here, not at the top: loading inductor costs ~1 s

    try:
        # NOTE: fallback_random: random ops draw from torch's generators as eager and fx do
        # (inductor's own RNG would give other dropout masks), so an itd replay, which sets
        # the generator to each live step's state, reproduces the live steps' masks
        with _inductor.config.patch(fallback_random=True):
            return _compile_restarting(_inductor.compile, gm, list(tensors))
    except Exception as exc:  # inductor raises many types; all mean "could not compile"
        msg = str(exc)
        ops = sorted(set(re.findall(r"aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?", msg)))
        where = f" at {', '.join(ops[:3])}" if ops else ""
        first = msg.splitlines()[0] if msg else type(exc).__name__
        warnings.warn(
            f"{title}: inductor could not compile the step{where} ({first}); running it with the fx backend",
            stacklevel=3,
        )
        return None
