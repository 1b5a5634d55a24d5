"""Watching a run: the tqdm progress bar (in a real pseudo-terminal), metric plots, TensorBoard files."""

from __future__ import annotations

import io
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mlocompile.__main__ as cli
from mlocompile import monitor
from mlocompile.monitor import MetricsLogger, ProgressBar, metric_panels, moving_average, read_metrics
from programs import mwn_engine

ROOT = Path(__file__).resolve().parents[1]
HPO = str(ROOT / "examples" / "hpo_l2.py")


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def _in_pty(args: list[str], timeout: float = 240.0) -> tuple[int, str]:
    """Run ``python ARGS`` with stdin, stdout and stderr on a pseudo-terminal 200 columns wide."""
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, *args], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(10), b"".join(chunks).decode("utf-8", "replace")


def test_engine_run_in_a_terminal_shows_the_bar_with_live_losses():
    code = "from programs import mwn_engine\nmwn_engine(train_iters=6, log_every=1).run()\nprint('done')\n"
    status, out = _in_pty(["-c", code])
    assert status == 0, out
    assert out.rstrip().endswith("done"), out
    # the last drawing: full bar, ETA 0, a measured rate, then both problems' latest losses
    final = re.findall(r"100%\|\S{20}\| 6/6 \[\d\d:\d\d<00:00, +[\d.]+(?:step/s|s/step)\]  (.*?)\s*(?:\r|$)", out)
    assert final and re.fullmatch(r"(inner|outer) \d\.\d+  (inner|outer) \d\.\d+", final[-1]), out
    assert {"inner", "outer"} <= set(final[-1].split()), out
    assert re.search(r"\| [1-5]/6 \[", out), out  # it was drawn while running, not only at the end


def test_steady_rate_and_eta_leave_out_the_steps_that_trace(monkeypatch):
    # step 1 ends after 10 s of tracing; step 6 is the upper's first (5 s: it traces); the others take 1/8 s
    times = [10.0, *[10 + k / 8 for k in range(1, 5)], 15.5, *[15.5 + k / 8 for k in range(1, 6)]]
    clock = iter(times)
    monkeypatch.setattr(monitor.time, "perf_counter", lambda: next(clock))
    tty = FakeTTY()
    bar = ProgressBar(100, True, tty)
    for step in range(1, 12):
        bar.update(step, {"outer": 1.0 if step >= 6 else float("nan"), "inner": 1.0 / step}, force=True)
    line = tty.getvalue().split("\r")[-1]
    # 9 counted steps in 9/8 s: 8 steps/s and (100 - 11) / 8 = 11.1 s left (11 steps in 16 s would say 0.69/s)
    assert re.search(r" 11/100 \[\d\d:\d\d<00:11, +8\.00step/s\]", line), line
    bar.close()


def test_validation_metrics_follow_the_losses():
    tty = FakeTTY()

    def last() -> str:
        return tty.getvalue().split("\r")[-1].rstrip()

    bar = ProgressBar(10, True, tty)
    bar.update(4, {"inner": 0.5, "outer": float("nan")}, force=True)
    assert last().endswith("  inner 0.5")  # NaN: the problem has not stepped yet
    bar.validation({"tag": "validation", "step": 4, "acc": 0.875, "note": "text", "val_loss": 0.25})
    assert last().endswith("  inner 0.5  | validation acc 0.875  val_loss 0.25")
    bar.clear()
    bar.update(5, {"inner": 0.4, "outer": 1.5})
    assert last().endswith("  inner 0.4  outer 1.5  | validation acc 0.875  val_loss 0.25")
    bar.close()
    assert tty.getvalue().endswith("\n")
    pipe = io.StringIO()
    silent = ProgressBar(10, True, pipe)
    silent.update(3, {"inner": 0.5}, force=True)
    silent.validation({"acc": 1.0})
    silent.close()
    assert pipe.getvalue() == ""


