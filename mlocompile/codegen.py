"""Backends: run a problem's step eagerly, as a traced FX GraphModule, or through inductor."""

from __future__ import annotations

import copy
import operator
import re
import warnings
from typing import Any

import torch

from mlocompile.functional import FunctionalProgram
from mlocompile.optim import FunctionalOptimizer
from mlocompile.program import ProgramGraph
from mlocompile.rng import thread_rng_order
from mlocompile.step import StepFn, StepVariant, build_step
from mlocompile.trace import FlatInputs, TracedStep, flatten_inputs, trace_step
from passes.report import PassReport

RETRACE_WARNING = 8  # distinct input shapes of one step before the executor warns


class StepExecutor:
    """Builds, caches and runs every problem's step with one backend.

    Traced graphs are cached by variant and input signature (shapes, dtypes,
    static batch leaves, optimizer structure, init sources), like guards: a new
    signature traces again; the latest graph per variant is what ``.ir`` shows.
    """

    def __init__(
        self,
        fp: FunctionalProgram,
        program: ProgramGraph,
        optimizers: dict[str, FunctionalOptimizer],
        backend: str,
    ) -> None:
        self.fp, self.program, self.optimizers, self.backend = fp, program, optimizers, backend
        self.init_sources: dict[str, str] = {}
        self._fns: dict[tuple[Any, ...], StepFn] = {}
        self._traced: dict[tuple[Any, ...], TracedStep] = {}
        self.latest: dict[str, TracedStep] = {}
        self.report = PassReport()
        self.memory_budget: float | None = None
        self.world_size = 1
        self.donate = False  # set by the Engine: nothing but the engine holds old parameters
        self.buffers: dict[tuple[Any, ...], list[torch.Tensor]] = {}  # fx: static temporaries, shared by all steps
        self._shapes: dict[str, set[tuple[Any, ...]]] = {}  # input shapes traced, per step graph

    def config_key(self) -> tuple[Any, ...]:
        """Every setting a step function reads while it is built or traced: each problem's
        ``Config`` fields, the memory budget, the world size and whether updates may donate."""
        configs = tuple((n, _hashable(vars(p.config))) for n, p in self.program.problems.items())
        return (configs, self.memory_budget, self.world_size, self.donate)

    def step_fn(self, variant: StepVariant) -> StepFn:
        """Return the (cached) pure step function of ``variant``."""
        key = (variant, tuple(sorted(self.init_sources.items())), self.config_key())
        if key not in self._fns:
            self._fns[key] = build_step(
                self.fp,
                self.program,
                self.optimizers,
                dict(self.init_sources),
                variant,
                self.world_size,
                memory_budget=self.memory_budget,
            )
        return self._fns[key]

    def run(self, variant: StepVariant, inputs: dict[str, Any]) -> dict[str, Any]:
        """Run one step of ``variant`` on ``inputs`` with the configured backend."""
        if self.backend == "eager":
            return self.step_fn(variant)(inputs)
        flat = flatten_inputs(inputs)
        return self.traced(variant, inputs, flat)(flat)

    def traced(self, variant: StepVariant, inputs: dict[str, Any], flat: FlatInputs | None = None) -> TracedStep:
        """Return the compiled step for these inputs, tracing and optimizing it if new."""
        flat = flatten_inputs(inputs) if flat is None else flat
        opt_sig = self.optimizers[variant.problem].signature()
        # NOTE: like guards, the key holds everything the trace read: a change retraces
        key = (
            variant,
            tuple(sorted(self.init_sources.items())),
            opt_sig,
            flat.key(),
            self.config_key(),
            self.fp.training_flags(),
        )
        traced = self._traced.get(key)
        if traced is None:
            from passes import run_graph_pipeline

            traced = trace_step(self.step_fn(variant), flat, variant.title)
            donated = self._donated(variant, traced, flat) if self.backend == "fx" else frozenset()
            cfg = self.program.problems[variant.problem].config
            traced.gm = run_graph_pipeline(
                traced.gm,
                variant.title,
                self.param_sizes(),
                self.report,
                precision=cfg.precision,
                keep_fp32_methods=cfg.amp_fp32_methods,
                memory_budget=self.memory_budget,
                inplace=self.backend == "fx",
                donated=donated,
                buffers=self.buffers,
                device=_common_device(flat.tensors),
            )
            if self.backend == "inductor":
                traced.runner = _compile_with_inductor(traced, flat)
            traced.runner = traced.runner or direct_runner(traced.gm, variant.title)
            self._traced[key] = traced
            self._warn_if_retracing(variant, flat)
        self.latest[variant.title] = traced
        return traced

    def _warn_if_retracing(self, variant: StepVariant, flat: FlatInputs) -> None:
        """Warn once per step when it has been traced for more than ``RETRACE_WARNING`` input signatures."""
        shapes = self._shapes.setdefault(variant.title, set())
        shapes.add(tuple(tuple(t.shape) for t in flat.tensors))
        if len(shapes) == RETRACE_WARNING + 1:
            warnings.warn(
                f"{variant.title} has been traced for {len(shapes)} different input shapes; every new shape "
                "traces (and compiles) the step again. Give batches one shape (DataLoader(drop_last=True), "
                "padded sequences) or run with EngineConfig(compile='eager')",
                stacklevel=4,
            )

    def _donated(self, variant: StepVariant, traced: TracedStep, flat: FlatInputs) -> frozenset[str]:
        """Inputs an update step may overwrite: the problem's parameters and optimizer state.

        The engine replaces them by the step's outputs, so their old values are dead
        after the step, unless something else still holds them: a roll_back cache or
        an itd window (``self.donate`` is False then), a problem started from another
        one's parameters, or another input sharing the storage.
        """
        if not (self.donate and variant.update) or self.init_sources:
            return frozenset()
        if any(p.config.type == "itd" for p in self.program.problems.values()):
            return frozenset()  # itd windows hold the parameters of every step of the unroll
        prefix = f"params.{variant.problem}."
        names = [n.meta["mlo.input"] for n in traced.gm.graph.nodes if n.op == "placeholder"]
        ptrs = [t.untyped_storage().data_ptr() for t in flat.tensors]
        return frozenset(
            name
            for name, ptr in zip(names, ptrs)
            if (name.startswith(prefix) or (name.startswith("opt.") and not name.endswith(".step")))
            and ptrs.count(ptr) == 1
        )

    def param_sizes(self) -> dict[str, int]:
        """Flattened trainable-parameter count per problem."""
        return {n: sum(p.numel() for p in prob.trainable_parameters()) for n, prob in self.program.problems.items()}


