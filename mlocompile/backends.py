"""Backends: what executes a step graph after the pass pipeline.

``direct_runner`` (the fx backend) runs the GraphModule's generated code with each aten
call bound to the operator's C++ entry point; ``compile_with_inductor`` hands the graph
to inductor. The eager backend has no graph: it calls the step function itself.
"""

from __future__ import annotations

import copy
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
    """
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

    src = _OP_CALL.sub(bind, code.src)
    filename = f"<mlocompile {title}>.{id(gm):x}"
    scope.update(torch=torch, __name__=filename, __loader__=_SourceLoader(src))
    exec(compile(src, filename, "exec"), scope)  # noqa: S102 - our own generated code
    forward = scope["forward"]

    def run(*tensors: torch.Tensor) -> Any:
        return forward(gm, *tensors)

    return run


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
