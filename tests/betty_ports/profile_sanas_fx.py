"""SANAS fx time to first step, split into phases: ``python tests/betty_ports/profile_sanas_fx.py [layers] [prof]``.

Wraps (monkeypatches, in this process only) trace_step, find_parameter_uses, the checks,
slim_meta and direct_runner with timers and prints the pass report; with ``prof`` it also
writes a cProfile of engine build + first train_step to /tmp/prof_fx.txt and .pstats.
"""

from __future__ import annotations

import collections
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlocompile  # noqa: E402
import mlocompile.compiler as compiler  # noqa: E402
import mlocompile.dependencies as dependencies  # noqa: E402
import mlocompile.trace as trace  # noqa: E402
import passes  # noqa: E402
from tests.betty_ports import sanas  # noqa: E402

TIMES: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)


def timed(module: Any, name: str, info: Any = None) -> None:
    f = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            TIMES[name].append((time.perf_counter() - start, info(*args, **kwargs) if info else ""))

    setattr(module, name, wrapper)


def main() -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    timed(compiler, "trace_step", info=lambda fn, flat, title, *a, **k: title)
    timed(compiler, "direct_runner", info=lambda gm, title: f"{title} nodes={len(gm.graph.nodes)}")
    timed(dependencies, "find_parameter_uses")
    timed(passes, "run_check", info=lambda gm, name, title, *a, **k: f"{title}:{name}")
    timed(trace, "slim_meta")
    layers = int(sys.argv[1]) if sys.argv[1:2] not in ([], [""]) else None
    prof = cProfile.Profile() if sys.argv[2:3] == ["prof"] else None
    lib = SimpleNamespace(
        Engine=mlocompile.Engine,
        Config=mlocompile.Config,
        EngineConfig=mlocompile.EngineConfig,
        ImplicitProblem=mlocompile.ImplicitProblem,
        engine_kwargs={"compile": "fx", "progress": False},
    )
    data = sanas.make_data(train_iters=20, layers=layers)
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    engine = sanas.build(lib, data, "func_buffers")
    t1 = time.perf_counter()
    engine.train_step()
    t2 = time.perf_counter()
    if prof:
        prof.disable()
    print(f"build {t1 - t0:.2f}s first train_step {t2 - t1:.2f}s total {t2 - t0:.2f}s", flush=True)
    for name, calls in TIMES.items():
        each = "; ".join(f"{i}:{d:.2f}" for d, i in calls[:12])
        print(f"{name:24s} calls={len(calls):3d} total={sum(d for d, _ in calls):8.2f}s  {each}")
    print("passes (graph, pass, seconds, nodes before -> after):")
    for r in engine.compiler.report.records:
        print(f"  {r.graph:28s} {r.name:34s} {r.seconds:8.2f}s {r.nodes_before:7d} -> {r.nodes_after:7d}")
    t3 = time.perf_counter()
    engine.train_step()
    print(f"second train_step {time.perf_counter() - t3:.2f}s")
    if prof:
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("cumulative").print_stats(70)
        stats.sort_stats("tottime").print_stats(40)
        Path("/tmp/prof_fx.txt").write_text(out.getvalue())
        prof.dump_stats("/tmp/prof_fx.pstats")


if __name__ == "__main__":
    main()
