"""Trace a step function into an annotated, aten-level FX GraphModule with make_fx."""

from __future__ import annotations

import linecache
import operator
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx.traceback as fx_traceback

try:  # NOTE: runs every step: the C++ pytree (optree) flattens ~3x and hashes specs ~20x faster
    import torch.utils._cxx_pytree as pytree
except ImportError:  # optree missing or too old: the pure-Python pytree, same results
    import torch.utils._pytree as pytree  # type: ignore[no-redef]
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx

from mlocompile.errors import MLOError, TraceError
from mlocompile.functional import reads_a_value
from mlocompile.ir import adopt_annotations, slim_meta
from mlocompile.step import StepFn

_TENSOR_META = operator.attrgetter("shape", "dtype", "device")  # NOTE: per step; 2.5x a generator's speed


@dataclass(frozen=True)
class FlatInputs:
    """A step's inputs split into distinct tensors (graph inputs) and a hashable static remainder.

    ``slots`` has one entry per leaf of the input tree: the index of its tensor in
    ``tensors``, or -1 for a static leaf. A tensor marked ``_mlo_shared`` (the
    optimizers' step counters) that appears at several leaves is one graph input.
    """

    tensors: list[torch.Tensor]
    spec: pytree.TreeSpec
    statics: tuple[Any, ...]
    slots: tuple[int, ...]

    def key(self) -> tuple[Any, ...]:
        """Return what decides whether a traced graph can be reused for these inputs.

        The slots are part of it: a graph traced with two leaves sharing one input must
        not run on inputs where they differ.
        """
        return (self.spec, self.statics, self.slots, tuple(map(_TENSOR_META, self.tensors)))


def flatten_inputs(inputs: dict[str, Any]) -> FlatInputs:
    """Split a step's input pytree into distinct tensors (graph inputs) and static leaves."""
    leaves, spec = pytree.tree_flatten(inputs)
    index: dict[int, int] = {}
    tensors: list[torch.Tensor] = []
    statics: list[Any] = []
    slots: list[int] = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            if getattr(x, "_mlo_shared", False):  # e.g. optimizer step counters (optim._shared_step)
                i = index.setdefault(id(x), len(tensors))
            else:
                i = len(tensors)
            if i == len(tensors):
                tensors.append(x)
            slots.append(i)
        else:
            statics.append(x)
            slots.append(-1)
    try:
        hash(tuple(statics))
    except TypeError as exc:
        raise TraceError(
            f"a batch holds an unhashable non-tensor value ({exc}); batches may hold tensors, numbers and strings"
        ) from None
    return FlatInputs(tensors, spec, tuple(statics), tuple(slots))


def input_names(inputs: dict[str, Any]) -> dict[int, list[str]]:
    """Map each tensor leaf (by ``id``) to its dotted paths (``params.inner.0.weight``), in leaf order.

    (The C++ pytree has no key paths, and the Python one's leaf order need not match
    it, hence a map by identity rather than a list.)
    """
    with_paths, _ = torch.utils._pytree.tree_flatten_with_path(inputs)
    names: dict[int, list[str]] = {}
    for path, x in with_paths:
        if isinstance(x, torch.Tensor):
            names.setdefault(id(x), []).append(_path_name(path))
    return names


def _path_name(path: tuple[Any, ...]) -> str:
    parts = []
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry)))
        parts.append(str(key))
    return ".".join(parts)


def unflatten_inputs(flat: FlatInputs, tensors: list[torch.Tensor]) -> dict[str, Any]:
    """Rebuild the input pytree from graph-input tensors and the static leaves."""
    it_s = iter(flat.statics)
    leaves = [tensors[i] if i >= 0 else next(it_s) for i in flat.slots]
    return pytree.tree_unflatten(leaves, flat.spec)  # type: ignore[no-any-return]


@dataclass
class TracedStep:
    """A traced step: the GraphModule and how to map inputs/outputs to it."""

    gm: GraphModule
    out_spec: pytree.TreeSpec
    title: str
    runner: Any = None  # what executes: ``gm`` (if None), its direct-call form (fx) or its inductor-compiled form

    def __call__(self, flat: FlatInputs) -> dict[str, Any]:
        outs = (self.gm if self.runner is None else self.runner)(*flat.tensors)
        return pytree.tree_unflatten(list(outs), self.out_spec)  # type: ignore[no-any-return]


