"""Checkpoint files: bad files and impossible paths give a CheckpointError; a failed load changes nothing."""

from __future__ import annotations

import os

import pytest
import torch
from test_engine import _state, resumable_engine

import mlocompile as mlo
from mlocompile import checkpoint
from programs import mwn_engine


@pytest.fixture
def saved(tmp_path):
    engine = resumable_engine()
    engine.config.train_iters = 3
    engine.run()
    return engine, engine.save(str(tmp_path / "ckpt.pt"))


def _unchanged(engine):
    before = _state(engine)
    step = engine.global_step

    def check():
        after = _state(engine)
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        assert engine.global_step == step

    return check


def test_garbage_and_truncated_files_name_the_file(saved, tmp_path):
    engine, path = saved
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(path, "rb").read()[:2000])
    fresh = resumable_engine()
    check = _unchanged(fresh)
    for bad in (garbage, truncated):
        with pytest.raises(mlo.CheckpointError, match=rf"cannot read checkpoint '{bad}': it is truncated"):
            fresh.load(str(bad))
    check()


def test_loading_runs_no_code_from_the_file(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT_VERSION, "payload": _Evil()}, path)
    with pytest.raises(mlo.CheckpointError, match="holds objects other than tensors and plain data"):
        checkpoint.read(str(path))
    assert not (tmp_path / "ran").exists()


class _Evil:
    def __reduce__(self):
        return (open, (str(os.path.join(os.path.dirname(__file__), "..", "ran")), "w"))


def test_a_file_of_another_format_or_without_engine_state(tmp_path):
    old = tmp_path / "old.pt"
    torch.save({"format": 1}, old)
    with pytest.raises(mlo.CheckpointError, match="has checkpoint format 1, expected"):
        checkpoint.read(str(old))
    partial = tmp_path / "partial.pt"
    torch.save({"format": checkpoint.FORMAT_VERSION, "problems": {}}, partial)
    with pytest.raises(mlo.CheckpointError, match=r"lacks \['global_step'"):
        checkpoint.read(str(partial))


def test_impossible_paths_fail_before_anything_is_written(saved, tmp_path):
    engine, _ = saved
    (tmp_path / "afile").write_text("x")
    cases = {
        str(tmp_path): "it is a directory",
        str(tmp_path / "missing" / "ckpt.pt"): "does not exist; create the folder first",
        str(tmp_path / "afile" / "ckpt.pt"): "is a file",
    }
    for path, why in cases.items():
        listing = sorted(os.listdir(tmp_path))
        with pytest.raises(mlo.CheckpointError, match=why):
            engine.save(path)
        assert sorted(os.listdir(tmp_path)) == listing


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_fails_before_anything_is_written(saved, tmp_path):
    engine, _ = saved
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(mlo.CheckpointError, match="is not writable"):
            engine.save(str(folder / "ckpt.pt"))
    finally:
        folder.chmod(0o700)


def test_the_next_save_removes_temporary_files_a_killed_save_left(saved, tmp_path):
    engine, path = saved
    stale = tmp_path / ".ckpt.pt.ckpt-dead.tmp"
    stale.write_bytes(b"half")
    other = tmp_path / ".other.pt.ckpt-alive.tmp"  # another target's save: not ours to remove
    other.write_bytes(b"half")
    engine.save(path)
    assert not stale.exists() and other.exists()


def test_a_differently_built_engine_is_rejected_before_anything_changes(saved):
    _, path = saved
    adam = resumable_engine()
    inner = adam.program.problems["inner"]
    inner.optimizer = torch.optim.Adam(inner.module.parameters(), lr=0.1)  # was SGD when saved
    check = _unchanged(adam)
    with pytest.raises(mlo.CheckpointError, match="optimizer is SGD, this engine's is Adam"):
        adam.load(path)
    check()
    no_sched = mwn_engine()
    no_sched.program.problems["inner"].module.load_state_dict(resumable_engine().inner.module.state_dict())
    check = _unchanged(no_sched)
    with pytest.raises(mlo.CheckpointError, match="scheduler is StepLR, this engine's is None"):
        no_sched.load(path)
    check()


def test_a_window_for_a_method_without_one_is_rejected(tmp_path):
    itd = resumable_engine("itd")
    itd.config.train_iters = 3  # mid window (unroll_steps=2)
    itd.run()
    path = itd.save(str(tmp_path / "itd.pt"))
    darts = resumable_engine("darts")
    check = _unchanged(darts)
    with pytest.raises(mlo.CheckpointError, match="holds an unroll window, but its method here is 'darts'"):
        darts.load(path)
    check()


def test_a_failure_while_applying_restores_the_engine(saved, monkeypatch):
    _, path = saved
    fresh = resumable_engine()
    fresh.config.train_iters = 1
    fresh.run()
    check = _unchanged(fresh)
    real, calls = fresh.schedule.load_state_dict, []

    def fails_once(state):  # after every module and optimizer was loaded
        calls.append(state)
        if len(calls) == 1:
            raise RuntimeError("schedule state from the future")
        real(state)

    monkeypatch.setattr(fresh.schedule, "load_state_dict", fails_once)
    with pytest.raises(RuntimeError, match="from the future"):
        fresh.load(path)
    assert len(calls) == 2  # the saved state, then the engine's own state back
    check()
    assert fresh.schedule.counters["inner"].count == 1


@pytest.mark.parametrize("backend,in_place", [("eager", False), ("fx", False), ("fx", True)])
def test_a_non_finite_step_changes_no_parameter_or_optimizer_state(backend, in_place, tmp_path):
    """With in_place_updates an fx update writes into its donated inputs: a NaN step must write the old values."""
    engine = mwn_engine("darts", backend, in_place_updates=in_place)
    for _ in range(3):
        engine.train_step()
    inner = engine.program.problems["inner"]
    before = {k: v.clone() for k, v in inner.module.state_dict().items()}
    momentum = [s["momentum_buffer"].clone() for s in inner.optimizer.state.values()]
    x, t = inner.train_data_loader[0]
    inner.train_data_loader = [(torch.full_like(x, float("nan")), t)]
    inner._iterators = None
    with pytest.raises(mlo.NonFiniteError, match="problem 'inner'"):
        engine.train_step()
    assert all(torch.equal(v, before[k]) for k, v in inner.module.state_dict().items())
    assert all(torch.equal(s["momentum_buffer"], m) for s, m in zip(inner.optimizer.state.values(), momentum))
    engine.save(str(tmp_path / "after_nan.pt"))
    saved = checkpoint.read(str(tmp_path / "after_nan.pt"))
    assert all(torch.isfinite(v).all() for v in saved["problems"]["inner"]["module"].values())