def _hashable(fields: dict[str, Any]) -> tuple[Any, ...]:
    """A config's fields as a hashable key (unhashable values by their repr)."""
    out = []
    for k, v in fields.items():
        try:
            hash(v)
        except TypeError:
            v = repr(v)
        out.append((k, v))
    return tuple(out)


def _common_device(tensors: list[torch.Tensor]) -> torch.device | None:
    """The one device a step's non-scalar inputs live on, or None if they span several."""
    devices = {t.device for t in tensors if t.dim() > 0}
    return devices.pop() if len(devices) == 1 else None


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


def _split_foreach_norms(gm: torch.fx.GraphModule) -> None:
    """Rewrite ``_foreach_norm(ts)[i]`` as ``linalg_vector_norm(ts[i])`` for inductor.

    One foreach call is what the fx backend wants (one dispatch); inductor has no
    lowering for it and runs it as a fallback kernel, while it fuses per-tensor norms
    into its reductions. The values are the same: on CPU ``_foreach_norm`` computes
    each tensor's ``linalg_vector_norm``.
    """
    aten = torch.ops.aten
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten._foreach_norm.Scalar:
            continue
        if node.kwargs or len(node.args) > 1 and node.args[1] != 2:
            continue
        if any(u.target is not operator.getitem for u in node.users):
            continue
        with gm.graph.inserting_before(node):
            norms = [gm.graph.call_function(aten.linalg_vector_norm.default, (t,)) for t in node.args[0]]
        for norm in norms:
            norm.meta.update({k: v for k, v in node.meta.items() if k.startswith("mlo.")})
        for user in list(node.users):
            user.replace_all_uses_with(norms[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
    gm.recompile()


def _compile_with_inductor(traced: TracedStep, flat: Any) -> Any:
    """Compile a traced step with inductor; on failure warn, name the op, and return None.

    The graph goes to inductor directly (``torch._inductor.compile``: AOTAutograd and
    inductor, no TorchDynamo), compiled for these inputs' shapes, dtypes and devices.
    Dynamo would re-check those on every call (~40 µs of guards); the executor's
    cache key already does, so a changed signature traces and compiles anew.
    Inductor's FX-graph and AOT caches (on by default) make a second process reuse
    the compiled kernels instead of compiling again. Random ops use torch's
    generators (``fallback_random``): the same numbers as the other backends.
    """
    from torch import _inductor

    gm = copy.deepcopy(traced.gm)  # compile_fx may rewrite the module it is given; .ir shows traced.gm
    _split_foreach_norms(gm)
    thread_rng_order(gm)  # itd replays: keep generator swaps and draws in graph order
    try:
        # NOTE: fallback_random: random ops draw from torch's generators as eager and fx do
        # (inductor's own RNG would give other dropout masks), so an itd replay, which sets
        # the generator to each live step's state, reproduces the live steps' masks
        with _inductor.config.patch(fallback_random=True):
            return _inductor.compile(gm, list(flat.tensors))
    except Exception as exc:  # inductor raises many types; all mean "could not compile"
        msg = str(exc)
        ops = sorted(set(re.findall(r"aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?", msg)))
        where = f" at {', '.join(ops[:3])}" if ops else ""
        first = msg.splitlines()[0] if msg else type(exc).__name__
        warnings.warn(
            f"{traced.title}: inductor could not compile the step{where} ({first}); running it with the fx backend",
            stacklevel=3,
        )
        return None
