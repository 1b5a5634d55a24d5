"""The training loop: schedule, write-back, validation, early stopping, logs, checkpoints."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlocompile as mlo
from mlocompile import checkpoint
from programs import Meta, Reweighted, mwn_engine


class DropoutReweighted(Reweighted):
    """Adds dropout so that RNG state matters for exact resume."""

    def training_step(self, batch):
        x, t = batch
        per = F.cross_entropy(self.module(F.dropout(x, 0.2)), t, reduction="none").reshape(-1, 1)
        return (torch.sigmoid(self.outer(per.detach())) * per).mean()


def resumable_engine(method: str = "darts", roll_back: bool = False, output_dir=None):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, t), batch_size=16, shuffle=True)
    meta = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:32], t[:32]), batch_size=8, shuffle=True)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    wnet = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    inner = DropoutReweighted("inner", mlo.Config(type=method, unroll_steps=2), net, opt, sched, loader)
    outer = Meta("outer", mlo.Config(), wnet, torch.optim.Adam(wnet.parameters(), lr=1e-2), train_data_loader=meta)
    cfg = mlo.EngineConfig(train_iters=11, roll_back=roll_back, progress=False, output_dir=output_dir)
    return mlo.Engine([outer, inner], cfg, {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})


def _state(engine):
    out = {}
    for name, p in engine.program.problems.items():
        for k, v in p.module.state_dict().items():
            out[f"{name}.{k}"] = v.clone()
        for i, st in p.optimizer.state_dict()["state"].items():
            for k, v in st.items():
                out[f"{name}.opt.{i}.{k}"] = torch.as_tensor(v).clone()
    return out


@pytest.mark.parametrize("method,roll_back", [("darts", False), ("darts", True), ("itd", False)])
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, method, roll_back):
    straight = resumable_engine(method, roll_back)
    straight.run()
    first = resumable_engine(method, roll_back)
    first.config.train_iters = 5  # stop mid unroll window (unroll_steps=2)
    first.run()
    path = first.save(str(tmp_path / "ckpt.pt"))
    torch.manual_seed(1234)  # a different process state must not matter
    resumed = resumable_engine(method, roll_back)
    resumed.load(path)
    assert resumed.global_step == 5
    resumed.config.train_iters = straight.global_step - 5  # a new run: train_iters more steps (Betty)
    resumed.run()
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (
        straight.program.problems["inner"].scheduler.get_last_lr()
        == resumed.program.problems["inner"].scheduler.get_last_lr()
    )


def test_a_second_run_trains_train_iters_more_steps_as_betty_does():
    once = resumable_engine()
    once.config.train_iters = 6
    once.run()
    twice = resumable_engine()
    twice.config.train_iters = 3
    twice.run()
    twice.run()
    assert twice.global_step == once.global_step == 6
    a, b = _state(once), _state(twice)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_cut_short_goes_on_to_its_end(monkeypatch):
    """An interrupted run() (or one saved mid-way and loaded) continues that run, not a new one."""
    engine = resumable_engine()
    engine.config.train_iters = 6
    real, calls = engine.train_step, []

    def interrupted():
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        real()

    monkeypatch.setattr(engine, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    assert engine.global_step == 3
    engine.run()
    assert engine.global_step == 6


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    engine = resumable_engine()
    engine.config.train_iters = 2
    engine.run()
    path = str(tmp_path / "ckpt.pt")
    engine.save(path)
    good = open(path, "rb").read()

    def dies_midway(obj, fh):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(checkpoint.torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        engine.save(path)
    assert open(path, "rb").read() == good
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind


def test_load_rejects_a_different_program(tmp_path):
    engine = mwn_engine()
    path = engine.save(str(tmp_path / "a.pt"))
    other = resumable_engine()
    other.program.problems["inner"].module = nn.Linear(6, 3)
    with pytest.raises(checkpoint.CheckpointError, match="module does not match"):
        other.load(path)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        other.load(str(tmp_path / "missing.pt"))


def test_user_objects_hold_the_trained_state():
    engine = mwn_engine()
    inner = engine.program.problems["inner"]
    before = [p.detach().clone() for p in inner.module.parameters()]
    for _ in range(3):
        engine.train_step()
    assert all(not torch.equal(b, p) for b, p in zip(before, inner.module.parameters()))
    assert all("momentum_buffer" in inner.optimizer.state[p] for p in inner.module.parameters())
    outer = engine.program.problems["outer"]
    assert all(int(outer.optimizer.state[p]["step"]) == 3 for p in outer.module.parameters())
    # an eager torch.optim step continues from the written-back state
    inner.optimizer.zero_grad()
    assert torch.isfinite(sum(p.sum() for p in inner.module.parameters()))


class Validated(mlo.Engine):
    scores = [3.0, 2.0, 2.5, 2.4, 2.6, 2.7, 1.0]

    def validation(self):
        return {"loss": self.scores[len([h for h in self.history if h["tag"] == "validation"])]}


def test_validation_and_early_stopping(tmp_path):
    base = mwn_engine()
    cfg = mlo.EngineConfig(
        train_iters=100,
        valid_step=2,
        early_stopping=True,
        early_stopping_tolerance=3,
        progress=False,
        output_dir=str(tmp_path),
    )
    engine = Validated(list(base.program.problems.values()), cfg, base.dependencies)
    engine.run()
    vals = [h for h in engine.history if h["tag"] == "validation"]
    # best 2.0 at the 2nd validation; 3 non-improving ones later it stops (1.0 never reached)
    assert [v["loss"] for v in vals] == [3.0, 2.0, 2.5, 2.4, 2.6]
    assert engine.global_step == 10
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert {r["tag"] for r in records} >= {"validation", "inner", "outer"}
    assert open(tmp_path / "metrics.csv").readline().strip() == "step,tag,key,value"


def test_non_finite_loss_is_reported_with_problem_and_step():
    engine = mwn_engine()
    inner = engine.program.problems["inner"]
    inner.optimizer.param_groups[0]["lr"] = 1e30
    with pytest.raises(mlo.NonFiniteError, match=r"problem '(inner|outer)' at global step"):
        for _ in range(5):
            engine.train_step()


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_terminals():
    from mlocompile.monitor import ProgressBar

    tty, pipe = FakeTTY(), io.StringIO()
    for stream in (tty, pipe):
        bar = ProgressBar(10, True, stream)
        bar.update(10, {"inner": 0.5, "outer": 1.25}, force=True)
        bar.close()
    assert "10/10" in tty.getvalue() and "inner 0.5" in tty.getvalue() and "outer 1.25" in tty.getvalue()
    assert pipe.getvalue() == ""
    bar = ProgressBar(10, True, tty)
    bar.update(3, {"inner": 0.5}, force=True)
    bar.clear()
    assert tty.getvalue().endswith("\r")  # the next print starts at column 0 of an erased line
    off = FakeTTY()
    ProgressBar(10, False, off).update(5, {}, force=True)
    assert off.getvalue() == ""
