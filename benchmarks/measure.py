"""What one measuring subprocess does: set up, warm up, count FLOPs, time cycles, read RSS.

Memory is the process's resident set (Linux ``/proc/self/status``), because torch's
CPU allocator is invisible to tracemalloc:

- ``rss_setup``: after imports and set-up (modules, data, optimizers, engine), after
  ``gc.collect()`` and ``malloc_trim(0)``: the baseline;
- the peak (``VmHWM``) is reset (``/proc/self/clear_refs`` ← 5) after warm-up, so the
  one-off tracing/compilation peak is excluded, then read after the timed cycles;
- ``peak_mb = VmHWM_timed − rss_setup``: what the cycles need on top of the set-up
  (optimizer state, gradients, caches and compiled code that persist, plus the
  transient peak of one cycle); ``transient_mb = VmHWM_timed − rss_warm`` is the
  transient part alone; ``peak_abs_mb = VmHWM_timed − rss_imports`` adds the
  parameters and data (for the comparison with the theoretical minimum).

Other processes' CPU use during the timed cycles (``foreign_cpu``, a fraction of the
machine's capacity, from ``/proc/stat`` minus this process's own ticks) is recorded so the
parent can discard and repeat measurements that shared the CPU.

Where ``clear_refs`` cannot be written, ``ru_maxrss`` (``getrusage``, a whole-process
peak that then includes warm-up and compilation) is used and ``hwm_reset`` is false.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import statistics
import time
import traceback
from typing import Any

MB = 1024 * 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_bytes() -> int:
    """Current resident set size."""
    return _status_kb("VmRSS") * 1024


def settle() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so RSS means live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes(hwm_reset: bool) -> int:
    """Peak RSS since the last reset (or over the whole process, if it could not be reset)."""
    if hwm_reset:
        return _status_kb("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_ticks() -> tuple[int, int, int]:
    """Return (busy ticks of all CPUs, all ticks of all CPUs, this process's ticks, all threads)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already in user)
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return busy, busy + v[3] + v[4], int(fields[11]) + int(fields[12])  # utime, stime


def foreign_cpu(before: tuple[int, int, int], after: tuple[int, int, int]) -> float:
    """Fraction of the machine's CPU capacity used by *other* processes between two readings."""
    busy, total, own = (a - b for a, b in zip(after, before))
    return max(0.0, (busy - own) / total) if total > 0 else 0.0


def matmul_flops(n: int = 1024, reps: int = 10, seconds: float = 3.0) -> dict[str, float]:
    """Measure this machine's fp32 matmul rate: ``n×n @ n×n``, ``reps`` per sample."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=c)
    rates: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(rates) < 5:
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=c)
        rates.append(2 * n**3 * reps / (time.perf_counter() - t))
    return {
        "n": n,
        "samples": len(rates),
        "best_flops": max(rates),
        "median_flops": statistics.median(rates),
        "threads": torch.get_num_threads(),
    }


def _import_for(impl: str) -> None:
    # NOTE: libraries are imported before the baseline so their code is not counted as memory
    if impl == "betty":
        import betty.engine  # noqa: F401
    elif impl in ("eager", "fx", "fx_inplace", "inductor"):
        import mlocompile  # noqa: F401
    if impl == "inductor":
        import torch._inductor.compile_fx  # noqa: F401


def _build(workload: Any, impl: str) -> Any:
    if impl == "torchfunc":
        from benchmarks import torchfunc

        return torchfunc.build(workload)
    from benchmarks.engines import EngineRunner

    return EngineRunner(workload, impl)


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: count everything under "Global".

    The real tracker's backward hooks raise inside ``torch.autograd.grad`` when a
    module returns a leaf (``HyperParam``), and per-module counts are not needed here.
    """

    parents = ("Global",)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: Any) -> None:
        return None


