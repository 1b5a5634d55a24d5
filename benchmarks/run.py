"""Run the benchmarks: every workload × implementation, each measurement in a fresh process.

Usage (from the repository root)::

    .venv/bin/python benchmarks/run.py                      # everything (10-25 min on 2 cores)
    .venv/bin/python benchmarks/run.py --quick              # smoke test at tiny sizes
    .venv/bin/python benchmarks/run.py --workloads mwn_darts_u1 hpo_d20 --impls fx betty
    .venv/bin/python benchmarks/run.py --list

Prints a markdown table and writes the raw and aggregated numbers as JSON
(``--out``, default ``benchmarks/results.json``). See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.workloads import IMPLS, WORKLOADS  # noqa: E402

QUICK_WORKLOADS = ("mwn_darts_u1", "maml_itd_k5")
QUICK_IMPLS = ("eager", "fx", "betty", "torchfunc")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few cycles: a smoke test (< 60 s)")
    p.add_argument("--workloads", nargs="+", metavar="W", help=f"default: all (quick: {' '.join(QUICK_WORKLOADS)})")
    p.add_argument("--impls", nargs="+", metavar="I", choices=IMPLS, help=f"default: {' '.join(IMPLS)}")
    p.add_argument("--rounds", type=int, help="round-robin rounds over the implementations (default 2, quick 1)")
    p.add_argument("--cycles", type=int, help="timed cycles per measurement (default: per workload, >= 20)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in every process (default: torch's)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per measuring process")
    p.add_argument(
        "--max-foreign",
        type=float,
        default=0.10,
        help="repeat a measurement when other processes used more than this fraction of the CPUs while it was timed",
    )
    p.add_argument("--retries", type=int, help="repeats of a disturbed measurement (default 3, quick 0)")
    p.add_argument("--retry-wait", type=float, default=20.0, help="seconds to wait before a repeat")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"), help="JSON output path")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    p.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    p.add_argument("--child-out", metavar="PATH", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Measure one (workload, implementation) in a fresh interpreter; return its record."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "record.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec), "--child-out", out_path]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {**spec, "error": f"timed out after {timeout:.0f} s", "stage": "timeout"}
        wall = time.perf_counter() - t
        if not os.path.exists(out_path):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {**spec, "error": f"process exited {proc.returncode}: {' | '.join(tail)}", "stage": "process"}
        with open(out_path) as f:
            record: dict[str, Any] = json.load(f)
    record["process_s"] = wall
    return record


def measure_quietly(spec: dict[str, Any], args: argparse.Namespace, retries: int) -> list[dict[str, Any]]:
    """Measure ``spec``; repeat (up to ``retries`` times) while other processes disturbed it.

    Every attempt is kept; the least disturbed one is marked ``accepted`` and is the one
    the summary uses.
    """
    attempts: list[dict[str, Any]] = []
    for attempt in range(retries + 1):
        rec = run_child(spec, args.timeout)
        rec["attempt"] = attempt
        attempts.append(rec)
        print(report.progress_line(rec), file=sys.stderr)
        if "error" in rec or rec.get("foreign_cpu", 0.0) <= args.max_foreign or attempt == retries:
            break
        print(
            f"  other processes used {rec['foreign_cpu']:.0%} of the CPUs while this was timed; "
            f"repeating in {args.retry_wait:.0f} s",
            file=sys.stderr,
        )
        time.sleep(args.retry_wait)
    best = min(attempts, key=lambda r: r.get("foreign_cpu", 0.0))
    for rec in attempts:
        rec["accepted"] = rec is best
    return attempts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        from benchmarks.measure import child_main

        return child_main(args.child, args.child_out)
    if args.list:
        for w in WORKLOADS.values():
            print(f"{w.name:22s} {w.kind:6s} {w.method:8s} unroll={w.unroll:<3d} impls={','.join(w.impls)}")
        return 0
    names = args.workloads or (list(QUICK_WORKLOADS) if args.quick else list(WORKLOADS))
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        print(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}", file=sys.stderr)
        return 2
    impls = args.impls or list(QUICK_IMPLS if args.quick else IMPLS)
    rounds = args.rounds or (1 if args.quick else 2)
    retries = args.retries if args.retries is not None else (0 if args.quick else 3)

    import torch

    from benchmarks.measure import matmul_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    machine: dict[str, Any] = {
        "loadavg_start": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "matmul": matmul_flops(seconds=0.5 if args.quick else 3.0),
    }
    print(
        f"matmul fp32 1024^3: {machine['matmul']['best_flops'] / 1e9:.1f} GFLOP/s best, "
        f"{machine['matmul']['median_flops'] / 1e9:.1f} median ({machine['matmul']['threads']} threads); "
        f"load average {machine['loadavg_start'][0]:.2f}",
        file=sys.stderr,
    )
    records: list[dict[str, Any]] = []
    for name in names:
        todo = [i for i in impls if i in WORKLOADS[name].impls]
        for r in range(min(rounds, WORKLOADS[name].max_rounds or rounds)):
            # NOTE: rotate the order each round so no implementation always runs first (warm caches, drift)
            order = todo[r % len(todo) :] + todo[: r % len(todo)] if todo else []
            for impl in order:
                spec = {"workload": name, "impl": impl, "round": r, "quick": args.quick}
                spec.update({k: v for k, v in (("cycles", args.cycles), ("threads", args.threads)) if v})
                records.extend(measure_quietly(spec, args, retries))
    machine["loadavg_end"] = os.getloadavg()
    if not args.quick:
        machine["matmul_end"] = matmul_flops(seconds=3.0)
    machine["max_foreign"] = args.max_foreign
    result = report.aggregate(records, machine, WORKLOADS, quick=args.quick)
    result["settings"] = {
        "quick": args.quick,
        "rounds": rounds,
        "impls": impls,
        "workloads": names,
        "cycles": args.cycles,
        "threads": args.threads,
        "retries": retries,
        "wall_s": time.perf_counter() - t_start,
        "command": " ".join([Path(sys.executable).name, "benchmarks/run.py", *(argv or sys.argv[1:])]),
    }
    table = report.markdown(result)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
