"""The benchmark harness (``benchmarks/``): a smoke test of the runner and a check of its baseline.

Benchmarks are never timed tests: these check that ``benchmarks/run.py`` produces a
well-formed result file with positive timings, and that the hand-written torch.func
baseline computes the same program as mlocompile (otherwise comparing their speed
would mean nothing).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # ``benchmarks`` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import torchfunc  # noqa: E402
from benchmarks.engines import EngineRunner  # noqa: E402
from benchmarks.workloads import WORKLOADS, build_program, quick  # noqa: E402


def test_quick_run_writes_a_complete_result_file(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    cmd = [sys.executable, "benchmarks/run.py", "--quick", "--workloads", "hpo_d20", "--impls", "eager", "fx"]
    proc = subprocess.run(
        [*cmd, "--cycles", "3", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["machine"]["matmul_peak_flops"] > 0
    assert doc["machine"]["matmul"]["threads"] >= 1
    assert len(doc["machine"]["loadavg_start"]) == 3
    rows = doc["results"]["hpo_d20"]["impls"]
    assert set(rows) == {"eager", "fx"}
    for impl, row in rows.items():
        assert row["status"] == "ok", f"{impl}: {row.get('error')}"
        assert row["cycles"] == 3
        assert 0 < row["min_ms"] <= row["q1_ms"] <= row["median_ms"] <= row["q3_ms"] <= row["max_ms"]
        assert row["flops_per_cycle"] > 0  # the logistic-regression matvecs are counted
        assert row["threads"] >= 1
        for key in ("peak_mb", "transient_mb", "peak_abs_mb", "maxrss_mb", "first_cycle_s"):
            assert isinstance(row[key], float), key
    records = [r for r in doc["records"] if r["workload"] == "hpo_d20"]
    assert len(records) == 2 and all(len(r["times_ms"]) == 3 for r in records)
    assert "| hpo_d20 | fx |" in proc.stdout  # the markdown table


def _params(runner: object, kind: str) -> dict[str, dict[str, torch.Tensor]]:
    if isinstance(runner, EngineRunner):
        return {n: dict(p.module.named_parameters()) for n, p in runner.problems.items()}
    if kind == "chain":
        return {n: dict(m.named_parameters()) for n, m in runner.mods.items()}  # type: ignore[attr-defined]
    if kind == "maml":
        return {"outer": dict(runner.net.named_parameters())}  # type: ignore[attr-defined]
    return {"inner": dict(runner.net.named_parameters()), "outer": dict(runner.hnet.named_parameters())}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "name,method",
    [
        ("hpo_d20", "darts"),
        ("hpo_d20", "neumann"),
        ("hpo_d20", "cg"),
        ("chain3_darts", "darts"),
        ("maml_itd_k5", "itd"),
    ],
)
def test_torchfunc_baseline_computes_what_mlocompile_computes(name: str, method: str) -> None:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        w = quick(WORKLOADS[name])
        if w.kind == "hpo":  # also covers unroll > 1 and every implicit method
            w = replace(w, method=method, unroll=2)
        ours, hand = EngineRunner(w, "eager"), torchfunc.build(w)
        for _ in range(3):
            ours.cycle()
            hand.cycle()
        got, expected = _params(hand, w.kind), _params(ours, w.kind)
        init = build_program(w).problems
        for problem, tensors in got.items():
            start = dict(init[problem].module.named_parameters())
            moved = max((t - start[k]).abs().max().item() for k, t in tensors.items())
            assert moved > 1e-6, f"{problem} never moved: the comparison would be vacuous"
            for key, t in tensors.items():
                torch.testing.assert_close(t, expected[problem][key], rtol=1e-9, atol=1e-12)
    finally:
        torch.set_default_dtype(old)
