"""A train_step is all or nothing: a failure at any stage leaves the engine exactly as it was.

Each fault fires once, at one stage of one step (data, a loss, the hypergradient, the
compiled step before or after it ran, the update's write-back, buffers, a scheduler, a
window start, logging, validation), as an exception or a KeyboardInterrupt. The
engine's whole state (``state_dict``: weights, buffers, optimizer and scheduler state,
data positions, counters, windows, history) and the random streams must then equal what
they were before the step, and going on must reproduce the run that never failed, bit
for bit.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from txn_program import Lower, Upper, build

import mlocompile as mlo
from mlocompile import checkpoint
from mlocompile.compiler import Compiler
from mlocompile.execution import StepRunner
from mlocompile.optim import FunctionalOptimizer
from mlocompile.problem import Problem

STEPS, FAULT_AT = 9, 5  # train steps in a run; the step (0-based) at which the fault fires (the upper steps)


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Equal, recursively: tensors bit for bit, NaN equal to NaN."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        same = torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.nan_to_num(), b.nan_to_num()))
        assert same and torch.equal(a.isnan(), b.isnan()), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def everything(engine: mlo.Engine) -> dict[str, Any]:
    """The engine's state and the random streams (what a resumed run depends on)."""
    return {"engine": engine.state_dict(), "rng": checkpoint.rng_state()}


