"""Side by side in one process: fx steps run by FX's own code vs by ``backends.direct_runner``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/direct_runner_ab.py mwn_darts_u1 --cycles 300

Builds the workload with ``compile="fx"``, warms up, then alternates cycles: one with
every traced step run by its GraphModule (``torch.ops.aten.X.Y(...)`` through
``OpOverload.__call__``), one with the direct-call runner the backend uses. Prints
the median ms per cycle of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload")
    p.add_argument("--cycles", type=int, default=300)
    args = p.parse_args(argv)

    from benchmarks.measure import _build, _import_for
    from benchmarks.workloads import WORKLOADS

    _import_for("fx")
    runner = _build(WORKLOADS[args.workload], "fx")
    runner.engine.config.check_finite = False  # long runs of the HPO workload may overflow; timing only
    for _ in range(5):
        runner.cycle()
    steps = list(runner.engine.compiler._traced.values())
    direct = {id(s): s.runner for s in steps}
    times: dict[str, list[float]] = {"GraphModule": [], "direct_runner": []}
    for _ in range(args.cycles):
        for label in times:
            for s in steps:
                s.runner = None if label == "GraphModule" else direct[id(s)]
            t = time.perf_counter()
            runner.cycle()
            times[label].append(time.perf_counter() - t)
    a, b = (statistics.median(v) * 1e3 for v in times.values())
    print(f"{args.workload}: GraphModule {a:.3f} ms/cycle, direct_runner {b:.3f} ms/cycle, ratio {b / a:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
