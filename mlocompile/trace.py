"""Trace a step function into an annotated, aten-level FX GraphModule with make_fx."""

from __future__ import annotations

import linecache
import operator
import traceback
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx.traceback as fx_traceback

try:  # NOTE: runs every step: the C++ pytree (optree) flattens ~3x and hashes specs ~20x faster
    import torch.utils._cxx_pytree as pytree
except ImportError:  # optree missing or too old: the pure-Python pytree, same results
    import torch.utils._pytree as pytree  # type: ignore[no-redef]
from torch.fx import GraphModule
from torch.fx import graph as fx_graph
from torch.fx._lazy_graph_module import _use_lazy_graph_module
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP, DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.utils.weak import WeakIdKeyDictionary, WeakIdRef

from mlocompile.errors import MLOError, TraceError
from mlocompile.functional import reads_a_value
from mlocompile.ir import slim_meta
from mlocompile.regions import append_node
from mlocompile.step import StepFn
from mlocompile.symbolic import keep_sizes_symbolic

_TENSOR_META = operator.attrgetter("shape", "dtype", "device")  # NOTE: per step; 2.5x a generator's speed
RECORD_TORCH_FN = False  # real traces without make_fx's torch-function metadata layer (tests compare both)


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
        """Return what decides whether a graph traced at fixed sizes can be reused for these inputs.

        The slots are part of it: a graph traced with two leaves sharing one input must
        not run on inputs where they differ.
        """
        return (self.spec, self.statics, self.slots, tuple(map(_TENSOR_META, self.tensors)))

    def structure(self) -> tuple[Any, ...]:
        """``key()`` without the sizes: inputs alike in all but sizes share it (one symbolic graph may serve them)."""
        return (self.spec, self.statics, self.slots, tuple((t.dim(), t.dtype, t.device) for t in self.tensors))

    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """Every graph input's shape."""
        return tuple(tuple(t.shape) for t in self.tensors)


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


def data_inputs(inputs: dict[str, Any], flat: FlatInputs) -> frozenset[int]:
    """The graph inputs (indices into ``flat.tensors``) that are data: batches, the other problems'
    last batches, itd windows' batches; the rest are parameters, buffers and optimizer state."""
    names = input_names(inputs)
    return frozenset(
        i
        for i, t in enumerate(flat.tensors)
        if any(p.split(".")[0] in ("batch", "last") or ".batches." in p for p in names.get(id(t), []))
    )


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
    """A traced step: the GraphModule and how to map inputs/outputs to it.

    A step traced with symbolic sizes (``dynamic``: the (input, dim) pairs that are
    symbols) serves every input of its structure whose other sizes equal the traced
    example's (``shapes``) and whose sizes pass the trace's ``guard`` (what the graph
    assumed of its symbols, e.g. ``s0 >= 2`` or two batch dimensions being equal).
    """

    gm: GraphModule
    out_spec: pytree.TreeSpec
    title: str
    runner: Any = None  # what executes: ``gm`` (if None), its direct-call form (fx) or its inductor-compiled form
    dynamic: frozenset[tuple[int, int]] = frozenset()
    shapes: tuple[tuple[int, ...], ...] = ()
    guard: Any = None  # compiled guard expression over ``L["t<i>"]`` (None: no condition)
    fakes: list[torch.Tensor] | None = None  # the symbolic trace's fake inputs (a backend compiles for them)
    first: FirstResult | None = None  # what the real trace computed, for the call right after it

    def __call__(self, flat: FlatInputs) -> dict[str, Any]:
        first, self.first = self.first, None
        if first is not None and first.serves(flat.tensors):
            outs = first.take()
        else:
            outs = (self.gm if self.runner is None else self.runner)(*flat.tensors)
        return pytree.tree_unflatten(list(outs), self.out_spec)  # type: ignore[no-any-return]

    def specialized(self) -> frozenset[tuple[int, int]]:
        """The symbolic sizes tracing fixed to their traced values (code such as ``int(x.shape[0])``)."""
        if not self.fakes:
            return frozenset()
        return frozenset((i, d) for i, d in self.dynamic if self.fakes[i].shape[d].node.expr.is_number)  # type: ignore[union-attr, attr-defined]

    def accepts(self, flat: FlatInputs) -> bool:
        """Whether this symbolic step computes the step for ``flat`` (of the structure it was traced for)."""
        for i, (t, traced) in enumerate(zip(flat.tensors, self.shapes)):
            if any(n != m and (i, d) not in self.dynamic for d, (n, m) in enumerate(zip(t.shape, traced))):
                return False
        if self.guard is None:
            return True
        return bool(eval(self.guard, SYMPY_INTERP, {"L": {f"t{i}": t for i, t in enumerate(flat.tensors)}}))  # noqa: S307


