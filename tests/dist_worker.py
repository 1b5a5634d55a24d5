"""Worker script for tests/test_distributed.py, launched with torchrun (2 CPU processes, gloo)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import mlocompile as mlo  # noqa: E402
from programs import Chain, Meta, Reweighted  # noqa: E402


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def mwn(method="darts", unroll=1, **cfg):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    wnet = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
    inner = Reweighted(
        "inner",
        mlo.Config(type=method, unroll_steps=unroll),
        net,
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        train_data_loader=torch.utils.data.DataLoader(data(64, 0), batch_size=8),
    )
    outer = Meta(
        "outer",
        mlo.Config(),
        wnet,
        torch.optim.Adam(wnet.parameters(), lr=1e-2),
        train_data_loader=torch.utils.data.DataLoader(data(32, 1), batch_size=4),
    )
    config = mlo.EngineConfig(strategy="distributed", progress=False, dist_timeout_s=60, **cfg)
    return mlo.Engine([outer, inner], config, {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})


def chain3():
    torch.manual_seed(0)
    x, t = torch.randn(16, 3), torch.randn(16, 2)
    batches = [(x[i : i + 4], t[i : i + 4]) for i in range(0, 16, 4)]
    names = ["p0", "p1", "p2"]
    probs = []
    for i, name in enumerate(names):
        uses = tuple(n for n in (names[i - 1] if i else None, names[i + 1] if i < 2 else None) if n)
        cls = type(f"P{i}", (Chain,), {"uses": uses})
        mod = nn.Linear(3, 2)
        probs.append(
            cls(
                name,
                mlo.Config(type="neumann", neumann_iterations=2, neumann_alpha=0.1),
                mod,
                torch.optim.SGD(mod.parameters(), lr=0.05),
                train_data_loader=batches,
            )
        )
    deps = {"u2l": {probs[1]: [probs[0]], probs[2]: [probs[1]]}, "l2u": {probs[0]: [probs[1]], probs[1]: [probs[2]]}}
    return mlo.Engine(probs, mlo.EngineConfig(strategy="distributed", progress=False, dist_check_every=1), deps)


def params(engine):
    return {
        f"{n}.{k}": v.detach().clone()
        for n, p in engine.program.problems.items()
        for k, v in p.module.state_dict().items()
    }


def main() -> None:
    scenario, out = sys.argv[1], sys.argv[2]
    torch.set_default_dtype(torch.float64)
    rank = int(os.environ["RANK"])
    results = {}
    if scenario == "fail":
        engine = mwn()
        if rank == 1:  # a non-finite loss on one rank only
            engine.program.problems["inner"].optimizer.param_groups[0]["lr"] = float("nan")
        for _ in range(5):
            engine.train_step()
        return
    engine = mwn(dist_check_every=5)
    for _ in range(10):
        engine.train_step()
    results["mwn"] = params(engine)
    engine = chain3()
    for _ in range(4):
        engine.train_step()
    results["chain3"] = params(engine)
    engine = mwn("itd", unroll=2, dist_check_every=2)
    for _ in range(6):
        engine.train_step()
    results["itd"] = params(engine)
    results["itd_ir"] = mlo.compile(engine).ir if rank == 0 else ""
    straight = mwn(train_iters=8)
    straight.run()
    first = mwn(train_iters=4)
    first.run()
    first.save(os.path.join(out, "ckpt.pt"))
    resumed = mwn(train_iters=4)  # a new run() trains train_iters more steps: 4 + 4
    resumed.load(os.path.join(out, "ckpt.pt"))
    resumed.run()
    results["resume_straight"], results["resume"] = params(straight), params(resumed)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
