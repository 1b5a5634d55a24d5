"""The compiler driver: build a problem's step, trace it, run the pass pipeline, hand it to a backend.

Everything a compiled step depends on is in its cache key, as a guard would check
it: the variant, the frozen ``CompileOptions`` (compile mode, memory budget, world
size, donation, init sources), the program's dependency structure (edges, paths,
VJP plans), every problem's ``Config`` fields, the optimizer's structure, the
inputs' shapes/dtypes/devices and static leaves, and the ``training`` flag of every
submodule. A change traces again. Only the program is set from outside
(``set_program``, for ``Engine.set_dependency``), and its structure is in the key.

Sizes are the exception: when a step meets inputs that differ from an earlier trace
only in some sizes (a last partial batch, another sequence length), it is traced once
more with exactly those dimensions symbolic, and that graph serves every later size
its guard accepts (``TracedStep.accepts``): 40 batch sizes cost two traces, or three
when one of them is 1 (make_fx specializes sizes 0 and 1). Where the step's code fixes
a size (``nn.LSTM``'s sequence length, ``int(x.shape[0])``), each new size there would
trace again: after ``SIZE_FIXED_LIMIT`` graphs of one input structure, inputs of other
such sizes run the step eagerly (``EagerStep``; the same function, the same results).
"""

from __future__ import annotations

import copy
import gc
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

import passes
from mlocompile.backends import compile_with_inductor, direct_runner
from mlocompile.compiled import CompiledProgram
from mlocompile.functional import FunctionalProgram
from mlocompile.hypergrad import METHOD_RULES
from mlocompile.optim import FunctionalOptimizer
from mlocompile.program import ProgramGraph
from mlocompile.step import StepFn, StepVariant, build_step
from mlocompile.trace import (
    FlatInputs,
    TracedStep,
    data_inputs,
    flatten_inputs,
    input_names,
    shape_guard,
    trace_step,
    unflatten_inputs,
)
from passes.plan_static_buffers import BufferPool
from passes.report import PassReport

RETRACE_WARNING = 8  # distinct input shapes of one step before the compiler warns
SIZE_FIXED_LIMIT = 3  # graphs of one input structure whose sizes the code fixes; other sizes run eagerly
CACHE_LIMIT = 32  # traced graphs (and step functions) kept per step; the least recently used goes first
ALIAS_LIMIT = 1024  # input signatures remembered as served by a symbolic graph (forgotten ones re-check its guard)


@dataclass(frozen=True)
class CompileOptions:
    """How steps are compiled: what the Engine's settings say at this step.

    ``compile`` is ``EngineConfig.compile`` (one of ``config.COMPILE_MODES``); ``donate`` lets an fx update step write the
    new parameters and optimizer state into its inputs (nothing but the engine holds
    them: off under ``roll_back``); ``init_sources`` maps a problem to the one it starts
    each unroll window from (``Problem.load_parameters_from``).
    """

    compile: str = "fx"
    memory_budget: float | None = None
    world_size: int = 1
    donate: bool = False
    init_sources: tuple[tuple[str, str], ...] = ()
    check_finite: bool = True

    @classmethod
    def from_config(cls, config: Any, world_size: int, problems: Mapping[str, Any]) -> CompileOptions:
        """What ``EngineConfig`` and the problems say now: donation only with ``in_place_updates``, never
        under ``roll_back`` (its cache holds the old parameters)."""
        sources = {n: p._init_source.name for n, p in problems.items() if p._init_source is not None}
        return cls(
            config.compile,
            config.memory_budget,
            world_size,
            config.in_place_updates and not config.roll_back,
            tuple(sorted(sources.items())),
            config.check_finite,
        )


