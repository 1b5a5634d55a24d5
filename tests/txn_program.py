"""A program with every kind of state a step changes, for the transaction tests.

BatchNorm running statistics (buffers), dropout (the random stream), SGD momentum and
Adam moments, two LR schedulers, shuffled DataLoaders that wrap around within a few
steps (data positions, the random stream at each epoch), an unroll window of 2 (itd
replays it) and a validation that draws from the random stream. ``python
tests/txn_program.py CHILD_ARGS`` is the subprocess of the SIGINT test.
"""

from __future__ import annotations

import json
import random
import signal
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mlocompile as mlo


class Lower(mlo.ImplicitProblem):
    def training_step(self, batch):
        x, t = batch
        per = F.cross_entropy(self.module(x), t, reduction="none").reshape(-1, 1)
        return (torch.sigmoid(self.upper(per.detach())) * per).mean()


class Upper(mlo.ImplicitProblem):
    def training_step(self, batch):
        x, t = batch
        return F.cross_entropy(self.lower(x), t)


class Run(mlo.Engine):
    def validation(self):
        x, t = next(iter(self.valid_loader))  # NOTE: iter() of a DataLoader draws from the random stream
        with torch.no_grad():
            loss = F.cross_entropy(self.lower.module(x), t)
        return {"loss": loss + random.random() * 1e-3}


def _loader(seed: int, n: int, batch: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(data, batch_size=batch, shuffle=True)


def build(method: str = "darts", backend: str = "fx", **engine_kw) -> Run:
    """The program, seeded: the same call builds the same engine."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))
    wnet = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    lower = Lower(
        "lower",
        mlo.Config(type=method, unroll_steps=2),
        net,
        opt,
        torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.9),
        train_data_loader=_loader(1, 40, 8),
    )
    wopt = torch.optim.Adam(wnet.parameters(), lr=1e-2)
    upper = Upper(
        "upper",
        mlo.Config(),
        wnet,
        wopt,
        torch.optim.lr_scheduler.LambdaLR(wopt, lambda k: 1.0 / (1 + 0.1 * k)),
        train_data_loader=_loader(2, 24, 8),
    )
    settings = {"compile": backend, "progress": False, "log_every": 1, "valid_step": 5, **engine_kw}
    engine = Run([upper, lower], mlo.EngineConfig(**settings), {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})
    engine.valid_loader = _loader(3, 16, 8)
    return engine


def _child(method: str, backend: str, iters: int, prefix: str) -> None:
    """Train, saving a checkpoint at every Ctrl-C and going on; the parent interrupts at random times.

    A Ctrl-C interrupts ``engine.run()`` only: one that lands while a checkpoint is written
    or between two runs is held and interrupts the next run before its first step (so
    it checkpoints the same step again) instead of killing the process.
    """
    engine = build(method, backend, train_iters=iters)
    engine.compile()  # traces every step first (it consumes no data and no random numbers)
    state = {"running": False, "pending": False}

    def on_sigint(signum: int, frame: object) -> None:
        if not state["running"]:
            state["pending"] = True
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    print("ready", flush=True)
    saved = 0
    # NOTE: the loop tests the step, not a flag: a Ctrl-C that lands after run() returned but
    # before the loop could tell must not start another run
    while engine.global_step < iters:
        try:
            state["running"] = True
            if state["pending"]:
                state["pending"] = False
                raise KeyboardInterrupt
            engine.run()
        except KeyboardInterrupt:
            state["running"] = False
            engine.save(f"{prefix}{saved}.pt")
            saved += 1
            print(json.dumps({"saved": saved - 1, "step": engine.global_step}), flush=True)
        finally:
            state["running"] = False
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C sent as the run ended must not kill the exit
    engine.save(f"{prefix}final.pt")
    print("done", flush=True)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