@dataclass
class FirstResult:
    """The outputs a real trace computed, and what its call must find to stand for them.

    A real-mode trace runs the step on the actual inputs, op by op: the values it ends
    with are the step's results, computed by the kernels the fx runner calls in the same
    order (the passes only merge, drop and reorder work and write in place). The call
    right after the trace takes them instead of running the step a second time, where it
    gets the same input tensors at the same versions and the generators in the state the
    trace started from; it then leaves the generators where the trace left them, as the
    run would have. Anything else runs the step.
    """

    inputs: list[tuple[torch.Tensor, int]]
    outputs: list[Any]
    rng: tuple[torch.Tensor, list[torch.Tensor] | None]  # the generators before the trace
    rng_after: tuple[torch.Tensor, list[torch.Tensor] | None]

    def serves(self, tensors: list[torch.Tensor]) -> bool:
        """Whether a call on ``tensors`` now would compute exactly ``outputs``."""
        if len(tensors) != len(self.inputs):
            return False
        if any(t is not x or t._version != v for t, (x, v) in zip(tensors, self.inputs)):
            return False
        return _same_rng(_rng_now(), self.rng)

    def take(self) -> list[Any]:
        """The outputs, with the generators moved on as running the step would have."""
        cpu, cuda = self.rng_after
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        return self.outputs


def _rng_now() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def _same_rng(
    a: tuple[torch.Tensor, list[torch.Tensor] | None], b: tuple[torch.Tensor, list[torch.Tensor] | None]
) -> bool:
    if not torch.equal(a[0], b[0]) or (a[1] is None) != (b[1] is None):
        return False
    return a[1] is None or all(torch.equal(x, y) for x, y in zip(a[1], b[1]))  # type: ignore[arg-type]


def trace_step(
    fn: StepFn,
    flat: FlatInputs,
    title: str,
    dynamic: frozenset[tuple[int, int]] = frozenset(),
    keep_result: bool = False,
) -> TracedStep:
    """Trace ``fn`` at ``flat``'s shapes into an aten-level GraphModule with mlo.* meta.

    ``dynamic`` names (input, dim) pairs to trace as symbols (make_fx's symbolic mode
    over fake inputs): the graph then serves other sizes there, as ``TracedStep.accepts``
    checks. Without it the trace runs for real at these shapes, and ``keep_result``
    keeps what it computed for the next call (``FirstResult``).
    """
    holder: dict[str, Any] = {}

    def flat_fn(*tensors: torch.Tensor) -> list[torch.Tensor]:
        out = fn(unflatten_inputs(flat, list(tensors)))
        leaves, holder["spec"] = pytree.tree_flatten(out)
        return leaves

    # tracing runs the step for real: it must not consume randomness (nor keep a replay's swapped state)
    rng = _rng_now()
    first: FirstResult | None = None
    try:
        # NOTE: lazy graph modules: every pass edits the graph and would regenerate Python code
        # for it (~0.5 s per pass on a 17,000-node DARTS step); the backends build their own
        # code from the final graph, and .code still works on demand
        with fx_traceback.preserve_node_meta(), _use_lazy_graph_module(True):
            # NOTE: make_fx maps tensors to placeholders by identity; flatten_inputs has
            # already made every graph input a distinct tensor, and detach() keeps them apart.
            # functionalize: PyTorch's composite kernels write in place (LSTM cells add_,
            # sigmoid_; maximum's backward masked_fill_); the passes see a pure IR instead.
            pure = torch.func.functionalize(flat_fn, remove="mutations")
            if dynamic:
                gm, fakes = _trace_symbolic(pure, flat.tensors, dynamic)
            else:
                # NOTE: make_fx's torch-function layer only names nodes' torch functions (a ``torch_fn`` meta that
                # slim_meta drops) and rewrites symbolic ``size()`` calls: in a real trace it is overhead per call
                detached = [t.detach() for t in flat.tensors]

                def kept(*tensors: torch.Tensor) -> Any:
                    holder["outputs"] = out = pure(*tensors)
                    return out

                with one_meta_mode():
                    record = make_fx(
                        kept if keep_result else pure,
                        tracing_mode="real",
                        _disable_torch_fn_metadata_mode=not RECORD_TORCH_FN,
                    )
                    gm, fakes = record(*detached), None
                if keep_result:
                    # NOTE: an output that is an input comes back as the graph would return it: that input
                    given = {id(d): t for d, t in zip(detached, flat.tensors)}
                    outputs = [given.get(id(o), o) for o in holder.pop("outputs")]
                    inputs = [(t, t._version) for t in flat.tensors]
                    first = FirstResult(inputs, outputs, rng, _rng_now())
    except MLOError:
        raise
    except RuntimeError as exc:
        msg = str(exc)
        if reads_a_value(msg):
            raise TraceError(f"{title}: {_value_read_advice(exc)}") from exc
        raise TraceError(f"{title}: tracing failed: {msg.splitlines()[0] if msg else type(exc).__name__}") from exc
    finally:
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
    slim_meta(gm, adopt=True)
    linecache.clearcache()  # filled by the fake tensors' captured stacks; nothing reads it later
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = input_names(unflatten_inputs(flat, flat.tensors))
    for node, tensor in zip(placeholders, flat.tensors):
        paths = names[id(tensor)]  # the same object at several leaves: one placeholder each, in order
        node.meta["mlo.input"] = paths.pop(0) if len(paths) > 1 else paths[0]
    traced = TracedStep(gm, holder["spec"], title, dynamic=dynamic, shapes=flat.shapes(), fakes=fakes, first=first)
    traced.guard = shape_guard(traced)
    return traced


