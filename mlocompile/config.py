"""Configuration dataclasses, with Betty 0.2.1's field names and meanings."""

from __future__ import annotations

from dataclasses import dataclass

from mlocompile.errors import ProgramError

PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("eager", "fx", "inductor")


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
        if self.precision not in PRECISIONS:
            raise ProgramError(f"{where}: precision={self.precision!r}; use one of {list(PRECISIONS)}")
        for name in ("unroll_steps", "gradient_accumulation"):
            if int(getattr(self, name)) < 1:
                raise ProgramError(f"{where}: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("neumann_iterations", "cg_iterations", "warmup_steps", "itd_segments"):
            if int(getattr(self, name)) < 0:
                raise ProgramError(f"{where}: {name} must be >= 0, got {getattr(self, name)}")
        if self.darts_alpha <= 0 or self.cg_alpha <= 0 or self.neumann_alpha <= 0:
            raise ProgramError(f"{where}: darts_alpha, neumann_alpha and cg_alpha must be > 0")
        if self.precision == "fp16" and (self.initial_dynamic_scale <= 0 or self.scale_factor <= 1):
            raise ProgramError(
                f"{where}: precision='fp16' needs dynamic loss scaling: initial_dynamic_scale > 0 and "
                f"scale_factor > 1 (got {self.initial_dynamic_scale}, {self.scale_factor})"
            )


@dataclass
class EngineConfig:
    """How the whole program runs: schedule, validation, compilation, outputs.

    Betty's fields keep their names and meanings; ``compile`` picks the backend that
    runs the emitted steps: ``"eager"`` (the step functions run untraced), ``"fx"``
    (traced aten-level GraphModules after the pass pipeline) or ``"inductor"``.
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

    def validate(self) -> None:
        """Raise ProgramError for any out-of-range field."""
        if self.compile not in COMPILE_MODES:
            raise ProgramError(f"EngineConfig.compile={self.compile!r}; use one of {list(COMPILE_MODES)}")
        if self.early_stopping_mode not in ("min", "max"):
            raise ProgramError(f"EngineConfig.early_stopping_mode={self.early_stopping_mode!r}; use 'min' or 'max'")
        if self.train_iters < 0 or self.valid_step < 1:
            raise ProgramError("EngineConfig: train_iters must be >= 0 and valid_step >= 1")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ProgramError(
                "EngineConfig.memory_budget must be > 0: bytes, or a fraction (<= 1) of the estimated peak"
            )
        if self.strategy not in ("default", "cpu", "gpu", "distributed"):
            raise ProgramError(
                f"EngineConfig.strategy={self.strategy!r}; use 'default' or 'distributed' (data parallel)"
            )
