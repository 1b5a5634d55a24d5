"""The checkpoint pass on MAML (itd, K = 20 adaptation steps): peak memory and time.

    python benchmarks/checkpoint_peak.py [--steps 20] [--budget 0.5] [--repeats 30]

Builds examples/maml.py with K adaptation steps and runs one meta-step, four ways: no
checkpointing; the liveness pass (``rematerialize``) alone; the itd replay cut into
⌈√K⌉ segments alone (``Config(itd_segments=...)``); and ``EngineConfig(memory_budget=b)``,
which cuts the replay into ⌈1/b⌉ + 1 segments (the liveness pass skips segmented graphs). For each meta-step graph: the estimated peak (liveness walk over the
IR, inputs included), the measured peak of tensors the step allocates (a dispatch mode
counting live storages; inputs excluded), median time per call, and the largest
relative difference of its outputs from the uncheckpointed graph's.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from mlocompile.analysis import estimate_peak_memory  # noqa: E402
from mlocompile.step import StepVariant  # noqa: E402
from mlocompile.trace import flatten_inputs  # noqa: E402
from passes.rematerialize import measure_peak_memory, rematerialize  # noqa: E402
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


def _meta_step(maml, steps: int, budget: float | None, segments: int, with_pass: bool):
    """Build MAML, run one meta-step, return the meta problem's step graph and its inputs."""
    engine = maml.build(iters=1, steps=steps, meta_batch=1)
    engine.adapt.config.itd_segments = segments
    engine.config.memory_budget = budget
    for _ in range(steps):
        engine.train_step()
    inputs = engine.step_inputs("meta", engine.peek_batch("meta"))
    gm = engine.compiler.traced(StepVariant("meta"), inputs, engine.compile_options()).gm
    flat = flatten_inputs(inputs).tensors
    if with_pass and budget is None:  # the liveness pass alone, on the unsegmented graph
        gm = rematerialize(copy.deepcopy(gm), memory_budget=0.5)
    return gm, flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    maml = load_example("maml")
    auto = math.ceil(math.sqrt(args.steps))
    configs = [
        ("no checkpointing", None, 1, False),
        ("liveness pass only (budget 0.5, itd_segments=1)", None, 1, True),
        (f"segments only (itd_segments={auto}, no pass)", None, auto, False),
        (
            f"memory_budget={args.budget} (⌈1/b⌉ + 1 = {math.ceil(1 / args.budget) + 1} segments)",
            args.budget,
            0,
            False,
        ),
    ]
    rows = []
    ref = None
    for label, budget, segments, with_pass in configs:
        gm, flat = _meta_step(maml, args.steps, budget, segments, with_pass)
        outs = gm(*flat)
        if ref is None:
            ref = outs
        diff = max(
            float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
            for a, b in zip(outs, ref)
            if a.is_floating_point() and a.numel()
        )
        est = estimate_peak_memory(gm)[0]
        meas = measure_peak_memory(gm, *flat)
        rows.append([label, len(gm.graph.nodes), est, meas, (gm, flat), diff])
    # time the graphs round-robin (5 rounds), so drift hits all alike; best median per graph
    best = [_median_ms(*row[4], args.repeats) for row in rows]
    for _ in range(4):
        best = [min(b, _median_ms(*row[4], args.repeats)) for b, row in zip(best, rows)]
    for row, ms in zip(rows, best):
        row[4] = ms
    base = rows[0]
    print(f"MAML itd, K = {args.steps}: the meta-step graph, {torch.get_num_threads()} threads")
    print(
        "| graph | nodes | estimated peak KiB (with inputs) | measured peak KiB (step-allocated) | measured × "
        "| median ms | time × | max rel. diff of outputs |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, nodes, est, meas, ms, diff in rows:
        print(
            f"| {label} | {nodes} | {est / 1024:.1f} | {meas / 1024:.1f} | {meas / base[3]:.2f} | {ms:.2f} "
            f"| {ms / base[4]:.2f} | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
