"""Aggregate measuring-process records: statistics, ratios to Betty, targets, markdown."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.workloads import Workload, theoretical_min_bytes

MB = 1024 * 1024
FLOP_REFERENCE = ("eager", "torchfunc", "fx", "betty")  # whose FLOP count is "the work" of a cycle
MEMORY_NOISE_MB = 2.0  # RSS deltas below this are allocator/page noise, not a difference


def progress_line(rec: dict[str, Any]) -> str:
    """One line per measuring process, for stderr while the run goes on."""
    head = f"[{rec['workload']} / {rec['impl']} / round {rec.get('round', 0)}]"
    if "error" in rec:
        return f"{head} n/a: {rec['error'][:160]}"
    ms = statistics.median(rec["times_ms"])
    return (
        f"{head} {ms:.2f} ms/cycle (n={len(rec['times_ms'])}), peak +{rec['peak_mb']:.1f} MB, "
        f"first cycle {rec['first_cycle_s']:.1f} s, process {rec.get('process_s', 0):.1f} s, "
        f"others used {rec.get('foreign_cpu', 0.0):.0%} of the CPUs"
    )


def _quantiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def summarize(recs: list[dict[str, Any]], max_foreign: float = 1.0) -> dict[str, Any]:
    """Pool the timed cycles of every round of one (workload, implementation).

    Only accepted attempts count (``run.measure_quietly`` repeats disturbed ones).
    """
    recs = [r for r in recs if r.get("accepted", True)]
    ok = [r for r in recs if "error" not in r]
    if not ok:
        err = recs[0]
        return {"status": "error", "error": err["error"], "stage": err.get("stage"), "traceback": err.get("traceback")}
    times = [t for r in ok for t in r["times_ms"]]
    q1, q3 = _quantiles(times)
    med = lambda key: statistics.median(r[key] for r in ok)  # noqa: E731
    out: dict[str, Any] = {
        "status": "ok",
        "rounds": len(ok),
        "cycles": len(times),
        "median_ms": statistics.median(times),
        "q1_ms": q1,
        "q3_ms": q3,
        "min_ms": min(times),
        "max_ms": max(times),
        "round_medians_ms": [statistics.median(r["times_ms"]) for r in ok],
        "peak_mb": med("peak_mb"),
        "peak_mb_rounds": [r["peak_mb"] for r in ok],
        "transient_mb": med("transient_mb"),
        "peak_abs_mb": med("peak_abs_mb"),
        "maxrss_mb": max(r["maxrss_mb"] for r in ok),
        "hwm_reset": all(r["hwm_reset"] for r in ok),
        "first_cycle_s": med("first_cycle_s"),
        "setup_s": med("setup_s"),
        "threads": ok[0]["threads"],
        "loadavg": [r["loadavg_start"][0] for r in ok],
        "foreign_cpu": max(r.get("foreign_cpu", 0.0) for r in ok),
    }
    out["disturbed"] = out["foreign_cpu"] > max_foreign
    if all("flops_per_cycle" in r for r in ok):
        out["flops_per_cycle"] = ok[0]["flops_per_cycle"]
    if all("live_peak_mb" in r for r in ok):
        out["live_peak_mb"] = med("live_peak_mb")
    if len(ok) < len(recs):
        out["failed_rounds"] = [r["error"] for r in recs if "error" in r]
    return out


def aggregate(
    records: list[dict[str, Any]], machine: dict[str, Any], workloads: dict[str, Workload], quick: bool = False
) -> dict[str, Any]:
    """Return the JSON document: machine, raw records, per-workload results and targets."""
    peak = max(machine["matmul"]["best_flops"], machine.get("matmul_end", {}).get("best_flops", 0.0))
    results: dict[str, dict[str, Any]] = {}
    for rec in records:
        results.setdefault(rec["workload"], {}).setdefault(rec["impl"], []).append(rec)
    table: dict[str, dict[str, Any]] = {}
    for wname, by_impl in results.items():
        rows = {impl: summarize(recs, machine.get("max_foreign", 1.0)) for impl, recs in by_impl.items()}
        ref = next((rows[i]["flops_per_cycle"] for i in FLOP_REFERENCE if rows.get(i, {}).get("flops_per_cycle")), None)
        betty = rows.get("betty", {})
        for row in rows.values():
            if row["status"] != "ok":
                continue
            if ref:
                row["ref_flops_per_cycle"] = ref
                row["achieved_flops"] = ref / (row["median_ms"] / 1e3)
                row["matmul_fraction"] = row["achieved_flops"] / peak
            if betty.get("status") == "ok":
                row["ms_vs_betty"] = row["median_ms"] / betty["median_ms"]
                row["mem_vs_betty"] = row["peak_mb"] / betty["peak_mb"] if betty["peak_mb"] > 0 else None
        w = workloads[wname]
        entry: dict[str, Any] = {
            "kind": w.kind,
            "method": w.method,
            "unroll": w.unroll,
            "sizes": w.sizes,
            "impls": rows,
        }
        if w.note:
            entry["note"] = w.note
        if w.kind == "scale":
            entry["theoretical_min"] = _scale_memory(w, rows, quick)
        table[wname] = entry
    repeated = sum(1 for r in records if not r.get("accepted", True))
    doc = {
        "machine": {**machine, "matmul_peak_flops": peak, "discarded_attempts": repeated},
        "results": table,
        "records": records,
    }
    doc["targets"] = targets(table, peak)
    return doc


def _scale_memory(w: Workload, rows: dict[str, Any], quick: bool) -> dict[str, Any]:
    from benchmarks.workloads import quick as shrink

    theory = theoretical_min_bytes(shrink(w) if quick else w)
    out: dict[str, Any] = {k: (v / MB if k != "inner_params" else v) for k, v in theory.items()}
    for impl, row in rows.items():
        if row["status"] == "ok":
            out[f"{impl}_peak_abs_mb"] = row["peak_abs_mb"]
            out[f"{impl}_vs_min"] = row["peak_abs_mb"] / out["total"]
    return out


def targets(table: dict[str, dict[str, Any]], peak: float) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and met/missed (never dropped).

    A speed target also gets ``bound``: the ratio to Betty that a cycle doing the same
    matmul FLOPs at 100% of the measured matmul peak (and nothing else) would reach.
    """
    out: list[dict[str, Any]] = []

    def row(w: str, impl: str) -> dict[str, Any] | None:
        r = table.get(w, {}).get("impls", {}).get(impl)
        return r if r and r["status"] == "ok" else None

    def add(name: str, w: str, impl: str, key: str, limit: float, le: bool = True) -> None:
        r = row(w, impl)
        if r is None or r.get(key) is None:
            if w in table:
                out.append({"target": name, "workload": w, "impl": impl, "measured": None, "met": None})
            return
        v = r[key]
        out.append({"target": name, "workload": w, "impl": impl, "measured": v, "limit": limit,
                    "met": v <= limit if le else v >= limit})  # fmt: skip
        betty = row(w, "betty")
        if key == "ms_vs_betty" and betty and r.get("ref_flops_per_cycle"):
            out[-1]["bound"] = r["ref_flops_per_cycle"] / peak * 1e3 / betty["median_ms"]

    add("MWN darts unroll 1: inductor <= 0.4x Betty ms/cycle", "mwn_darts_u1", "inductor", "ms_vs_betty", 0.4)
    add("MWN darts unroll 1: fx <= 0.8x Betty ms/cycle", "mwn_darts_u1", "fx", "ms_vs_betty", 0.8)
    for m in ("neumann", "cg"):
        for u in (1, 5):
            for impl in ("inductor", "fx"):
                add(f"MWN {m} unroll {u}: {impl} <= 0.5x Betty ms/cycle", f"mwn_{m}_u{u}", impl, "ms_vs_betty", 0.5)
    for w in sorted(k for k in table if k.startswith("mwn_")):
        add("MWN: inductor >= 50% of measured matmul FLOP/s", w, "inductor", "matmul_fraction", 0.5, le=False)
    for w, entry in table.items():
        betty = entry["impls"].get("betty")
        if not betty or betty["status"] != "ok":
            continue
        for impl in ("eager", "fx", "inductor"):
            r = row(w, impl)
            if r is None:
                continue
            diff = r["peak_mb"] - betty["peak_mb"]
            out.append({"target": "peak memory <= Betty's", "workload": w, "impl": impl,
                        "measured": r["peak_mb"], "limit": betty["peak_mb"], "met": diff <= 0,
                        "within_noise": abs(diff) < MEMORY_NOISE_MB,
                        "transient_mb": r["transient_mb"], "betty_transient_mb": betty["transient_mb"],
                        "live_peak_mb": r.get("live_peak_mb"), "betty_live_peak_mb": betty.get("live_peak_mb")})  # fmt: skip
    return out


