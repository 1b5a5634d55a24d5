"""Profile cycles of one workload × implementation: where does the time go?

Usage (from the repository root)::

    .venv/bin/python benchmarks/profile_cycle.py mwn_darts_u1 fx
    .venv/bin/python benchmarks/profile_cycle.py mwn_darts_u1 inductor --cycles 50 --python

Warms up (tracing/compilation excluded), then runs ``--cycles`` cycles under
``torch.profiler`` and prints the operators by self CPU time; ``--python`` adds a
cProfile of the same cycles (Python-side overhead: schedule, input gathering,
pytree flattening). Also prints the wall time per cycle without any profiler.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload")
    p.add_argument("impl", choices=("eager", "fx", "inductor", "betty", "torchfunc"))
    p.add_argument("--cycles", type=int, default=30)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--threads", type=int)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--python", action="store_true", help="also print a cProfile of the cycles")
    args = p.parse_args(argv)

    import torch

    from benchmarks.measure import _build, _import_for
    from benchmarks.workloads import WORKLOADS, quick

    if args.threads:
        torch.set_num_threads(args.threads)
    w = WORKLOADS[args.workload]
    w = quick(w) if args.quick else w
    _import_for(args.impl)
    runner = _build(w, args.impl)
    for _ in range(max(w.warmup, 3)):
        runner.cycle()
    t = time.perf_counter()
    for _ in range(args.cycles):
        runner.cycle()
    wall = (time.perf_counter() - t) / args.cycles * 1e3
    print(f"{args.workload} / {args.impl}: {wall:.2f} ms/cycle unprofiled ({torch.get_num_threads()} threads)")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.cycles):
            runner.cycle()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.python:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.cycles):
            runner.cycle()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(args.rows)
        print(s.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
