"""Configuration dataclasses, with Betty 0.2.1's field names and meanings."""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass

from mlocompile.errors import ProgramError

PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("eager", "fx", "inductor")
LOGGER_TYPES = ("none", "tensorboard", "wandb")
STRATEGIES = ("default", "cpu", "gpu", "distributed")
# Betty 0.2.1's strategies that are not implemented here, each with what to use instead
UNSUPPORTED_STRATEGIES = {
    "zero": "Betty's ZeroRedundancyOptimizer (optimizer state sharded across ranks)",
    "fsdp": "Betty's FullyShardedDataParallel (parameters sharded across ranks)",
    "accelerate": "Betty's HuggingFace Accelerate integration",
}


@dataclass
class Config:
    """How one problem is trained and how its solution is differentiated.

    Betty 0.2.1's fields keep their names, defaults and meanings; a value whose meaning
    is not honoured raises ProgramError saying what to use instead, and the fields Betty
    does not have say so.
    A hypergradient method reads its fields on the *lower* problem of an edge, the one
    whose solution it differentiates (``hypergrad.METHOD_RULES`` lists them per method).
    ``docs/settings.md`` is generated from the entries below
    (``python scripts/settings_doc.py``).

    Attributes:
        type: How this problem's solution is differentiated when an upper problem's
            hypergradient passes through it: ``"darts"`` (finite differences of gradients,
            Hessian inverse taken as the identity), ``"sama"`` (darts on a vector scaled by
            this problem's Adam state), ``"neumann"`` (Neumann series), ``"cg"``
            (conjugate gradient) or ``"itd"`` (reverse mode through the last
            ``unroll_steps`` updates). Default: ``"darts"``. Betty: same; Betty's ``itd`` is
            its ``IterativeProblem``. Read by: every backend, on problems that have an upper.
        unroll_steps: Local steps this problem takes per unroll window, after which its
            uppers step; ``itd`` differentiates through all of them. Default: ``1``.
            Betty: same. Read by: the schedule (every method and backend); ``itd`` replays
            that many steps.
        first_order: Must stay ``True`` on a problem that has a lower problem that is not
            ``type="itd"``; ``False`` raises ProgramError at Engine construction there (on a
            problem without lowers Betty reads it nowhere, and on one whose lowers are all
            ``itd`` it means what ``itd`` does, so it is accepted). Default: ``True``. Betty: set on an
            upper, ``False`` drops that upper's hypergradient when its lowers are
            ``ImplicitProblem`` (only its direct gradient is applied: tested against Betty)
            and differentiates through their unroll when they are ``IterativeProblem``;
            here ``Config(type="itd")`` on the lower is the latter, and removing the
            upper's u2l edges the former. Read by: the engine's check of Betty settings
            (``compat``).
        retain_graph: Accepted, either value: a step is one pure function and keeps no
            autograd graph between calls. In Betty it only decides whether the loss graph
            survives the direct backward (``False`` can fail there with "backward through
            the graph a second time"); where Betty runs, both values give the same numbers,
            and so do they here (tested against Betty). Default: ``False``. Betty:
            ``retain_graph`` of its backward. Read by: nothing.
        allow_unused: ``False`` raises ProgramError before the first step when a
            trainable parameter of this problem does not reach its loss and the problem
            computes its gradient with ``autograd.grad`` in Betty (it has hypergradient
            paths, or ``gradient_accumulation > 1``), where Betty raises at the first
            step. ``True``: an unused parameter gets a zero gradient (Betty: none); an
            update with a zero gradient moves nothing, except through weight decay, so an
            unused parameter under nonzero ``weight_decay`` in a problem without
            hypergradient paths raises ProgramError (Betty leaves it untouched).
            Default: ``True``. Betty: ``allow_unused`` of its backward. Read by: the
            engine's check of the program (every backend).
        gradient_accumulation: Local steps whose gradients are summed (each loss divided by
            it) before one optimizer update; an unroll window is ``unroll_steps *
            gradient_accumulation`` local steps. Default: ``1``. Betty: same. Read by: the
            schedule and the step, every backend; ``itd`` needs 1.
        gradient_clipping: Rescale the total gradient (direct + hypergradients) to this
            global norm when it is larger, before the optimizer update; 0 turns clipping
            off. Default: ``0.0``. Betty: same (``clip_grad_norm_``). Read by: the update
            of every step, every backend.
        precision: ``"fp32"``, ``"bf16"`` (matmul/conv-class ops in bf16, fp32 master
            weights, reductions and updates) or ``"fp16"`` (the same plus dynamic loss
            scaling). Default: ``"fp32"``. Betty: same names (Betty autocasts). Read by: the
            ``cast_for_amp`` pass (``compile="fx"`` and ``"inductor"``; ``"eager"`` computes
            in fp32); fp16's loss scaling on every backend.
        initial_dynamic_scale: The fp16 loss scale at the first step. Default: ``4096.0``.
            Betty: same (GradScaler's ``init_scale``). Read by: fp16 loss scaling, every
            backend.
        scale_factor: Under fp16, the loss scale grows by this factor after
            ``scale_growth_interval`` steps without overflow (an overflow halves it and skips
            the step). Default: ``2.0``. Betty: same (GradScaler's ``growth_factor``). Read
            by: fp16 loss scaling, every backend.
        scale_growth_interval: Steps without overflow before the fp16 loss scale grows.
            Default: ``2000``. Betty: not in Betty (GradScaler's ``growth_interval``, whose
            default Betty uses). Read by: fp16 loss scaling, every backend.
        warmup_steps: Local steps this problem takes before its uppers first step: a window
            ends only once the local step count exceeds it. Default: ``0``. Betty: same.
            Read by: the schedule, every backend.
        log_step: Record this problem's loss (and the metrics its ``training_step``
            returns) every ``log_step`` local steps; <= 0 uses ``EngineConfig.log_every``.
            Default: ``-1``. Betty: same, but <= 0 never logs. Read by: the engine's
            logging.
        log_local_step: TensorBoard and wandb plot this problem's records against its
            local step instead of the global one (every record in ``metrics.jsonl`` and
            ``Engine.history`` holds both ``step`` and ``local_step``). Default: ``False``.
            Betty: same. Read by: the engine's metric files (``logger_type``
            ``"tensorboard"`` and ``"wandb"``).
        darts_alpha: darts' step: the gradients are taken at ``w ± εv`` with ``ε =
            darts_alpha / ‖v‖``. Default: ``0.01``. Betty: same. Read by: ``darts``.
        darts_multitask: Must be ``False``; ``True`` raises ProgramError. Default:
            ``False``. Betty: ``True`` leaves this problem's parameters at ``w − εv`` after
            each darts product instead of restoring ``w``. Read by: the check of this
            ``Config``.
        sama_adam_alpha: sama's step: the gradients are taken at ``w ± εu`` with ``u`` the
            preconditioned vector and ``ε = sama_adam_alpha / ‖u‖``. Default: ``1.0``.
            Betty: same. Read by: ``sama``.
        sama_multitask: Must stay False: True raises ProgramError. Default: ``False``.
            Betty: True leaves this problem's parameters at ``w − εu`` after each
            hypergradient instead of restoring them (averaged across ranks when
            distributed). Read by: ``sama`` (the check).
        neumann_iterations: Terms K of the Neumann series ``α Σ_{j<=K} (I − αH)^j v``.
            Default: ``1``. Betty: same. Read by: ``neumann``.
        neumann_alpha: α in the Neumann series; it converges when ``αH`` has its spectrum in
            (0, 2). Default: ``1.0``. Betty: same. Read by: ``neumann``.
        cg_iterations: Conjugate-gradient iterations for ``H x = v``. Default: ``1``.
            Betty: same. Read by: ``cg``.
        cg_alpha: Conjugate gradient solves ``(cg_alpha·H) x = v`` and scales the result
            back (textbook CG; Betty's differs for ``cg_alpha != 1``, see the README).
            Default: ``1.0``. Betty: same name. Read by: ``cg``.
        amp_fp32_methods: Under bf16 or fp16, the hypergradient (best-response) computations
            of these methods stay in fp32: a bf16 darts difference quotient is off by ~20%.
            Default: ``("darts", "sama", "neumann", "cg", "itd")``. Betty: not in Betty. Read by: the
            ``cast_for_amp`` pass (``compile="fx"`` and ``"inductor"``).
        itd_segments: Checkpoints an ``itd`` replay: 0 = automatic (segmented only under
            ``EngineConfig.memory_budget``), 1 = off, S = keep the start of S segments and
            replay one segment at a time. Default: ``0``. Betty: not in Betty. Read by:
            ``itd``, every backend.
    """

    type: str = "darts"
    unroll_steps: int = 1
    first_order: bool = True
    retain_graph: bool = False
    allow_unused: bool = True
    gradient_accumulation: int = 1
    gradient_clipping: float = 0.0
    precision: str = "fp32"
    initial_dynamic_scale: float = 4096.0
    scale_factor: float = 2.0
    scale_growth_interval: int = 2000
    warmup_steps: int = 0
    log_step: int = -1
    log_local_step: bool = False
    darts_alpha: float = 0.01
    darts_multitask: bool = False
    sama_adam_alpha: float = 1.0
    sama_multitask: bool = False
    neumann_iterations: int = 1
    neumann_alpha: float = 1.0
    cg_iterations: int = 1
    cg_alpha: float = 1.0
    amp_fp32_methods: tuple[str, ...] = ("darts", "sama", "neumann", "cg", "itd")
    itd_segments: int = 0

    def validate(self, problem: str) -> None:
        """Raise ProgramError naming ``problem`` for any out-of-range field.

        ``type`` is checked against the registered methods when the program is built
        (``program.build_program``, with ``hypergrad.METHOD_RULES``).
        """
        where = f"Config of problem {problem!r}"
        _one_of(where, "precision", self.precision, PRECISIONS)
        for name in ("unroll_steps", "gradient_accumulation", "neumann_iterations", "cg_iterations"):
            _require(where, name, getattr(self, name), _is_int(getattr(self, name), 1), "an integer >= 1")
        for name in ("warmup_steps", "itd_segments", "scale_growth_interval"):
            _require(where, name, getattr(self, name), _is_int(getattr(self, name), 0), "an integer >= 0")
        _require(
            where, "log_step", self.log_step, _is_int(self.log_step, -1), "an integer (<= 0: EngineConfig.log_every)"
        )
        _require(
            where,
            "gradient_clipping",
            self.gradient_clipping,
            _is_finite(self.gradient_clipping, 0.0),
            "a finite number >= 0 (0: off)",
        )
        for name in ("darts_alpha", "sama_adam_alpha", "neumann_alpha", "cg_alpha"):
            value = getattr(self, name)
            _require(where, name, value, _is_finite(value, 0.0) and value > 0, "a finite number > 0")
        if self.darts_multitask is not False:
            raise ProgramError(
                f"{where}: darts_multitask={self.darts_multitask!r} is not implemented (in Betty it leaves the "
                "lower problem's parameters at w - eps*v after each darts product instead of restoring w); "
                "leave darts_multitask=False"
            )
        if self.sama_multitask is not False:
            raise ProgramError(
                f"{where}: sama_multitask={self.sama_multitask!r} is not supported: Betty then leaves the "
                "parameters at w − εu after each sama hypergradient (averaged across ranks) instead of "
                "restoring them; use sama_multitask=False"
            )
        if self.precision == "fp16" and (self.initial_dynamic_scale <= 0 or self.scale_factor <= 1):
            raise ProgramError(
                f"{where}: precision='fp16' needs dynamic loss scaling: initial_dynamic_scale > 0 and "
                f"scale_factor > 1 (got {self.initial_dynamic_scale}, {self.scale_factor})"
            )


