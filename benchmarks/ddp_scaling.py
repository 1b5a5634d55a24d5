"""Meta-Weight-Net step time with 1 vs 2 data-parallel processes (torchrun, gloo, CPU).

    python benchmarks/ddp_scaling.py [--steps 30] [--nprocs 1 2]

The global batch is fixed (128 inner / 128 meta samples per step); with N processes
each rank gets 128/N. Prints median ms per train_step (one inner + one outer step).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time


def worker(steps: int, out: str) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    import mlocompile as mlo

    class Inner(mlo.ImplicitProblem):
        def training_step(self, batch):
            x, y = batch
            per = F.cross_entropy(self.module(x), y, reduction="none").reshape(-1, 1)
            return (torch.sigmoid(self.outer(per.detach())) * per).mean()

    class Outer(mlo.ImplicitProblem):
        def training_step(self, batch):
            x, y = batch
            return F.cross_entropy(self.inner(x), y)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(128 * 8, 784), torch.randint(0, 10, (128 * 8,)))
    net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    wnet = nn.Sequential(nn.Linear(1, 100), nn.ReLU(), nn.Linear(100, 1))
    inner = Inner(
        "inner",
        mlo.Config(),
        net,
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        train_data_loader=torch.utils.data.DataLoader(data, batch_size=128, shuffle=True),
    )
    outer = Outer(
        "outer",
        mlo.Config(),
        wnet,
        torch.optim.Adam(wnet.parameters(), 1e-3),
        train_data_loader=torch.utils.data.DataLoader(data, batch_size=128, shuffle=True),
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = mlo.EngineConfig(strategy="distributed" if world > 1 else "default", progress=False)
    engine = mlo.Engine([outer, inner], cfg, {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    for _ in range(5):
        engine.train_step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.train_step()
        times.append(time.perf_counter() - start)
    if engine.rank == 0:
        with open(out, "w") as fh:
            json.dump(
                {"world_size": world, "median_ms": 1e3 * statistics.median(times), "threads": torch.get_num_threads()},
                fh,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.worker)
        return
    rows = []
    for n in args.nprocs:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = f"/tmp/ddp_scaling_{n}.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(n),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            __file__,
            "--steps",
            str(args.steps),
            "--worker",
            out,
        ]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // n))})
        with open(out) as fh:
            rows.append(json.load(fh))
    base = rows[0]["median_ms"]
    print("| processes | threads/process | median ms per train_step | speed-up |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['world_size']} | {r['threads']} | {r['median_ms']:.2f} | {base / r['median_ms']:.2f}x |")
    print(f"load average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