def test_run_progress_flag_overrides_the_example_and_defaults_to_the_terminal(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(cli, "_report", lambda engine, out: seen.append(engine.config.progress))
    for flags in (["--progress"], ["--no-progress"], []):
        assert cli.main(["run", HPO, "--iters", "2", "--out", str(tmp_path), *flags]) == 0
    assert seen == [True, False, sys.stdout.isatty()]  # build() says progress=False; the flag wins


def test_cli_run_in_a_terminal_shows_the_bar_unless_no_progress(tmp_path):
    base = ["-m", "mlocompile", "run", HPO, "--iters", "10", "--out", str(tmp_path / "run")]
    status, out = _in_pty(base)
    assert status == 0, out
    final = re.findall(r"100%\|\S{20}\| 10/10 \[[^]]*\]  (.*?)\s*(?:\r|$)", out)
    losses = r"(inner|outer) \d\.\d+  (inner|outer) \d\.\d+"
    assert final and re.fullmatch(losses + r"  \| validation .*val_loss \d\.\d+.*", final[-1]), out
    assert {"inner", "outer"} <= set(final[-1].split()), out
    status, out = _in_pty([*base, "--no-progress"])
    assert status == 0 and "wrote " in out, out
    assert "10/10" not in out and "%|" not in out, out


def _log_run(directory: Path) -> None:
    logger = MetricsLogger(str(directory))
    for step in range(1, 7):
        logger.log({"tag": "inner", "step": step, "local_step": step, "loss": 1.0 / step})
        if step % 2 == 0:
            logger.log({"tag": "outer", "step": step, "local_step": step // 2, "loss": 2.0 / step, "acc": 0.5})
        if step % 3 == 0:
            logger.log({"tag": "validation", "step": step, "acc": step / 10, "val_loss": 1.0 / step, "ok": True})
    logger.close()


def test_plot_draws_one_panel_per_metric(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    _log_run(tmp_path)
    panels = metric_panels(read_metrics(str(tmp_path)))
    assert list(panels) == ["loss", "validation acc", "validation val_loss"]
    assert panels["loss"]["inner"] == ([1, 2, 3, 4, 5, 6], [1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6])
    assert panels["loss"]["outer"][0] == [2, 4, 6] and panels["validation acc"]["validation"] == ([3, 6], [0.3, 0.6])
    figures = []
    real = cli.plot_metrics
    monkeypatch.setattr(cli, "plot_metrics", lambda *a, **k: figures.append(real(*a, **k)))
    png = tmp_path / "curves.png"
    assert cli.main(["plot", str(tmp_path), "-o", str(png), "--smooth", "3"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    assert [ax.get_title() for ax in fig.axes] == ["loss", "validation acc", "validation val_loss"]
    loss_ax = fig.axes[0]
    assert len(loss_ax.lines) == 4 and loss_ax.get_yscale() == "log"  # raw + smoothed, per problem
    smoothed = [line for line in loss_ax.lines if line.get_label() == "inner"][0]
    assert list(smoothed.get_ydata()) == moving_average([1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6], 3)


def test_moving_average_is_a_trailing_mean():
    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert moving_average([3.0, 1.0], 1) == [3.0, 1.0]


def test_plot_rejects_a_folder_without_curves_and_a_bad_smoothing(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"tag": "inner", "step": 1, "local_step": 1}\n')
    assert cli.main(["plot", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    assert "has no loss or validation records to plot" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["plot", str(tmp_path), "-o", str(tmp_path / "x.png"), "--smooth", "0"])
    assert "--smooth: must be an integer >= 1, got 0" in capsys.readouterr().err


def test_tensorboard_files_hold_every_logged_scalar(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    engine = mwn_engine(train_iters=4, log_every=1, progress=False, output_dir=str(tmp_path), logger_type="tensorboard")
    engine.run()
    engine.metrics.log({"tag": "validation", "step": 4, "acc": 0.75})
    events = EventAccumulator(str(tmp_path))
    events.Reload()  # NOTE: the engine's writer is still open: every record must already be on disk
    tags = {f"{p}/{k}" for p in ("inner", "outer") for k in ("loss", "local_step")} | {"outer/acc", "validation/acc"}
    assert set(events.Tags()["scalars"]) == tags
    for tag, key in (("inner", "loss"), ("outer", "loss"), ("outer", "acc"), ("inner", "local_step")):
        logged = [r for r in engine.history if r["tag"] == tag]
        read = events.Scalars(f"{tag}/{key}")
        assert [e.step for e in read] == [r["step"] for r in logged] and len(read) >= 2
        assert [e.value for e in read] == pytest.approx([r[key] for r in logged], rel=1e-6)  # stored as float32
    assert [(e.step, e.value) for e in events.Scalars("validation/acc")] == [(4, 0.75)]
