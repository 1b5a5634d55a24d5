"""Every error mlocompile raises on purpose: one base class, one subclass per stage or tool."""

from __future__ import annotations


class MLOError(Exception):
    """Base class of every error mlocompile raises on purpose."""


class ProgramError(MLOError):
    """The declared MLO program (problems, dependencies, configs) is invalid."""


class TraceError(MLOError):
    """A problem's loss could not be traced into the IR."""


class PassError(MLOError):
    """A compiler pass failed; the message names the pass, the passes before it and the IR around the failure."""


class IRVerificationError(MLOError):
    """The IR broke an invariant that every pass must preserve."""


class NonFiniteError(MLOError):
    """A loss or gradient became NaN/inf during training."""


class CheckpointError(MLOError):
    """A checkpoint cannot be written, or does not fit the engine it is loaded into."""


class DistributedError(MLOError):
    """Ranks disagree, or the process group cannot be set up."""


class RenderError(MLOError):
    """A diagram could not be rendered (no Graphviz ``dot``, unknown format, ``dot`` failed)."""


class CliError(MLOError):
    """Bad command-line input: a missing file, a target that is not an Engine."""


__all__ = [
    "CheckpointError",
    "CliError",
    "DistributedError",
    "IRVerificationError",
    "MLOError",
    "NonFiniteError",
    "PassError",
    "ProgramError",
    "RenderError",
    "TraceError",
]
