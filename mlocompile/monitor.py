"""Watching a run: a terminal progress bar, metric files (JSONL, CSV, TensorBoard), early stopping."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from typing import Any, TextIO

from mlocompile.errors import ProgramError


class ProgressBar:
    """A one-line progress bar with live per-problem losses; silent unless on a terminal."""

    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total = total
        self.enabled = enabled and total > 0 and bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self._last_draw = 0.0

    def update(self, step: int, losses: dict[str, float], force: bool = False) -> None:
        """Redraw (at most ~10 times a second) with the current step and losses."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last_draw < 0.1 and step < self.total:
            return
        self._last_draw = now
        rate = step / max(now - self.start, 1e-9)
        width = 24
        done = int(width * step / self.total)
        shown = "  ".join(f"{k} {v:.4g}" for k, v in losses.items() if not math.isnan(v))
        line = f"\r[{'#' * done}{'.' * (width - done)}] {step}/{self.total} {rate:6.1f} it/s  {shown}"
        self.stream.write(line[:200].ljust(80))
        self.stream.flush()

    def clear(self) -> None:
        """Erase the bar's line so other output (validation prints) starts on a clean line."""
        if self.enabled:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()
            self._last_draw = 0.0

    def close(self) -> None:
        """End the bar's line."""
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


class EarlyStopping:
    """Betty's early stopping: stop after ``tolerance`` validations without a better ``metric``."""

    def __init__(self, metric: str, mode: str, tolerance: int) -> None:
        self.metric, self.mode, self.tolerance = metric, mode, tolerance
        self.best: float | None = None
        self.counter = 0

    @classmethod
    def from_config(cls, config: Any) -> EarlyStopping:
        """From ``EngineConfig``'s ``early_stopping_metric``, ``_mode`` and ``_tolerance``."""
        return cls(config.early_stopping_metric, config.early_stopping_mode, config.early_stopping_tolerance)

    def update(self, stats: dict[str, Any]) -> bool:
        """Record one validation's ``stats``; return whether to stop.

        Raises:
            ProgramError: ``metric`` is not among the validation results.
        """
        if self.metric not in stats:
            raise ProgramError(f"early_stopping_metric={self.metric!r} is not in validation()'s result {sorted(stats)}")
        score = float(stats[self.metric])
        if self.best is None or (score < self.best if self.mode == "min" else score > self.best):
            self.best, self.counter = score, 0
        else:
            self.counter += 1
        return self.counter >= self.tolerance

    def state_dict(self) -> dict[str, Any]:
        """The best score so far and the validations since."""
        return {"best": self.best, "counter": self.counter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` wrote."""
        self.best, self.counter = state["best"], state["counter"]


class MetricsLogger:
    """Appends every record to ``metrics.jsonl`` and ``metrics.csv`` (long format) in a folder.

    With ``tensorboard=True`` and TensorBoard installed, scalars also go to a
    SummaryWriter in the same folder.
    """

    def __init__(self, directory: str, tensorboard: bool = False) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a", encoding="utf-8")  # noqa: SIM115
        csv_path = os.path.join(directory, "metrics.csv")
        new = not os.path.exists(csv_path) or os.path.getsize(csv_path) == 0
        self._csv_file = open(csv_path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        self._csv = csv.writer(self._csv_file)
        if new:
            self._csv.writerow(["step", "tag", "key", "value"])
        self._tb: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard missing
                raise ImportError("logger_type='tensorboard' needs `pip install tensorboard`") from exc
            self._tb = SummaryWriter(directory)

    def log(self, record: dict[str, Any]) -> None:
        """Write one record: ``{"tag": ..., "step": ..., <metric>: <number>, ...}``."""
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key in ("tag", "step") or not isinstance(value, (int, float)):
                continue
            self._csv.writerow([record["step"], record["tag"], key, value])
            if self._tb is not None:
                self._tb.add_scalar(f"{record['tag']}/{key}", value, record["step"])
        self._csv_file.flush()

    def close(self) -> None:
        """Close the files."""
        self._jsonl.close()
        self._csv_file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(directory: str) -> list[dict[str, Any]]:
    """Read back every record a MetricsLogger wrote to ``directory``."""
    path = os.path.join(directory, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics.jsonl in {directory!r}; run with EngineConfig(output_dir=...) first")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