def trace_step(fn: StepFn, flat: FlatInputs, title: str) -> TracedStep:
    """Trace ``fn`` at ``flat``'s shapes into an aten-level GraphModule with mlo.* meta."""
    holder: dict[str, pytree.TreeSpec] = {}

    def flat_fn(*tensors: torch.Tensor) -> list[torch.Tensor]:
        out = fn(unflatten_inputs(flat, list(tensors)))
        leaves, holder["spec"] = pytree.tree_flatten(out)
        return leaves

    # tracing runs the step for real: it must not consume randomness (nor keep a replay's swapped state)
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        with fx_traceback.preserve_node_meta():
            # NOTE: make_fx maps tensors to placeholders by identity; flatten_inputs has
            # already made every graph input a distinct tensor, and detach() keeps them apart.
            # functionalize: PyTorch's composite kernels write in place (LSTM cells add_,
            # sigmoid_; maximum's backward masked_fill_); the passes see a pure IR instead.
            pure = torch.func.functionalize(flat_fn, remove="mutations")
            gm = make_fx(pure, tracing_mode="real")(*[t.detach() for t in flat.tensors])
    except MLOError:
        raise
    except RuntimeError as exc:
        msg = str(exc)
        if reads_a_value(msg):
            raise TraceError(f"{title}: {_value_read_advice(exc)}") from exc
        raise TraceError(f"{title}: tracing failed: {msg.splitlines()[0] if msg else type(exc).__name__}") from exc
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    adopt_annotations(gm)
    slim_meta(gm)
    linecache.clearcache()  # filled by the fake tensors' captured stacks; nothing reads it later
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = input_names(unflatten_inputs(flat, flat.tensors))
    for node, tensor in zip(placeholders, flat.tensors):
        paths = names[id(tensor)]  # the same object at several leaves: one placeholder each, in order
        node.meta["mlo.input"] = paths.pop(0) if len(paths) > 1 else paths[0]
    return TracedStep(gm=gm, out_spec=holder["spec"], title=title)


def find_loss_uses(fp: Any, name: str, params: dict[str, Any], buffers: dict[str, Any], batch: Any) -> set[str]:
    """Return the problems whose parameters problem ``name``'s loss actually reads.

    The loss alone is traced (forward only); a problem counts as used when one of
    its parameter inputs has a user in the graph. Also checks the loss is a scalar.
    """
    names = [(p, k) for p, tensors in params.items() for k in tensors]

    def loss_fn(*tensors: torch.Tensor) -> torch.Tensor:
        rebuilt: dict[str, dict[str, torch.Tensor]] = {p: {} for p in params}
        for (p, k), t in zip(names, tensors):
            rebuilt[p][k] = t
        return fp.loss(name, rebuilt, buffers, batch)[0]  # type: ignore[no-any-return]

    flat = [params[p][k].detach() for p, k in names]
    rng = torch.get_rng_state()
    try:
        with torch.no_grad():
            gm = make_fx(loss_fn, tracing_mode="real")(*flat)
    except MLOError:
        raise
    except RuntimeError as exc:
        if reads_a_value(str(exc)):
            raise TraceError(f"the training_step of problem {name!r}: {_value_read_advice(exc)}") from exc
        raise TraceError(f"tracing the training_step of problem {name!r} failed: {str(exc).splitlines()[0]}") from exc
    finally:
        torch.set_rng_state(rng)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {p for (p, _), node in zip(names, placeholders) if node.users}


def _value_read_advice(exc: BaseException) -> str:
    """Say which line of the user's code read a tensor's value, and what to do instead."""
    here = ("/torch/", "/mlocompile/", "/passes/", "/optree/", "<")
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not any(h in f.filename for h in here)]
    where = f" at {frames[-1].filename}:{frames[-1].lineno}: {frames[-1].line}" if frames else ""
    return (
        f"it reads a tensor's value in Python{where} (.item(), float(t), bool(t) or an if on a tensor), "
        "which cannot be traced; return tensors in the loss dict instead, or run with "
        "EngineConfig(compile='eager')"
    )