def _arm(monkeypatch, owner: Any, attr: str, exc: type[BaseException], nth: int = 1, after: bool = False, only=None):
    """Make ``owner.attr`` raise ``exc`` at its ``nth`` call (counted from now) whose arguments ``only`` accepts,
    before or ``after`` the real call ran."""
    real = getattr(owner, attr)
    calls = {"n": 0}

    def faulty(*args, **kwargs):
        if only is None or only(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == nth:
                if after:
                    real(*args, **kwargs)
                raise exc(f"injected into {attr}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, faulty)
    return calls


def _is_upper_problem(self, *args, **kwargs) -> bool:
    return getattr(self, "name", None) == "upper"


def _variant_of(problem: str):
    return lambda self, variant, *a, **k: variant.problem == problem


# name -> how to arm the fault on a built engine (the fault fires during step FAULT_AT)
FAULTS = {
    "data of the upper": lambda mp, e, exc: _arm(mp, Problem, "get_batch", exc, only=_is_upper_problem),
    "upper step before its graph ran": lambda mp, e, exc: _arm(mp, Compiler, "run", exc, only=_variant_of("upper")),
    "upper step after its graph ran": lambda mp, e, exc: _arm(
        mp, Compiler, "run", exc, after=True, only=_variant_of("upper")
    ),
    "lower step after its graph ran": lambda mp, e, exc: _arm(
        mp, Compiler, "run", exc, after=True, only=_variant_of("lower")
    ),
    "write-back of the upper's optimizer state": lambda mp, e, exc: _arm(
        mp, FunctionalOptimizer, "write_state", exc, nth=2
    ),
    "write-back of the lower's buffers": lambda mp, e, exc: _arm(mp, StepRunner, "write_buffers", exc, after=True),
    "lower scheduler": lambda mp, e, exc: _arm(mp, e.lower.scheduler, "step", exc),
    "upper scheduler": lambda mp, e, exc: _arm(mp, e.upper.scheduler, "step", exc),
    "a window start": lambda mp, e, exc: _arm(mp, e.schedule, "_start", exc),
    "logging the upper": lambda mp, e, exc: _arm(mp, e, "_record", exc, nth=2),
    "the lower's loss": lambda mp, e, exc: _arm_loss(mp, e, Lower, exc),
    "the upper's loss": lambda mp, e, exc: _arm_loss(mp, e, Upper, exc),
}


def _arm_loss(mp, engine: mlo.Engine, cls: type, exc: type[BaseException]):
    """User code fails: at run time under eager; under fx while the step is traced again."""
    if engine.config.compile != "eager":
        mp.setattr(engine.compiler, "_traced", {})  # NOTE: a fresh cache: the step retraces
        mp.setattr(engine.compiler, "_fns", {})
        mp.setattr(engine.compiler, "_served", {})
        mp.setattr(engine.compiler, "_symbolic", {})
    return _arm(mp, cls, "training_step", exc)


def _reference(method: str, backend: str, **kw) -> dict[str, Any]:
    engine = build(method, backend, **kw)
    for _ in range(STEPS):
        engine.train_step()
    return everything(engine)


@pytest.mark.parametrize("backend", ["eager", "fx"])
@pytest.mark.parametrize("method", ["darts", "itd"])
def test_a_failure_at_any_stage_changes_nothing_and_the_run_goes_on_as_if_it_never_happened(
    method, backend, monkeypatch
):
    want = _reference(method, backend)
    for i, (fault, arm) in enumerate(FAULTS.items()):
        exc = KeyboardInterrupt if i % 2 else RuntimeError
        engine = build(method, backend)
        for step in range(STEPS):
            if step == FAULT_AT:
                before = everything(engine)
                with monkeypatch.context() as mp:
                    calls = arm(mp, engine, exc)
                    try:
                        engine.train_step()
                    except (exc, mlo.MLOError):
                        pass
                assert calls["n"] >= 1, f"{fault}: the fault never fired"
                assert_same(everything(engine), before, f"{fault} ({exc.__name__})")
            engine.train_step()
        assert_same(everything(engine), want, f"after {fault} ({exc.__name__})")


def test_the_run_loop_rolls_back_a_step_with_its_validation(monkeypatch):
    """``run`` makes a global step and its validation one transaction (validation draws random numbers)."""
    want = build(train_iters=12)
    want.run()
    engine = build(train_iters=12)
    with monkeypatch.context() as mp:
        _arm(mp, engine, "validation", KeyboardInterrupt, nth=2)
        with pytest.raises(KeyboardInterrupt):
            engine.run()
    assert engine.global_step == 9  # step 10 validates for the 2nd time: it and its step are undone
    engine.run()
    assert_same(everything(engine), everything(want))


def test_metric_files_hold_only_completed_steps(tmp_path, monkeypatch):
    out = tmp_path / "run"
    engine = build(output_dir=str(out))
    for _ in range(3):
        engine.train_step()
    done = list(engine.history)
    with monkeypatch.context() as mp:
        _arm(mp, engine.upper.scheduler, "step", RuntimeError)  # after both problems logged their step
        with pytest.raises(RuntimeError):
            engine.train_step()
    engine.metrics.close()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["tag"] for r in done] == ["lower", "lower", "upper", "lower"]
    assert lines == done == engine.history


def test_in_place_updates_a_failure_after_the_update_cannot_be_undone_and_says_so(tmp_path, monkeypatch):
    """With donated updates the old parameters are gone: the engine refuses to step or save until load."""
    engine = build(in_place_updates=True)
    for _ in range(3):
        engine.train_step()
    engine.save(str(tmp_path / "good.pt"))
    with monkeypatch.context() as mp:
        _arm(mp, engine.upper.scheduler, "step", RuntimeError)
        with pytest.raises(RuntimeError):
            engine.train_step()
    with pytest.raises(mlo.ProgramError, match=r"could not be undone: load a checkpoint"):
        engine.train_step()
    with pytest.raises(mlo.CheckpointError, match=r"nothing saved"):
        engine.save(str(tmp_path / "torn.pt"))
    assert not (tmp_path / "torn.pt").exists()
    engine.load(str(tmp_path / "good.pt"))
    engine.train_step()  # loading a checkpoint makes the engine whole again


def test_in_place_updates_a_non_finite_step_is_still_undone():
    """The guarded update writes the old values back: nothing is lost, the engine goes on."""
    engine = build(in_place_updates=True)
    for _ in range(2):
        engine.train_step()
    x, t = next(iter(engine.lower.train_data_loader))
    before = everything(engine)
    engine.lower.get_batch = lambda: (torch.full_like(x, float("nan")), t)
    with pytest.raises(mlo.NonFiniteError):
        engine.train_step()
    del engine.lower.get_batch
    assert_same(everything(engine), before)
    engine.train_step()


# -- Ctrl-C at random times, in a subprocess -------------------------------------------------
TRIALS = 20


def _interrupt(proc: subprocess.Popen, rng: random.Random) -> list[int]:
    """Send SIGINT at random times until TRIALS checkpoints were saved; return their global steps.

    The waits start at 10-150 ms; they double after an interrupt that found the child at the
    step of the one before (a loaded machine steps slower) and halve after one that found it
    more than 25 steps further (a quiet one steps faster), so the checkpoints spread over the
    run and all TRIALS land before it ends.
    """
    assert proc.stdout is not None
    steps: list[int] = []
    scale = 1.0
    deadline = time.monotonic() + 240
    assert proc.stdout.readline().strip() == "ready"
    while len(steps) < TRIALS and time.monotonic() < deadline:
        time.sleep(scale * rng.uniform(0.01, 0.15))
        proc.send_signal(signal.SIGINT)
        line = proc.stdout.readline()
        if not line or line.strip() == "done":
            break
        steps.append(json.loads(line)["step"])
        advance = steps[-1] - (steps[-2] if len(steps) > 1 else 0)
        if advance == 0:
            scale = min(2 * scale, 8.0)
        elif advance > 25:
            scale = max(scale / 2, 1 / 16)
    return steps


AHEAD = 12  # steps a resumed run goes on before it is compared with the uninterrupted run


@pytest.mark.parametrize("backend", ["fx"])
def test_ctrl_c_at_random_times_then_save_load_in_a_new_process_reproduces_the_run(backend, tmp_path):
    """A child trains and checkpoints at every Ctrl-C (sent at random times); each checkpoint, loaded in
    another process, goes on exactly as the uninterrupted run, and so does the child itself."""
    iters = 600
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])}
    # NOTE: the three runs compare bits: each computes with one thread (another count sums in another order)
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(
        [sys.executable, str(here / "txn_program.py"), "darts", backend, str(iters), str(tmp_path / "ckpt")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        steps = _interrupt(proc, random.Random(0))
        proc.wait(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert len(steps) == TRIALS, f"only {len(steps)} interrupts landed before the run ended; steps {steps}"
    assert steps == sorted(steps) and len(set(steps)) > TRIALS // 2 and steps[-1] + AHEAD < iters, steps
    # the uninterrupted run, saved at every step a resumed run is compared at, and at its end
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = build("darts", backend, train_iters=iters)
        ref.compile()
        for target in sorted({s + AHEAD for s in steps} | {iters}):
            ref.config.train_iters = target - ref.global_step  # each run() trains train_iters more steps
            ref.run()
            ref.save(str(tmp_path / f"ref{target}.pt"))
    finally:
        torch.set_num_threads(threads)
    final = checkpoint.read(str(tmp_path / "ckptfinal.pt"))
    assert_same(final["problems"], checkpoint.read(str(tmp_path / f"ref{iters}.pt"))["problems"], "the child")
    script = f"""
import sys
from mlocompile import checkpoint
from test_transaction import assert_same, everything
from txn_program import build
engine = build("darts", "{backend}")  # one engine (one trace); each load replaces all of its state
for k, step in enumerate({steps}):
    engine.load(sys.argv[1] + f"ckpt{{k}}.pt")
    assert engine.global_step == step
    engine.config.train_iters = step + {AHEAD}
    engine.run()
    want = checkpoint.read(sys.argv[1] + f"ref{{step + {AHEAD}}}.pt")
    got = everything(engine)
    for key in ("problems", "history", "schedule", "runs", "global_step"):
        assert_same(got["engine"][key], want[key], f"checkpoint {{k}} (step {{step}}): {{key}}")
    assert_same(got["rng"], want["rng"], f"checkpoint {{k}} (step {{step}}): random streams")
print("resumed", {TRIALS})
"""
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path) + "/"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed {TRIALS}" in done.stdout


# -- output_dir: one run's metrics per folder ---------------------------------------------------
def _records(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_an_output_dir_holding_another_runs_metrics_is_refused(tmp_path):
    first = build(output_dir=str(tmp_path), train_iters=3)
    first.run()
    written = (tmp_path / "metrics.jsonl").read_text()
    second = build(output_dir=str(tmp_path), train_iters=3)
    with pytest.raises(mlo.ProgramError, match=r"holds the metrics of another run .*Use a new output_dir"):
        second.run()
    assert (tmp_path / "metrics.jsonl").read_text() == written  # nothing of the other run touched
    first.run()  # the same engine's second run appends to its own files
    assert _records(tmp_path) == first.history and first.global_step == 6


def test_a_resumed_run_rewrites_its_files_from_the_checkpoint(tmp_path):
    """Records a killed process wrote after its last checkpoint are dropped, never interleaved."""
    out, ckpt = tmp_path / "run", str(tmp_path / "ckpt.pt")
    engine = build(output_dir=str(out), train_iters=6)
    real, calls = engine.train_step, []

    def killed_later():
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # the process "dies" with step 4 logged after the checkpoint
        real()
        if len(calls) == 3:
            engine.save(ckpt)  # the last checkpoint: three steps done

    engine.train_step = killed_later
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    assert max(r["step"] for r in _records(out)) == 4
    resumed = build(output_dir=str(out), train_iters=6)
    resumed.load(ckpt)
    resumed.run()
    straight = build(output_dir=str(tmp_path / "straight"), train_iters=6)
    straight.run()
    steps = [r["step"] for r in _records(out)]
    assert steps == sorted(steps) and _records(out) == resumed.history
    assert _records(out) == _records(tmp_path / "straight")


def test_save_inside_a_step_is_refused(tmp_path, monkeypatch):
    """A hook that saves mid-step (here: at a window start) would write a half-done step."""
    engine = build()
    monkeypatch.setattr(engine.schedule, "_start", lambda name: engine.save(str(tmp_path / "half.pt")))
    with pytest.raises(mlo.CheckpointError, match=r"half-done step"):
        engine.train_step()
    assert not (tmp_path / "half.pt").exists()


@pytest.mark.slow
def test_inductor_steps_are_undone_too(monkeypatch):
    """inductor never writes into its inputs, so a failure after its compiled step ran is undone as well."""
    want = build("darts", "inductor")
    for _ in range(4):
        want.train_step()
    engine = build("darts", "inductor")
    engine.train_step()
    before = everything(engine)
    with monkeypatch.context() as mp:
        _arm(mp, Compiler, "run", KeyboardInterrupt, after=True, only=_variant_of("upper"))
        with pytest.raises(KeyboardInterrupt):
            engine.train_step()
    assert_same(everything(engine), before, "inductor")
    for _ in range(3):
        engine.train_step()
    assert_same(everything(engine)["engine"]["problems"], everything(want)["engine"]["problems"], "inductor")


# -- a save killed at random times (SIGKILL: no Python cleanup runs) --------------------------------
KILL_SCRIPT = """
import sys
import torch
from torch import nn
import mlocompile as mlo
from programs import Meta, Reweighted, mwn_data

torch.manual_seed(0)
net = nn.Sequential(nn.Linear(6, 2000), nn.ReLU(), nn.Linear(2000, 500), nn.ReLU(), nn.Linear(500, 3))
wnet = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
inner = Reweighted("inner", mlo.Config(), net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
                   train_data_loader=mwn_data(0))
outer = Meta("outer", mlo.Config(), wnet, torch.optim.Adam(wnet.parameters()), train_data_loader=mwn_data(1))
engine = mlo.Engine([outer, inner], mlo.EngineConfig(compile="eager", progress=False),
                    {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
engine.train_step()
engine.save(sys.argv[1])
print("saved", flush=True)
while True:  # saves back to back: a kill almost always lands inside one
    engine.save(sys.argv[1])
"""


def test_a_save_killed_at_random_times_leaves_the_previous_checkpoint_whole(tmp_path):
    """SIGKILL mid-save: the file is always a whole checkpoint; the next save removes the dead temp files."""
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])}
    path, rng, torn = tmp_path / "ckpt.pt", random.Random(1), 0
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_SCRIPT, str(path)], stdout=subprocess.PIPE, text=True, env=env
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "saved"
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            proc.kill()
            proc.wait(60)
        state = checkpoint.read(str(path))  # never a partial file
        assert state["global_step"] == 0 and set(state["problems"]) == {"inner", "outer"}
        torn += len(list(tmp_path.glob(".ckpt.pt.ckpt-*.tmp")))
    from programs import mwn_engine

    assert torn >= 1, "no kill landed inside a save"
    engine = mwn_engine()
    engine.save(str(path))  # a different engine's save to the same path cleans the dead temp files up
    assert not list(tmp_path.glob(".ckpt.pt.ckpt-*.tmp"))
    assert os.listdir(tmp_path) == ["ckpt.pt"]
