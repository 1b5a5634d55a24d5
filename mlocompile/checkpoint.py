"""Checkpoint files: atomic writes, reads, and the global random state a resume needs.

This module only does files. What goes into one is the Engine's business
(``Engine.state_dict()``); ``write`` adds the format version and the random state of
torch, Python and numpy, ``read`` checks the version, ``set_rng_state`` restores the
random state once the engine has loaded the rest.
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import torch

from mlocompile.errors import CheckpointError

FORMAT_VERSION = 2


def rng_state() -> dict[str, Any]:
    """The global random state of torch (CPU), Python and numpy (if installed)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np
    except ImportError:  # numpy is optional
        return state
    state["numpy"] = np.random.get_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def write(path: str, state: dict[str, Any]) -> str:
    """Write ``state`` (plus format version and random state) to ``path`` atomically.

    A temporary file in the same folder, fsync, rename, fsync of the folder: readers
    see the old file or the new one, never a partial one.
    """
    payload = {"format": FORMAT_VERSION, "rng": rng_state(), **state}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic on POSIX
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read(path: str) -> dict[str, Any]:
    """Read a file ``write`` wrote; raise CheckpointError if it is missing or of another format."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path!r}")
    state: dict[str, Any] = torch.load(path, weights_only=False)
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path!r} has checkpoint format {state.get('format')!r}, expected {FORMAT_VERSION}")
    return state
