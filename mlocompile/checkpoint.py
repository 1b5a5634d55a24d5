"""Checkpoint files: atomic writes, safe reads, and the global random state a resume needs.

This module only does files. What goes into one is the Engine's business
(``Engine.state_dict()``); ``write`` adds the format version and the random state of
torch, Python and numpy, ``read`` checks the file, ``set_rng_state`` restores the
random state once the engine has loaded the rest. Files are read with
``torch.load(weights_only=True)``: loading a checkpoint never runs code from it.
"""

from __future__ import annotations

import glob
import os
import random
import tempfile
from typing import Any

import torch

from mlocompile.errors import CheckpointError

FORMAT_VERSION = 5  # 5: data positions record the loaders' generators and first-batch random state
REQUIRED = ("global_step", "problems", "schedule", "runs", "checked", "early_stopping", "history", "run", "rng")


def rng_state() -> dict[str, Any]:
    """The global random state of torch (CPU), Python and numpy (if installed), as plain data."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np
    except ImportError:  # numpy is optional
        return state
    legacy: Any = np.random.get_state()  # ("MT19937", keys, pos, has_gauss, cached_gaussian)
    name, keys, pos, has_gauss, gauss = legacy
    # NOTE: as a tensor and numbers, so weights_only loading accepts it
    state["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos)}
    state["numpy"].update(has_gauss=int(has_gauss), gauss=float(gauss))
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np_state = state["numpy"]
        keys = np_state["keys"].numpy().astype("uint32")
        np.random.set_state((np_state["name"], keys, np_state["pos"], np_state["has_gauss"], np_state["gauss"]))


def check_writable(path: str) -> str:
    """Return the folder ``path`` would be written into; raise CheckpointError if it cannot be.

    Raises:
        CheckpointError: ``path`` is a directory, its folder does not exist (or is a file),
            or the folder is not writable.
    """
    if os.path.isdir(path):
        raise CheckpointError(f"cannot save a checkpoint to {path!r}: it is a directory; give a file name in it")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        what = "is a file" if os.path.exists(directory) else "does not exist"
        raise CheckpointError(
            f"cannot save a checkpoint to {path!r}: its folder {directory!r} {what}; "
            "create the folder first (os.makedirs) or choose another path"
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot save a checkpoint to {path!r}: its folder {directory!r} is not writable")
    return directory


def write(path: str, state: dict[str, Any]) -> str:
    """Write ``state`` (plus format version and random state) to ``path`` atomically.

    A temporary file in the same folder, fsync, rename, fsync of the folder: readers see
    the old file or the new one, never a partial one. Temporary files a killed save of
    the same path left behind are removed first.

    Raises:
        CheckpointError: the path cannot be written (see ``check_writable``); nothing is written then.
    """
    directory = check_writable(path)
    prefix = f".{os.path.basename(path)}.ckpt-"
    for stale in glob.glob(os.path.join(glob.escape(directory), glob.escape(prefix) + "*.tmp")):
        os.unlink(stale)
    payload = {"format": FORMAT_VERSION, "rng": rng_state(), **state}
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
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
    """Read a file ``write`` wrote.

    Raises:
        CheckpointError: naming the file, if it is missing, unreadable, truncated, not a
            checkpoint, holds objects other than tensors and plain data, or has another format.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path!r}")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # torch.load raises many types (UnpicklingError, RuntimeError, EOFError, OSError)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path!r}: it is truncated, not an mlocompile checkpoint, or holds objects "
            f"other than tensors and plain data ({type(exc).__name__}: {first})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path!r} has checkpoint format {found!r}, expected {FORMAT_VERSION}")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks {missing}; it was not written by Engine.save")
    return state