def count_flops(runner: Any) -> int:
    """Matmul-class FLOPs of one cycle (``FlopCounterMode``); runs the cycle for real."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()  # type: ignore[assignment]
    with counter:
        runner.cycle()
    return int(counter.get_total_flops())


def live_tensor_peak(runner: Any) -> int:
    """Peak bytes of tensor storages one cycle allocates and holds at once (runs the cycle).

    Counted at the dispatcher (``passes.rematerialize.measure_peak_memory``): every tensor
    an op returns, storages once, released when collected; tensors that existed before
    the cycle (parameters, optimizer state, data) are kept alive and not counted, so an
    in-place update costs nothing and a functional one costs its new tensors. Unlike RSS,
    this does not depend on how the allocator reuses or returns memory.
    """
    import torch

    from passes.rematerialize import measure_peak_memory

    gc.collect()
    before = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.device.type != "meta"]
    keep = []
    for t in before:
        try:
            keep.append(t.untyped_storage())
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
            continue
    exclude = frozenset(s.data_ptr() for s in keep)
    peak = measure_peak_memory(runner.cycle, exclude=exclude)
    del keep, before
    return peak


def _failure(exc: BaseException, stage: str) -> dict[str, Any]:
    """Describe a crash: message, the frame that raised it, and the full traceback."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    where = f"{'/'.join(frame.filename.split('/')[-3:])}:{frame.lineno} in {frame.name}"
    return {
        "error": f"{type(exc).__name__}: {exc} (at {where}, during {stage})",
        "stage": stage,
        "traceback": traceback.format_exc(),
    }


def measure(workload: Any, impl: str, threads: int | None) -> dict[str, Any]:
    """Set up ``workload`` with ``impl`` in this process and measure it; return the record."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    out: dict[str, Any] = {"workload": workload.name, "impl": impl, "threads": torch.get_num_threads()}
    out["loadavg_start"] = os.getloadavg()
    _import_for(impl)
    import passes.rematerialize  # noqa: F401 - live_tensor_peak's tracker: loaded before the baselines, for every impl

    settle()
    rss_imports = rss_bytes()
    t = time.perf_counter()
    try:
        runner = _build(workload, impl)
    except Exception as exc:  # noqa: BLE001 - a crashing implementation is a result
        return {**out, **_failure(exc, "set-up")}
    out["setup_s"] = time.perf_counter() - t
    settle()
    rss_setup = rss_bytes()
    stage = "warm-up"
    try:
        t = time.perf_counter()
        runner.cycle()  # traces / compiles: excluded from timing
        out["first_cycle_s"] = time.perf_counter() - t
        for _ in range(workload.warmup - 1):
            runner.cycle()
        if impl != "inductor":  # compiled code runs no aten ops to count
            stage = "flop count"
            out["flops_per_cycle"] = count_flops(runner)
            stage = "live tensor peak"
            out["live_peak_mb"] = live_tensor_peak(runner) / MB
            runner.cycle()
        settle()
        rss_warm = rss_bytes()
        hwm_reset = reset_peak()
        stage = "timing"
        ticks = cpu_ticks()
        times: list[float] = []
        while len(times) < workload.min_cycles or (
            sum(times) < workload.min_seconds and len(times) < workload.max_cycles
        ):
            t = time.perf_counter()
            runner.cycle()
            times.append(time.perf_counter() - t)
        peak = peak_bytes(hwm_reset)
        out["foreign_cpu"] = foreign_cpu(ticks, cpu_ticks())
    except Exception as exc:  # noqa: BLE001
        return {**out, **_failure(exc, stage)}
    out.update(
        times_ms=[x * 1e3 for x in times],
        hwm_reset=hwm_reset,
        rss_imports_mb=rss_imports / MB,
        rss_setup_mb=rss_setup / MB,
        rss_warm_mb=rss_warm / MB,
        peak_mb=(peak - rss_setup) / MB,
        transient_mb=(peak - rss_warm) / MB,
        peak_abs_mb=(peak - rss_imports) / MB,
        maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        loadavg_end=os.getloadavg(),
    )
    return out


def child_main(spec_json: str, out_path: str) -> int:
    """Entry point of a measuring subprocess: read the spec, measure, write one JSON file."""
    from benchmarks.workloads import WORKLOADS, Workload, quick

    spec = json.loads(spec_json)
    workload: Workload = WORKLOADS[spec["workload"]]
    if spec.get("quick"):
        workload = quick(workload, spec.get("cycles"))
    elif spec.get("cycles"):
        from dataclasses import replace

        workload = replace(workload, min_cycles=spec["cycles"], max_cycles=max(spec["cycles"], workload.max_cycles))
    record = measure(workload, spec["impl"], spec.get("threads"))
    record["round"] = spec.get("round", 0)
    with open(out_path, "w") as f:
        json.dump(record, f)
    return 0