def shape_guard(traced: TracedStep) -> Any:
    """What a symbolic trace (and any compile after it) assumed of its symbols, as a compiled expression
    over ``L["t<i>"]`` (None: no assumption, or the step is not symbolic)."""
    if not traced.fakes:
        return None
    env = traced.fakes[0].fake_mode.shape_env  # type: ignore[attr-defined]
    # NOTE: ignore_static=False: a symbol the trace specialized (``int(x.shape[0])``) is static now, and
    # its guard (size == traced value) is exactly the one that must not be dropped
    code = env.produce_guards_expression(traced.fakes, ignore_static=False)
    return None if code is None else compile(code, "<mlocompile shape guard>", "eval")


def _trace_symbolic(
    fn: Any, tensors: list[torch.Tensor], dynamic: frozenset[tuple[int, int]]
) -> tuple[GraphModule, list[torch.Tensor]]:
    """make_fx ``fn`` over fake copies of ``tensors`` whose ``dynamic`` dims are symbols; return the graph
    and the fake inputs (their shape environment holds the trace's guards)."""
    from torch._dynamo.source import LocalSource  # NOTE: here: loading dynamo costs ~1 s, fixed shapes never need it
    from torch._subclasses.fake_tensor import FakeTensorMode

    env = ShapeEnv(duck_shape=False)  # equal example sizes are not assumed equal; only what the graph needs is
    mode = FakeTensorMode(shape_env=env)
    fakes: list[torch.Tensor] = []
    for i, t in enumerate(tensors):
        sizes = [DimDynamic.DYNAMIC if (i, d) in dynamic else DimDynamic.STATIC for d in range(t.dim())]
        context: Any = StatelessSymbolicContext(dynamic_sizes=sizes)  # type: ignore[arg-type]
        fakes.append(mode.from_tensor(t.detach(), source=LocalSource(f"t{i}"), symbolic_context=context))
    with keep_sizes_symbolic():  # where PyTorch would read a symbolic size as an integer
        gm = make_fx(fn, tracing_mode="symbolic")(*fakes)
    gm.meta["mlo.dynamic"] = True
    return gm, fakes


