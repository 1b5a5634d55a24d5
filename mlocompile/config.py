"""Configuration dataclasses, with Betty 0.2.1's field names and meanings."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

from mlocompile.errors import ProgramError

PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("eager", "fx", "inductor")
LOGGER_TYPES = ("none", "tensorboard")
STRATEGIES = ("default", "cpu", "gpu", "distributed")


@dataclass
class Config:
    """How one problem is trained and how its solution is differentiated.

    ``type`` is the best-response Jacobian method used when an upper problem's
    hypergradient passes through *this* problem: ``darts`` (finite differences,
    Hessian-inverse ~ identity), ``neumann`` (Neumann series), ``cg`` (conjugate
    gradient) or ``itd`` (reverse mode through the last ``unroll_steps`` updates).
    ``itd_segments`` (not in Betty) checkpoints an itd replay: 0 = automatic (only
    under ``EngineConfig.memory_budget``), 1 = off, S = replay S segments one at a time.
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
    neumann_iterations: int = 1
    neumann_alpha: float = 1.0
    cg_iterations: int = 1
    cg_alpha: float = 1.0
    amp_fp32_methods: tuple[str, ...] = ("darts", "neumann", "cg", "itd")
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
        for name in ("darts_alpha", "neumann_alpha", "cg_alpha"):
            value = getattr(self, name)
            _require(where, name, value, _is_finite(value, 0.0) and value > 0, "a finite number > 0")
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

    Betty's fields keep their names and meanings; ``compile`` picks the backend that
    runs the emitted steps: ``"eager"`` (the step functions run untraced), ``"fx"``
    (traced aten-level GraphModules after the pass pipeline) or ``"inductor"``.

    ``in_place_updates`` (not in Betty; default False): an fx update step writes the new
    parameters and optimizer state into the old tensors, as ``torch.optim`` does, which
    saves one copy of them at the peak. The price: a ``train_step`` that fails after such
    an update (a later problem's error, a KeyboardInterrupt) cannot be undone, so the
    engine then refuses to step or save until ``load``. Off, every ``train_step`` is all
    or nothing (see the README's "Training runs").
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
        if self.logger_type == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ProgramError(
                "EngineConfig.logger_type='tensorboard' needs TensorBoard, which is not installed: "
                "pip install tensorboard (or use logger_type='none'; metrics still go to output_dir)"
            )
