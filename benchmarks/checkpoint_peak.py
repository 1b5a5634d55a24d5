"""The checkpoint pass on MAML (itd, K = 20 adaptation steps): peak memory and time.

    python benchmarks/checkpoint_peak.py [--steps 20] [--budget 0.5] [--repeats 30]

Builds examples/maml.py with K adaptation steps, runs one meta-step so the meta problem's
step graph exists, then compares that graph with and without ``insert_checkpoints``:
the estimated peak (liveness walk over the IR, inputs included), the measured peak of
tensors the step allocates (a dispatch mode counting live storages; inputs excluded),
median time per call, and whether the outputs are bitwise identical.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from mlocompile.cost import estimate_peak_memory  # noqa: E402
from mlocompile.step import StepVariant  # noqa: E402
from mlocompile.trace import flatten_inputs  # noqa: E402
from passes.checkpoint import insert_checkpoints, measure_peak_memory  # noqa: E402
from programs import load_example  # noqa: E402


def _median_ms(fn, args, repeats: int) -> float:
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    maml = load_example("maml")
    engine = maml.build(iters=1, steps=args.steps, meta_batch=1)
    for _ in range(args.steps):
        engine.train_step()
    inputs = engine.step_inputs("meta", engine.peek_batch("meta"))
    gm = engine.executor.traced(StepVariant("meta"), inputs).gm
    flat = flatten_inputs(inputs).tensors
    remat = insert_checkpoints(copy.deepcopy(gm), memory_budget=args.budget)
    same = all(torch.equal(a, b) for a, b in zip(gm(*flat), remat(*flat)))
    rows = []
    for label, g in (("no checkpointing", gm), (f"memory_budget={args.budget}", remat)):
        rows.append((label, len(g.graph.nodes), estimate_peak_memory(g)[0], measure_peak_memory(g, *flat), _median_ms(g, flat, args.repeats)))
    base = rows[0]
    print(f"MAML itd, K = {args.steps}: the meta-step graph, {torch.get_num_threads()} threads")
    print("| graph | nodes | estimated peak KiB (with inputs) | measured peak KiB (step-allocated) | measured × | median ms | time × |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, nodes, est, meas, ms in rows:
        print(f"| {label} | {nodes} | {est / 1024:.1f} | {meas / 1024:.1f} | {meas / base[3]:.2f} | {ms:.2f} | {ms / base[4]:.2f} |")
    print(f"outputs bitwise identical: {same}")


if __name__ == "__main__":
    main()