@contextmanager
def one_meta_mode() -> Iterator[None]:
    """Record a real-mode make_fx trace with less bookkeeping per op; the graph is the same.

    make_fx spends ~0.3 ms per recorded op on this CPU, of which the kernel is a tenth;
    in a 158,000-node step (Betty's 4-level SANAS) that is most of the time to the
    first step. Inside this block, and only for real (not symbolic) traces:

    - Each plain tensor a node records gets a ``meta``-device tensor of the same sizes,
      strides and dtype as its ``val`` (what ``slim_meta`` keeps) instead of a
      ``FakeTensor``: without an ambient fake mode make_fx would build a new
      ``FakeTensorMode`` per node, each capturing a Python stack. The mode is still
      offered (``TracingContext``) for any other value.
    - ``tensor_meta`` (sizes, strides, a contiguity test per memory format) is not
      stored: ``slim_meta`` drops it and nothing reads it before.
    - Node arguments of the common kinds (proxies, plain scalars, dtypes, devices,
      tuples and lists of them) become graph arguments directly, as make_fx's own
      chain of checks would turn them (parameter, symbolic-int, opaque-object and
      constant-tensor tests, each an ``isinstance`` through a metaclass).
    - ``Graph.create_node`` skips its scan of every argument for a raw ``SymInt``:
      a real trace has none.
    - Ops are recorded by a lean path (``lean_dispatch``): an ``OpOverload`` without a
      CompositeImplicitAutograd kernel (make_fx may decompose those), not value-reading
      (``data_dependent_output``, ``is_nonzero``) nor ``lift_fresh``, whose tensor arguments
      are all plain traced tensors without a known constant and whose other arguments are
      plain scalars, tuples and lists, gets the node, name, annotations (``custom``),
      ``getitem`` nodes and values make_fx's ``proxy_call`` would give it, without its
      flattening, constant propagation and per-op checks (nor the per-op ``original_aten``
      meta, dropped by ``slim_meta``). Anything else goes to make_fx's own
      ``__torch_dispatch__``. ``tests/test_recording.py`` compares the two graphs. Its
      nodes are made by ``regions.append_node`` (``create_node``'s names and bookkeeping
      without its per-call name parse), as are the region copies of ``regions.call_twice``.
    - make_fx's tensor tracker (tensor -> proxy) is a ``_TensorTracker``: the same
      dictionary with its lookups indexed by ``id``.
    - make_fx's dead-code walk at the end of the trace is skipped: its predicate keeps
      every node but size accessors and SymInt arithmetic, which a real trace has none of;
      so is its merging of repeated SymInt nodes (``dedupe_symints``), for the same reason.

    Measured with ``benchmarks/betty_ports_first_step.py`` (see the README's table).
    """
    from torch._guards import TracingContext, tracing
    from torch._inductor.fx_passes import dedupe_symint_uses  # NOTE: make_fx imports it at the end of every trace
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx import proxy as fx_proxy
    from torch.fx.experimental import proxy_tensor

    if TracingContext.try_get() is not None:
        yield
        return
    mode = FakeTensorMode(allow_fallback_kernels=True)
    original = proxy_tensor.extract_val

    def extract_val(val: Any, include_real: bool = False) -> Any:
        if type(val) is torch.Tensor and val.layout == torch.strided:
            return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device="meta")
        return original(val, include_real)

    tracer_cls = proxy_tensor.PythonKeyTracer
    create_arg = tracer_cls.create_arg

    def fast_create_arg(self: Any, a: Any) -> Any:
        kind = type(a)
        if kind is fx_proxy.Proxy:
            return a.node
        if kind in _PLAIN_ARGS:
            return a
        if kind is tuple:
            return tuple([fast_create_arg(self, x) for x in a])
        if kind is list:
            return [fast_create_arg(self, x) for x in a]
        return create_arg(self, a)

    mode_cls = proxy_tensor.ProxyTorchDispatchMode
    dispatch = mode_cls.__dict__["__torch_dispatch__"]  # make_fx's, wrapped (no dynamo, counted)
    ops: dict[Any, Any] = {}  # NOTE: per trace: py_kernels (symbolic.py) may change between traces

    def lean_dispatch(
        proxy_mode: Any, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = ops.get(func)
        if name is None:
            name = ops[func] = _lean_name(func)
        if name is True:  # make_fx decomposes it unless the arguments' device has a kernel of its own
            device = _first_device((args, kwargs))
            name = ops.get((func, device))
            if name is None:
                name = ops[(func, device)] = _lean_name(func, device)
        if (
            name is False
            or proxy_mode.pre_dispatch
            or proxy_mode.emulate_precision_casts
            or func in proxy_mode.decomposition_table
        ):
            return dispatch(proxy_mode, func, types, args, kwargs)
        tracer = proxy_mode.tracer
        tracker = tracer.tensor_tracker
        try:
            node_args = tuple([_lean_arg(tracker, a) for a in args])
            node_kwargs = {k: _lean_arg(tracker, v) for k, v in kwargs.items()}
        except _Unusual:
            return dispatch(proxy_mode, func, types, args, kwargs)
        graph = tracer.graph
        custom = fx_traceback.get_current_meta().get("custom")
        node = append_node(graph, "call_function", func, node_args, node_kwargs, name)  # type: ignore[arg-type]
        if custom is not None:
            node.meta["custom"] = dict(custom)
        out = func(*args, **kwargs)
        kind = type(out)
        if kind is torch.Tensor:
            _lean_track(tracker, out, fx_proxy.Proxy(node, tracer))
        elif kind is tuple and all(type(x) is torch.Tensor or x is None for x in out):
            node.meta["val"] = tuple([None if x is None else extract_val(x) for x in out])
            for i, x in enumerate(out):
                item = append_node(graph, "call_function", operator.getitem, (node, i), {}, "getitem")
                if custom is not None:
                    item.meta["custom"] = dict(custom)
                if x is not None:
                    _lean_track(tracker, x, fx_proxy.Proxy(item, tracer))
        else:
            proxy_tensor.track_tensor_tree(out, fx_proxy.Proxy(node, tracer), constant=None, tracer=tracer)
        return out

    def _lean_track(tracker: Any, t: torch.Tensor, proxy: Any) -> None:
        # track_tensor + set_meta for a plain strided tensor of a real trace (no symbolic sizes)
        proxy.node.meta["val"] = extract_val(t)
        proxy.node.meta["tensor_meta"] = None
        if t not in tracker or not proxy_tensor._is_proxy_tensor_update_tensor_tracker_disabled():
            tracker[t] = proxy_tensor._ProxyTensor(proxy, None)

    mode_cls.__torch_dispatch__ = lean_dispatch  # type: ignore[method-assign, assignment]
    dce = fx_graph.Graph.eliminate_dead_code

    def keep_real_trace(graph: fx_graph.Graph, is_impure_node: Any = None) -> bool:
        # make_fx's cleanup at the end of a trace deletes only size accessors and SymInt arithmetic
        # (its predicate keeps every other node): a real trace has neither, and the walk lints and
        # tests each of 100,000 nodes for nothing
        if getattr(is_impure_node, "__qualname__", "") == "dispatch_trace.<locals>.impure_pred":
            return False
        return dce(graph, is_impure_node)

    fx_graph.Graph.eliminate_dead_code = keep_real_trace  # type: ignore[method-assign, assignment]
    tracker_cls = proxy_tensor.WeakTensorKeyDictionary
    proxy_tensor.WeakTensorKeyDictionary = _TensorTracker  # type: ignore[misc]
    dedupe = dedupe_symint_uses.dedupe_symints
    dedupe_symint_uses.dedupe_symints = _no_symints
    proxy_tensor.extract_val = extract_val
    tensor_meta = proxy_tensor._extract_tensor_metadata
    proxy_tensor._extract_tensor_metadata = _no_tensor_meta  # type: ignore[assignment]
    tracer_cls.create_arg = fast_create_arg  # type: ignore[method-assign]
    graph_pytree = fx_graph.pytree
    fx_graph.pytree = _NoSymIntScan(graph_pytree)  # type: ignore[assignment]
    try:
        with tracing(TracingContext(mode)):
            yield
    finally:
        proxy_tensor.extract_val = original
        mode_cls.__torch_dispatch__ = dispatch  # type: ignore[method-assign]
        fx_graph.Graph.eliminate_dead_code = dce  # type: ignore[method-assign]
        proxy_tensor.WeakTensorKeyDictionary = tracker_cls  # type: ignore[misc]
        dedupe_symint_uses.dedupe_symints = dedupe
        proxy_tensor._extract_tensor_metadata = tensor_meta
        tracer_cls.create_arg = create_arg  # type: ignore[method-assign]
        fx_graph.pytree = graph_pytree


# NOTE: what make_fx's create_arg chain returns unchanged (its base-type bypass); bool is listed: type() is exact
_PLAIN_ARGS = frozenset(
    {int, float, bool, str, complex, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format}
)


class _Unusual(Exception):
    """An op argument the lean recording path leaves to make_fx (a constant or untracked tensor, a subclass,
    a symbolic value, anything but plain scalars and tuples or lists of them)."""


def _lean_arg(tracker: Any, a: Any) -> Any:
    kind = type(a)
    if kind is torch.Tensor:
        tracked = tracker.get(a)
        if tracked is None or tracked.constant is not None:
            raise _Unusual
        return tracked.proxy.node
    if kind in _PLAIN_ARGS:
        return a
    if kind is list:
        return [_lean_arg(tracker, x) for x in a]
    if kind is tuple:
        return tuple([_lean_arg(tracker, x) for x in a])
    raise _Unusual


def _lean_name(func: Any, device: str | None = None) -> str | bool:
    """The node name make_fx gives ``func``'s calls, or False where its own path must record them: ops
    it decomposes, reads values of (``data_dependent_output``) or rewrites (``lift_fresh``).

    make_fx decomposes an op with a CompositeImplicitAutograd kernel (``py_kernels`` or
    C++) when the device of its first tensor argument has no kernel of its own
    (``autograd_would_have_decomposed``; e.g. ``native_batch_norm`` has a Python
    decomposition and a CPU kernel, and is recorded whole): for such an op, called
    without ``device``, this returns True, and the caller asks again with the device
    (``""``: no tensor argument).
    """
    if type(func) is not torch._ops.OpOverload:
        return False
    if torch.Tag.data_dependent_output in func.tags or func in _OWN_PATH:
        return False
    implicit = torch._C.DispatchKey.CompositeImplicitAutograd
    if implicit in func.py_kernels or torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), implicit):
        if device is None:
            return True
        if not device:
            return False
        backend = torch._C._parse_dispatch_key(torch._C._dispatch_key_for_device(device))
        if backend is None or not torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), backend):
            return False
    return fx_graph._snake_case(func.overloadpacket.__name__)


