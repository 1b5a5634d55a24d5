"""Error hierarchy: one base class, one subclass per compiler stage."""

from __future__ import annotations


class MLOError(Exception):
    """Base class of every error mlocompile raises on purpose."""


class ProgramError(MLOError):
    """The declared MLO program (problems, dependencies, configs) is invalid."""


class TraceError(MLOError):
    """A problem's loss could not be traced into the IR."""


class PassError(MLOError):
    """A compiler pass failed; the message names the pass and the passes before it."""


class IRVerificationError(MLOError):
    """The IR broke an invariant that every pass must preserve."""


class NonFiniteError(MLOError):
    """A loss or gradient became NaN/inf during training."""