class Compiler:
    """Builds, caches and runs every problem's step under given ``CompileOptions``.

    Traced graphs are cached by their key (see the module docstring); the latest
    graph per variant is what ``latest`` holds and ``CompiledProgram`` shows.
    """

    def __init__(
        self, fp: FunctionalProgram, program: ProgramGraph, optimizers: dict[str, FunctionalOptimizer]
    ) -> None:
        self.fp, self.program, self.optimizers = fp, program, optimizers
        self._fns: OrderedDict[tuple[Any, ...], StepFn] = OrderedDict()
        self._traced: OrderedDict[tuple[Any, ...], TracedStep] = OrderedDict()
        self.latest: dict[str, TracedStep] = {}
        self.report = PassReport()
        self.buffers: BufferPool = {}  # fx: static temporaries, shared by all steps
        self._shapes: dict[str, set[tuple[Any, ...]]] = {}  # input shapes traced, per step graph
        self._evicted: set[str] = set()  # steps whose caches are full (warned once)
        # per input structure (the key without sizes): the shapes traced at fixed sizes, the symbolic graphs
        self._sized: OrderedDict[tuple[Any, ...], list[tuple[tuple[int, ...], ...]]] = OrderedDict()
        self._symbolic: OrderedDict[tuple[Any, ...], list[TracedStep]] = OrderedDict()
        # exact key -> the symbolic graph that serves it, or the eager step past SIZE_FIXED_LIMIT
        self._served: OrderedDict[tuple[Any, ...], TracedStep | EagerStep] = OrderedDict()
        self._eager_warned: set[str] = set()
        self._fixed_only: set[tuple[Any, ...]] = set()  # structures whose symbolic trace failed (warned once)
        self._pinned: OrderedDict[tuple[Any, ...], set[tuple[int, int]]] = OrderedDict()  # sizes traces specialized

    def set_program(self, program: ProgramGraph) -> None:
        """Compile for ``program`` from now on (same problems, new dependencies): steps trace again."""
        self.program = program

    def config_key(self) -> tuple[Any, ...]:
        """Every problem's ``Config`` fields, as a hashable key (a step reads them while it is built)."""
        return tuple((n, _hashable(vars(p.config))) for n, p in self.program.problems.items())

    def step_fn(self, variant: StepVariant, options: CompileOptions) -> StepFn:
        """Return the (cached) pure step function of ``variant``."""
        # NOTE: an fx update that overwrites its inputs must not write a non-finite result: it keeps
        # the old values then (the engine raises NonFiniteError with the parameters intact)
        guard = options.check_finite and self.donates(variant, options)
        key = (
            variant,
            options.init_sources,
            options.world_size,
            options.memory_budget,
            guard,
            self.config_key(),
            self.program.structure(),
        )
        if key in self._fns:
            self._fns.move_to_end(key)
        else:
            self._evict(self._fns, variant, "step functions (one per setting of its Config fields)")
            self._fns[key] = build_step(
                self.fp,
                self.program,
                self.optimizers,
                dict(options.init_sources),
                variant,
                options.world_size,
                memory_budget=options.memory_budget,
                guard_non_finite=guard,
            )
        return self._fns[key]

    def run(self, variant: StepVariant, inputs: dict[str, Any], options: CompileOptions) -> dict[str, Any]:
        """Run one step of ``variant`` on ``inputs``, compiled as ``options`` say."""
        if options.compile == "eager":
            return self.step_fn(variant, options)(inputs)
        flat = flatten_inputs(inputs)
        return self.traced(variant, inputs, options, flat)(flat)

    def traced(
        self, variant: StepVariant, inputs: dict[str, Any], options: CompileOptions, flat: FlatInputs | None = None
    ) -> TracedStep | EagerStep:
        """Return the compiled step for these inputs, tracing and optimizing it if new."""
        flat = flatten_inputs(inputs) if flat is None else flat
        opt_sig = self.optimizers[variant.problem].signature()
        # NOTE: like guards, the key holds everything the trace read: a change retraces
        structure = self.program.structure()  # Engine.set_dependency swaps the program
        settings = (variant, options, opt_sig, structure)
        key = (*settings, flat.key(), self.config_key(), self.fp.training_flags())
        served = self._traced.get(key) or self._served.get(key)
        if isinstance(served, EagerStep):
            return served
        traced = served
        if traced is None:
            base = (*settings, flat.structure(), self.config_key(), self.fp.training_flags())
            traced = next((t for t in self._symbolic.get(base, ()) if t.accepts(flat)), None)
            if traced is None and self._bounded(variant, base, inputs, flat):
                eager = self._served[key] = EagerStep(self.step_fn(variant, options), variant.title)
                if len(self._served) > ALIAS_LIMIT:
                    self._served.popitem(last=False)
                return eager
            if traced is None:
                traced = self._compile_new(variant, inputs, flat, options, base)
                self._evict(self._traced, variant, "traced graphs (one per input shape and setting)")
                self._traced[key] = traced
                self._warn_if_retracing(variant, flat)
            else:
                self._served[key] = traced
                if len(self._served) > ALIAS_LIMIT:
                    self._served.popitem(last=False)
        elif key in self._traced:
            self._traced.move_to_end(key)
        self.latest[variant.title] = traced
        return traced

    def _compile_new(
        self,
        variant: StepVariant,
        inputs: dict[str, Any],
        flat: FlatInputs,
        options: CompileOptions,
        base: tuple[Any, ...],
    ) -> TracedStep:
        """Trace ``variant`` for inputs no cached graph serves: with symbolic sizes where inputs of this
        structure have been seen at other sizes (and the sizes here are not 0 or 1), else at fixed sizes."""
        dynamic = self._dynamic_dims(base, inputs, flat)
        if dynamic:
            try:
                traced = self._compile(variant, flat, options, dynamic)
            except Exception as exc:  # noqa: BLE001 - any failure: the fixed-size trace says what is wrong, if anything
                self._fixed_only.add(base)
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                warnings.warn(
                    f"{variant.title}: could not trace with symbolic sizes ({first}); tracing it at each input "
                    "shape instead",
                    stacklevel=5,
                )
            else:
                # the code fixed these sizes (int(x.shape[0])): later traces keep them fixed
                self._pinned.setdefault(base, set()).update(traced.specialized())
                self._bound(self._pinned)
                graphs = self._symbolic.setdefault(base, [])
                graphs.insert(0, traced)
                del graphs[4:]  # the newest symbolic graphs first; each later one generalizes more dims
                self._bound(self._symbolic)
                return traced
        traced = self._compile(variant, flat, options)
        self._sized.setdefault(base, []).append(flat.shapes())
        del self._sized[base][:-RETRACE_WARNING]
        self._bound(self._sized)
        return traced

    def _dynamic_dims(
        self, base: tuple[Any, ...], inputs: dict[str, Any], flat: FlatInputs
    ) -> frozenset[tuple[int, int]]:
        """The (input, dim) pairs to trace as symbols: every size that differs from an earlier trace of
        this input structure and, where a data tensor's size changed at dim d, dim d of every data tensor
        (another problem's batch, an itd window's) so that one symbolic graph serves them all. Empty
        when there is nothing to generalize or a size here is 0 or 1 (make_fx specializes those)."""
        if base in self._fixed_only:
            return frozenset()
        now = flat.shapes()
        pinned = self._pinned.get(base, set())
        dims: set[tuple[int, int]] = set()
        for shapes in self._sized.get(base, []):
            dims |= {
                (i, d) for i, (a, b) in enumerate(zip(now, shapes)) for d, (n, m) in enumerate(zip(a, b)) if n != m
            }
        dims -= pinned
        if not dims:  # nothing changed but sizes the step's code fixes
            return frozenset()
        dims |= {dim for graph in self._symbolic.get(base, ()) for dim in graph.dynamic} - pinned
        data = data_inputs(inputs, flat)
        data_dims = {d for i, d in dims if i in data}
        dims |= {(i, d) for i in data for d in data_dims if d < len(now[i]) and now[i][d] >= 2} - pinned
        if any(now[i][d] < 2 for i, d in dims):  # make_fx specializes sizes 0 and 1: trace this one at its sizes
            return frozenset()
        return frozenset(dims)

    def _bounded(self, variant: StepVariant, base: tuple[Any, ...], inputs: dict[str, Any], flat: FlatInputs) -> bool:
        """Whether these inputs run eagerly instead of tracing again: ``SIZE_FIXED_LIMIT`` graphs of this
        input structure exist and none of them was traced at these inputs' sizes of the dimensions the
        step's code fixes (``_pinned``: e.g. ``nn.LSTM``'s sequence length, ``int(x.shape[0])``), or,
        where symbolic tracing failed for the structure, at these inputs' sizes at all. Warns once per
        step."""
        traced = [*self._sized.get(base, ()), *(g.shapes for g in self._symbolic.get(base, ()))]
        if len(traced) < SIZE_FIXED_LIMIT:
            return False
        now = flat.shapes()
        if base in self._fixed_only:
            fixed = [(i, d) for i, shape in enumerate(now) for d in range(len(shape))]
        else:
            fixed = sorted(self._pinned.get(base, ()))
            if not fixed:
                return False
        if any(all(now[i][d] == shapes[i][d] for i, d in fixed) for shapes in traced):
            return False  # a graph of these fixed sizes exists: the symbolic machinery bounds the rest
        if variant.title not in self._eager_warned:
            self._eager_warned.add(variant.title)
            names = input_names(inputs)
            where = (
                "its inputs' sizes (it could not be traced with symbolic sizes)"
                if base in self._fixed_only
                else ", ".join(f"{names[id(flat.tensors[i])][0]} dim {d}" for i, d in fixed)
            )
            warnings.warn(
                f"{variant.title}: the step's code fixes {where} (e.g. nn.LSTM's sequence length, or "
                f"int(x.shape[0]) in a loss), so every new size would trace it again; {len(traced)} graphs are "
                "traced, and inputs of other sizes there run the same step eagerly (the same results, at eager "
                "speed). Pad to a few sizes to keep every step compiled",
                stacklevel=5,
            )
        return True

    def _bound(self, cache: OrderedDict[tuple[Any, ...], Any]) -> None:
        """Keep a per-structure record to the ``8 * CACHE_LIMIT`` most recently added structures."""
        while len(cache) > CACHE_LIMIT * 8:
            cache.popitem(last=False)

    def trace_all(self, name: str, inputs: dict[str, Any], options: CompileOptions) -> None:
        """Trace every step variant of problem ``name`` (accumulating and updating) for ``inputs``."""
        accumulates = self.program.problems[name].config.gradient_accumulation > 1
        for update in [False, True] if accumulates else [True]:
            step = self.traced(StepVariant(name, update), inputs, options)
            if isinstance(step, TracedStep):
                step.first = None  # nothing runs now: the trace's results need not be kept

    def snapshot(self) -> CompiledProgram:
        """What has been emitted so far: the latest graph of every step, and the pass report."""
        graphs = {title: self.latest[title].gm for title in sorted(self.latest)}
        return CompiledProgram(self.program, graphs, self.report)

    def _compile(
        self,
        variant: StepVariant,
        flat: FlatInputs,
        options: CompileOptions,
        dynamic: frozenset[tuple[int, int]] = frozenset(),
    ) -> TracedStep:
        with collector_paused():
            return self._compile_now(variant, flat, options, dynamic)

    def _compile_now(
        self, variant: StepVariant, flat: FlatInputs, options: CompileOptions, dynamic: frozenset[tuple[int, int]]
    ) -> TracedStep:
        fx = options.compile == "fx"
        cfg = self.program.problems[variant.problem].config
        # NOTE: the fx runner calls the kernels the trace ran, on the same values (under AMP the casts
        # change them); a run over several processes keeps every rank's collectives in one order
        keep = fx and cfg.precision == "fp32" and options.world_size == 1
        traced = trace_step(self.step_fn(variant, options), flat, variant.title, dynamic, keep_result=keep)
        traced.gm = passes.run_graph_pipeline(
            traced.gm,
            variant.title,
            self.param_sizes(),
            self.report,
            precision=cfg.precision,
            keep_fp32_methods=cfg.amp_fp32_methods,
            memory_budget=options.memory_budget,
            inplace=fx,
            donated=self._donated(variant, traced, flat, options) if fx else frozenset(),
            buffers=self.buffers,
            device=_common_device(flat.tensors),
        )
        if options.compile == "inductor":
            lowered = passes.run_inductor_lowering(copy.deepcopy(traced.gm), variant.title, self.report)
            # a symbolic step compiles for its fake inputs: inductor's kernels take the sizes as arguments,
            # and whatever inductor assumed of them joins the guard
            traced.runner = compile_with_inductor(lowered, traced.fakes or flat.tensors, variant.title)
            traced.guard = shape_guard(traced)
        traced.runner = traced.runner or direct_runner(traced.gm, variant.title)
        return traced

    def _evict(self, cache: OrderedDict[tuple[Any, ...], Any], variant: StepVariant, what: str) -> None:
        """Make room for one more entry of ``variant`` in ``cache`` (its keys start with the variant)."""
        mine = [key for key in cache if key[0] == variant]
        if len(mine) < CACHE_LIMIT:
            return
        del cache[mine[0]]  # the least recently used
        if variant.title not in self._evicted:
            self._evicted.add(variant.title)
            warnings.warn(
                f"{variant.title}: more than {CACHE_LIMIT} {what}; the least recently used are dropped and "
                "traced again when needed. Keep batch shapes and settings fixed, or run with "
                "EngineConfig(compile='eager')",
                stacklevel=6,
            )

    def _warn_if_retracing(self, variant: StepVariant, flat: FlatInputs) -> None:
        """Warn once per step when it has been traced for more than ``RETRACE_WARNING`` input signatures."""
        shapes = self._shapes.setdefault(variant.title, set())
        if len(shapes) > RETRACE_WARNING:
            return  # warned already; the set stays bounded
        shapes.add(tuple(tuple(t.shape) for t in flat.tensors))
        if len(shapes) == RETRACE_WARNING + 1:
            warnings.warn(
                f"{variant.title} has been traced for {len(shapes)} different input shapes; every new shape "
                "traces (and compiles) the step again. Give batches one shape (DataLoader(drop_last=True), "
                "padded sequences) or run with EngineConfig(compile='eager')",
                stacklevel=5,
            )

    def _donated(
        self, variant: StepVariant, traced: TracedStep, flat: FlatInputs, options: CompileOptions
    ) -> frozenset[str]:
        """Inputs an update step may overwrite: the problem's parameters and optimizer state.

        The engine replaces them by the step's outputs, so their old values are dead
        after the step, unless something else still holds them: a roll_back cache
        (``options.donate`` is False then), an itd window, a problem started from another
        one's parameters, or another input sharing the storage.
        """
        if not self._may_donate(variant, options):
            return frozenset()
        prefix = f"params.{variant.problem}."
        names = [n.meta["mlo.input"] for n in traced.gm.graph.nodes if n.op == "placeholder"]
        ptrs = [t.untyped_storage().data_ptr() for t in flat.tensors]
        return frozenset(
            name
            for name, ptr in zip(names, ptrs)
            if (name.startswith(prefix) or (name.startswith("opt.") and not name.endswith(".step")))
            and ptrs.count(ptr) == 1
        )

    def donates(self, variant: StepVariant, options: CompileOptions) -> bool:
        """Whether running ``variant`` may overwrite its problem's parameters and optimizer state."""
        return options.compile == "fx" and self._may_donate(variant, options)

    def _may_donate(self, variant: StepVariant, options: CompileOptions) -> bool:
        if not (options.donate and variant.update) or options.init_sources:
            return False
        # itd windows hold the parameters of every step of the unroll
        return not any(METHOD_RULES[p.config.type].window for p in self.program.problems.values())

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


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a step compiles.

    Tracing, the passes and code generation allocate millions of objects that stay
    alive (nodes, their arguments, meta tensors): each allocation burst triggers a
    collection, and the oldest generation's walks over the whole heap find almost
    nothing to free (Betty's 4-level SANAS port: 16 full collections freeing ~1,300
    objects cost ~9 s of its ~36 s to the first step; peak memory within 2% without
    them). Collection resumes afterwards, as it was.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class EagerStep:
    """A step run eagerly where tracing it again for new sizes would not end (``Compiler._bounded``):
    the same step function the traced graphs were traced from, called on the inputs."""

    def __init__(self, fn: StepFn, title: str) -> None:
        self.fn, self.title = fn, title

    def __call__(self, flat: FlatInputs) -> dict[str, Any]:
        return self.fn(unflatten_inputs(flat, flat.tensors))
