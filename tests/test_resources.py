"""Bounded resources: step caches, history and metric files have limits with a warning, and a long run's
memory stays flat."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlocompile import compiler as compiler_module
from mlocompile import engine as engine_module
from programs import mwn_data, mwn_engine

HERE = Path(__file__).parent


def test_the_trace_cache_keeps_a_bounded_number_of_graphs_per_step_and_says_so(monkeypatch):
    monkeypatch.setattr(compiler_module, "CACHE_LIMIT", 3)
    # fixed-size traces only (no symbolic sizes), so every batch size is a graph of its own
    monkeypatch.setattr(compiler_module.Compiler, "_dynamic_dims", lambda self, base, inputs, flat: frozenset())
    shapes = [4, 5, 6, 7, 8, 4, 5]  # batch sizes: five distinct, then two seen (and evicted) before
    engines = {}
    for backend in ("eager", "fx"):
        engine = mwn_engine("darts", backend)
        engine.inner.train_data_loader = [(x[:n], t[:n]) for (x, t), n in zip(mwn_data(0, n=112), shapes)]
        engines[backend] = engine
    with pytest.warns(UserWarning, match=r"step_inner: more than 3 traced graphs .* least recently used are dropped"):
        for _ in shapes:
            for engine in engines.values():
                engine.train_step()
    fx = engines["fx"].compiler
    assert max(sum(1 for key in fx._traced if key[0].title == title) for title in ("step_inner", "step_outer")) <= 3
    for a, b in zip(engines["eager"].inner.module.parameters(), engines["fx"].inner.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # an evicted shape traced again computes the same


def test_history_keeps_a_bounded_number_of_records_and_the_files_keep_all(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(engine_module, "HISTORY_LIMIT", 20)
    out = tmp_path / "run"
    engine = mwn_engine(log_every=1, output_dir=str(out), train_iters=30, progress=False)
    with caplog.at_level(logging.WARNING, logger="mlocompile"):
        engine.run()
    assert 18 <= len(engine.history) <= 20
    assert sum("Engine.history keeps the last" in r.message for r in caplog.records) == 1
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 60 and lines[-len(engine.history) :] == engine.history
    # a resumed run rewrites its files: the records older than its history are kept
    ckpt = engine.save(str(tmp_path / "ckpt.pt"))
    resumed = mwn_engine(log_every=1, output_dir=str(out), train_iters=5, progress=False)
    resumed.load(ckpt)
    resumed.run()
    again = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert again[:60] == lines and len(again) == 70


RSS_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import data_reweighting as ex

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

engine = ex.build(iters=2400, compile="fx")
engine.config.train_iters = 400
engine.run()                                  # warm-up: traces, planned buffers, allocator pools
before = rss_mb()
engine.config.train_iters = 2000
engine.run()
print(f"steps={engine.global_step} growth_mb={rss_mb() - before:.2f}")
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident set from /proc")
def test_a_long_run_keeps_its_memory_flat():
    """2 000 Meta-Weight-Net steps (the example, fx) after warm-up: the resident set grows by < 5 MB."""
    done = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(HERE.parent / "examples")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(HERE.parent)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    steps, growth = (float(kv.split("=")[1]) for kv in done.stdout.split()[-2:])
    assert steps == 2400 and growth < 5.0, done.stdout