def _is_int(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_finite(value: object, low: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low


def _require(where: str, name: str, value: object, ok: bool, allowed: str) -> None:
    """Raise ProgramError naming the field, its value and what is allowed, unless ``ok``."""
    if not ok:
        raise ProgramError(f"{where}: {name}={value!r}; {name} must be {allowed}")


def _one_of(where: str, name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ProgramError(f"{where}: {name}={value!r}; use one of {list(allowed)}")


@dataclass
class EngineConfig:
    """How the whole program runs: schedule, validation, compilation, outputs.

    Betty 0.2.1's fields keep their names and meanings; a value whose meaning is not
    honoured (Betty's ``strategy`` values ``"zero"``, ``"fsdp"`` and ``"accelerate"``)
    raises ProgramError saying what to use instead, and the fields Betty does not have
    say so. ``docs/settings.md`` is generated from the entries
    below (``python scripts/settings_doc.py``).

    Attributes:
        train_iters: Global steps ``Engine.run`` trains for; each global step steps every
            leaf problem once, and uppers step when their lowers' windows end. Default:
            ``50000``. Betty: same. Read by: ``Engine.run`` (the CLI's ``--iters`` sets it).
        valid_step: Call the engine's ``validation()`` every ``valid_step`` global steps,
            when the Engine subclass defines one. Default: ``500``. Betty: same. Read by:
            ``Engine.run``.
        logger_type: ``"none"``, ``"tensorboard"`` (also write every record as TensorBoard
            scalars ``<tag>/<metric>`` into ``output_dir``) or ``"wandb"`` (also start a
            wandb run, files in ``output_dir``, and log every record to it as
            ``<tag>/<metric>`` with a ``global_step`` key); either needs ``output_dir`` and
            its package installed (``pip install tensorboard`` / ``wandb``), checked at
            construction. Default: ``"none"``. Betty: same values; Betty falls back to
            ``"none"`` when the package is missing and never starts its wandb run (its
            ``wandb.init`` is never called). Read by: the engine's metric files.
        roll_back: A problem with an upper caches its state before each step and, once its
            uppers have stepped, redoes that step from the cache against their new
            parameters. Default: ``False``. Betty: same. Read by: the schedule and the step
            runner, every backend; it turns ``in_place_updates`` off.
        backend: The ``torch.distributed`` backend: ``"gloo"``, ``"nccl"``, or ``"auto"``
            (nccl when CUDA is available, else gloo). Default: ``"auto"``. Betty: same, with
            default ``"nccl"``. Read by: ``strategy="distributed"`` only.
        strategy: ``"distributed"`` runs data-parallel on ``torch.distributed``, set up from
            torchrun's environment (see the README); ``"default"``, ``"cpu"`` and ``"gpu"``
            run in this process wherever the modules and batches are (nothing is moved):
            ``"cpu"`` and ``"gpu"`` raise ProgramError at construction unless every
            module's parameters and buffers already are on the CPU / a CUDA device.
            ``"zero"``, ``"fsdp"`` and ``"accelerate"`` raise ProgramError (use
            ``"distributed"``). Default: ``"default"``. Betty: same names; Betty moves
            modules and batches to the device (``"default"``: CUDA when available).
            Read by: the engine's distributed setup and its Betty-settings check
            (``mlocompile run --nproc`` sets it).
        early_stopping: Stop ``Engine.run`` once ``early_stopping_metric`` has not improved
            for ``early_stopping_tolerance`` validations in a row. Default: ``False``.
            Betty: same (Betty's raises on an undefined name). Read by: validation.
        early_stopping_mode: ``"min"`` (lower is better) or ``"max"``. Default: ``"min"``.
            Betty: same. Read by: validation, with ``early_stopping``.
        early_stopping_tolerance: Validations without improvement before stopping.
            Default: ``5``. Betty: same. Read by: validation, with ``early_stopping``.
        early_stopping_metric: The key of ``validation()``'s result that early stopping
            watches, and that every ``ReduceLROnPlateau`` scheduler steps on; a missing key
            raises ProgramError at the first validation. Default: ``"loss"``. Betty: same
            (Betty has no metric for ``ReduceLROnPlateau``). Read by: validation, with
            ``early_stopping`` or a ``ReduceLROnPlateau``.
        compile: The backend that runs every step: ``"eager"`` (the step functions run
            untraced), ``"fx"`` (traced aten-level GraphModules after the pass pipeline) or
            ``"inductor"`` (that graph compiled by inductor). Default: ``"fx"``. Betty: not
            in Betty. Read by: the compiler (the CLI's ``--compile`` sets it).
        progress: Show a progress bar (tqdm) on stderr during ``Engine.run``, with ETA, the
            steady-state rate, live per-problem losses and the latest validation metrics;
            drawn only when stderr is a terminal, on rank 0. Default: ``True``. Betty: not
            in Betty (Betty logs lines). Read by: ``Engine.run`` (the CLI's
            ``--progress/--no-progress`` sets it).
        output_dir: A folder for ``metrics.jsonl`` and ``metrics.csv`` (and TensorBoard's
            event files); None keeps the records in ``Engine.history`` only. Default:
            ``None``. Betty: not in Betty. Read by: the engine's metric files (the CLI's
            ``--out`` sets it).
        log_every: Record a problem's loss every ``log_every`` of its local steps when its
            ``Config.log_step`` is <= 0; 0 never. Default: ``10``. Betty: not in Betty
            (Betty records only problems with ``log_step > 0``). Read by: the engine's
            logging.
        memory_budget: Trade time for memory: None is off; a number <= 1 is a fraction of
            the estimated peak, a larger one bytes. ``itd`` replays are checkpointed in
            segments (every backend) and the other step graphs get the ``rematerialize``
            pass (``compile="fx"`` and ``"inductor"``). Default: ``None``. Betty: not in
            Betty. Read by: ``itd`` and the ``rematerialize`` pass.
        dist_timeout_s: Seconds a collective waits before the group gives up (a rank that
            died brings the others down). Default: ``300.0``. Betty: not in Betty. Read by:
            ``strategy="distributed"`` only.
        dist_check_every: Every this many global steps, check that parameters and optimizer
            state are bit-identical across ranks (a mismatch names the problem and step);
            0 never. Default: ``0``. Betty: not in Betty. Read by: ``strategy="distributed"``
            only.
        check_finite: Raise NonFiniteError naming the problem and step when a loss or
            gradient is NaN/inf, leaving parameters and optimizer state as they were (an
            in-place fx update is then guarded: ``where(non_finite, old, new)``); False
            skips the check. fp16 overflows are the loss scaler's either way. Default:
            ``True``. Betty: not in Betty. Read by: the step runner, every backend; the fx
            graph's update guard.
        in_place_updates: An fx update step writes the new parameters and optimizer state
            into the old tensors, as ``torch.optim`` does, which saves one copy of them at
            the peak. The price: a ``train_step`` that fails after such an update (a later
            problem's error, a KeyboardInterrupt) cannot be undone, so the engine then
            refuses to step or save until ``load``. Off, every ``train_step`` is all or
            nothing (see the README's "Training runs"). Default: ``False``. Betty: not in
            Betty. Read by: ``compile="fx"`` update steps, never under ``roll_back``.
    """

    train_iters: int = 50000
    valid_step: int = 500
    logger_type: str = "none"
    roll_back: bool = False
    backend: str = "auto"  # torch.distributed backend: "gloo", "nccl", or "auto" (nccl iff CUDA)
    strategy: str = "default"
    early_stopping: bool = False
    early_stopping_mode: str = "min"
    early_stopping_tolerance: int = 5
    early_stopping_metric: str = "loss"
    compile: str = "fx"
    progress: bool = True
    output_dir: str | None = None
    log_every: int = 10
    memory_budget: float | None = None
    dist_timeout_s: float = 300.0
    dist_check_every: int = 0
    check_finite: bool = True
    in_place_updates: bool = False

    def validate(self) -> None:
        """Raise ProgramError naming the field, its value and what is allowed, for any bad field."""
        where = "EngineConfig"
        _one_of(where, "compile", self.compile, COMPILE_MODES)
        _one_of(where, "early_stopping_mode", self.early_stopping_mode, ("min", "max"))
        if self.strategy in UNSUPPORTED_STRATEGIES:
            raise ProgramError(
                f"EngineConfig: strategy={self.strategy!r} ({UNSUPPORTED_STRATEGIES[self.strategy]}) is not "
                "implemented; use strategy='distributed' (data-parallel, parameters and optimizer state replicated "
                "on every rank; launch with torchrun) or 'default' (one process)"
            )
        _one_of(where, "strategy", self.strategy, STRATEGIES)
        _one_of(where, "logger_type", self.logger_type, LOGGER_TYPES)
        for name, low in (("train_iters", 0), ("valid_step", 1), ("early_stopping_tolerance", 1)):
            _require(where, name, getattr(self, name), _is_int(getattr(self, name), low), f"an integer >= {low}")
        for name in ("log_every", "dist_check_every"):
            _require(where, name, getattr(self, name), _is_int(getattr(self, name), 0), "an integer >= 0 (0: never)")
        _require(
            where,
            "dist_timeout_s",
            self.dist_timeout_s,
            _is_finite(self.dist_timeout_s, 0.0) and self.dist_timeout_s > 0,
            "a number of seconds > 0",
        )
        if self.memory_budget is not None and not (_is_finite(self.memory_budget, 0.0) and self.memory_budget > 0):
            raise ProgramError(
                f"EngineConfig.memory_budget={self.memory_budget!r}; memory_budget must be > 0: bytes, or a "
                "fraction (<= 1) of the estimated peak"
            )
        packages = {"tensorboard": "TensorBoard", "wandb": "wandb (Weights & Biases)"}
        if self.logger_type in packages and not _installed(self.logger_type):
            raise ProgramError(
                f"EngineConfig.logger_type={self.logger_type!r} needs {packages[self.logger_type]}, which is not "
                f"installed: pip install {self.logger_type} (or use logger_type='none'; metrics still go to "
                "output_dir)"
            )
        if self.logger_type != "none" and not self.output_dir:
            raise ProgramError(
                f"EngineConfig.logger_type={self.logger_type!r} needs output_dir (its files go there, next to "
                "metrics.jsonl); set EngineConfig(output_dir='runs/NAME'), or use logger_type='none'"
            )


def _installed(package: str) -> bool:
    """Whether ``package`` can be imported (without importing it: wandb's import takes seconds)."""
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # NOTE: in sys.modules without a __spec__ (a module put there by hand): importable
        return package in sys.modules
