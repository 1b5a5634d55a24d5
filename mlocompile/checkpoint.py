"""Engine checkpoints: atomic writes, and a resume that reproduces the uninterrupted run."""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

from mlocompile.errors import CheckpointError

if TYPE_CHECKING:
    from mlocompile.engine import Engine

FORMAT_VERSION = 1


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # numpy is optional
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def engine_state(engine: Engine) -> dict[str, Any]:
    """Collect everything a resumed run needs: weights, optimizer/scheduler state,
    schedule counters, unroll windows, data position, RNG and early-stopping state."""
    problems = {}
    for name, p in engine.program.problems.items():
        assert p.module is not None and p.optimizer is not None
        problems[name] = {
            "module": p.module.state_dict(),
            "optimizer": p.optimizer.state_dict(),
            "sgd_steps": dict(engine.optimizers[name]._sgd_steps),
            "scheduler": None if p.scheduler is None else p.scheduler.state_dict(),
            "data": p.data_state(),
            "cur_batch": p.cur_batch,
            "init_source": None if p._init_source is None else p._init_source.name,
        }
    return {
        "format": FORMAT_VERSION,
        "global_step": engine.global_step,
        "problems": problems,
        "runtime": {name: asdict(run) for name, run in engine._run.items()},
        "init_sources": dict(engine.executor.init_sources),
        "checked": engine._checked,
        "early_stopping": (engine.early_stopping_best, engine.early_stopping_counter),
        "history": list(engine.history),
        "rng": _rng_state(),
    }


def save(engine: Engine, path: str) -> str:
    """Write the engine's state to ``path`` atomically (a temp file, fsync, rename)."""
    state = engine_state(engine)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
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


def load(engine: Engine, path: str) -> None:
    """Restore a state written by ``save`` into an engine built the same way."""
    from mlocompile.engine import _Runtime

    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path!r}")
    state = torch.load(path, weights_only=False)
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path!r} has checkpoint format {state.get('format')!r}, expected {FORMAT_VERSION}")
    saved, mine = sorted(state["problems"]), sorted(engine.program.problems)
    if saved != mine:
        raise CheckpointError(
            f"checkpoint problems {saved} differ from the engine's {mine}; build the engine the same way"
        )
    for name, p in engine.program.problems.items():
        st = state["problems"][name]
        assert p.module is not None and p.optimizer is not None
        try:
            p.module.load_state_dict(st["module"])
        except RuntimeError as exc:
            raise CheckpointError(f"problem {name!r}: module does not match the checkpoint: {exc}") from exc
        p.optimizer.load_state_dict(st["optimizer"])
        engine.optimizers[name]._sgd_steps = dict(st["sgd_steps"])
        if p.scheduler is not None and st["scheduler"] is not None:
            p.scheduler.load_state_dict(st["scheduler"])
        p.load_data_state(st["data"])
        p.cur_batch = st["cur_batch"]
        p._init_source = None if st["init_source"] is None else engine.program.problems[st["init_source"]]
    engine._run = {name: _Runtime(**run) for name, run in state["runtime"].items()}
    engine.executor.init_sources = dict(state["init_sources"])
    engine._checked = state["checked"]
    engine.global_step = state["global_step"]
    engine.early_stopping_best, engine.early_stopping_counter = state["early_stopping"]
    engine.history = list(state["history"])
    _set_rng_state(state["rng"])