def _first_device(tree: Any) -> str:
    """The device type of the first tensor in ``tree`` (in pytree order), or ``""``."""
    for leaf in torch.utils._pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            return leaf.device.type
    return ""


_OWN_PATH = frozenset(
    {
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.lift_fresh.default,
        torch.ops.aten.lift_fresh_copy.default,
        torch.ops.prim.device.default,
    }
)


_MISSING = object()
_referent = weakref.ref.__call__  # NOTE: the C-level dereference (WeakIdRef's Python __call__ also revives PyObjects)


class _TensorTracker(WeakIdKeyDictionary):
    """make_fx's tensor tracker (``WeakTensorKeyDictionary``: tensor -> proxy, keyed by ``WeakIdRef``) with
    its lookups indexed by ``id``.

    A lookup in the stock dictionary builds a ``WeakIdRef`` of the key, hashes it and compares
    it by dereferencing both references, each step a Python call: ~2 µs, four or five times
    per recorded op. Here ``__setitem__`` also files the key's reference under ``id(key)``; a
    lookup finds that reference, checks it still refers to the key, and reads the entry under
    that very reference (``data`` stays the only store: an entry deleted or replaced any other
    way is simply not found there, and the lookup falls back to the stock one).
    """

    def __init__(self, dict: Any = None, ref_type: Any = WeakIdRef) -> None:  # noqa: A002 - the base's names
        self._refs: dict[int, Any] = {}
        super().__init__(dict, ref_type)

    def __setitem__(self, key: Any, value: Any) -> None:
        ref = self.ref_type(key, self._remove)
        self.data[ref] = value
        self._refs[id(key)] = ref

    def get(self, key: Any, default: Any = None) -> Any:
        ref = self._refs.get(id(key))
        if ref is not None and _referent(ref) is key:
            found = self.data.get(ref, _MISSING)
            if found is not _MISSING:
                return found
        return super().get(key, default)

    def __contains__(self, key: Any) -> bool:
        ref = self._refs.get(id(key))
        if ref is not None and _referent(ref) is key and ref in self.data:
            return True
        return super().__contains__(key)


class _NoSymIntScan:
    """``torch.fx.graph``'s ``pytree`` during a real trace: the same module, but ``tree_iter`` (only
    ``Graph.create_node``'s scan for raw ``SymInt`` arguments calls it) yields nothing."""

    def __init__(self, module: Any) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    @staticmethod
    def tree_iter(tree: Any, is_leaf: Any = None) -> Iterator[Any]:
        return iter(())


def _no_tensor_meta(val: Any, include_contiguity: bool = True) -> None:
    return None


def _no_symints(graph: fx_graph.Graph) -> None:
    """``dedupe_symints`` for a real trace: its nodes hold no SymInt values, so there is nothing to merge."""


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