# -- markdown ---------------------------------------------------------------------------------------
def _f(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def markdown(doc: dict[str, Any]) -> str:
    """Render the results, the scale-memory comparison and the targets as markdown."""
    m = doc["machine"]
    lines = [
        f"Machine: {m['processor']}, {m['cpu_count']} cores, torch {m['torch']}, "
        f"{m['matmul']['threads']} threads; fp32 matmul (1024³) "
        f"{m['matmul_peak_flops'] / 1e9:.1f} GFLOP/s (best of the run's two measurements); "
        f"load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end; "
        f"{m.get('discarded_attempts', 0)} measurement(s) repeated because other processes used more than "
        f"{m.get('max_foreign', 1.0):.0%} of the CPUs while they were timed; † = the best attempt was still disturbed.",
        "",
        "| workload | impl | ms/cycle (median) | IQR ms | min–max ms | ×Betty ms | peak MB | ×Betty mem "
        "| transient MB | live tensors MB | MFLOP/cycle | % matmul peak | cycles |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w, entry in doc["results"].items():
        for impl, r in entry["impls"].items():
            if r["status"] != "ok":
                lines.append(f"| {w} | {impl} | n/a (crashes) | | | | | | | | | | `{r['error'][:150]}` |")
                continue
            gf = r.get("ref_flops_per_cycle")
            lines.append(
                f"| {w} | {impl} | {r['median_ms']:.2f}{' †' if r.get('disturbed') else ''} "
                f"| {r['q1_ms']:.2f}–{r['q3_ms']:.2f} "
                f"| {r['min_ms']:.2f}–{r['max_ms']:.2f} | {_f(r.get('ms_vs_betty'))} | {r['peak_mb']:.1f} "
                f"| {_f(r.get('mem_vs_betty'))} | {r['transient_mb']:.1f} | {_f(r.get('live_peak_mb'), '.1f')} "
                f"| {_f(gf / 1e6 if gf else None, '.1f')} "
                f"| {_f(100 * r['matmul_fraction'] if 'matmul_fraction' in r else None, '.1f')} | {r['cycles']} |"
            )
    for w, entry in doc["results"].items():
        t = entry.get("theoretical_min")
        if not t:
            continue
        lines += [
            "",
            f"Scale ({w}, {t['inner_params'] / 1e6:.1f}M inner parameters): theoretical minimum "
            f"{t['total']:.0f} MB = params {t['params']:.0f} + grads {t['grads']:.0f} + optimizer state "
            f"{t['optimizer_state']:.0f} + activations {t['activations']:.0f}.",
        ]
        for impl in entry["impls"]:
            if f"{impl}_peak_abs_mb" in t:
                lines.append(
                    f"- {impl}: peak RSS above the post-import baseline {t[f'{impl}_peak_abs_mb']:.0f} MB "
                    f"= {t[f'{impl}_vs_min']:.2f}× the minimum"
                )
    lines += [
        "",
        "Speed targets also show the bound: the ratio a cycle would reach doing only its matmul FLOPs at 100% "
        "of the measured matmul peak.",
        "",
        "| target | workload | impl | measured | limit | bound | met |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for t in doc["targets"]:
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "**missed**")
        if t.get("within_noise"):
            met += " (within noise)"
        if "transient_mb" in t:
            met += f"; transient {t['transient_mb']:.1f} vs Betty {t['betty_transient_mb']:.1f} MB"
        if t.get("live_peak_mb") is not None and t.get("betty_live_peak_mb") is not None:
            met += f"; live tensors {t['live_peak_mb']:.1f} vs Betty {t['betty_live_peak_mb']:.1f} MB"
        lines.append(
            f"| {t['target']} | {t['workload']} | {t['impl']} | {_f(t['measured'], '.3f')} "
            f"| {_f(t.get('limit'), '.3f')} | {_f(t.get('bound'), '.3f')} | {met} |"
        )
    return "\n".join(lines)
