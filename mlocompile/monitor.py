"""Watching a run: a terminal progress bar, metric files (JSONL, CSV, TensorBoard, wandb), early stopping."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

from mlocompile.errors import ProgramError

RUN_MARKER = "run.json"  # in an output_dir: which run its metric files belong to
_BAR_FORMAT = "{percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{stats}"


class _StepBar(tqdm):
    """tqdm with the rate set from outside (the steady state) and our stats after the brackets."""

    monitor_interval = 0  # no monitor thread: ProgressBar decides when to redraw
    steady_rate = 0.0  # 0: tqdm shows "?" for the rate and the ETA
    stats = ""

    @property
    def format_dict(self) -> dict[str, Any]:
        """tqdm's fields, with ``rate`` replaced and ``stats`` added (``{stats}`` in the bar format)."""
        fields = dict(super().format_dict)
        fields["rate"] = self.steady_rate
        fields["stats"] = self.stats
        return fields


class ProgressBar:
    """A tqdm bar for ``Engine.run``; silent unless its stream (stderr) is a terminal.

    It shows the ETA and a steady-state rate, which leave out the steps that trace and
    compile: the first one, and each step in which a problem reports its first loss (an
    upper's first step comes later; tqdm shows "?" until a step counts). After the bar
    come the live per-problem losses and the metrics of the latest validation.
    """

    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total = total
        self.enabled = enabled and total > 0 and bool(getattr(self.stream, "isatty", lambda: False)())
        self.losses: dict[str, float] = {}
        self.metrics: dict[str, float] = {}
        self._step = 0
        self._last: float | None = None  # time of the previous update
        self._stepped: set[str] = set()  # problems that have reported a loss
        self._counted = (0, 0.0)  # steps and seconds the rate counts
        self._last_draw = 0.0
        self._bar: _StepBar | None = None
        if self.enabled:
            self._bar = _StepBar(  # NOTE: position=0: one line, no cursor moves even if another bar is open
                total=total, file=self.stream, unit="step", bar_format=_BAR_FORMAT, dynamic_ncols=True, position=0
            )

    def update(self, step: int, losses: dict[str, float], force: bool = False) -> None:
        """Record global ``step`` and the problems' latest losses; redraw at most ~10 times a second."""
        if self._bar is None:
            return
        now = time.perf_counter()
        stepped = {k for k, v in losses.items() if not math.isnan(v)}
        if self._last is not None and stepped <= self._stepped and step > self._step:
            steps, seconds = self._counted[0] + step - self._step, self._counted[1] + now - self._last
            self._counted = (steps, seconds)
            self._bar.steady_rate = steps / max(seconds, 1e-9)
        self._last, self._stepped = now, self._stepped | stepped
        self._step, self.losses = step, losses
        if force or now - self._last_draw >= 0.1 or step >= self.total:
            self._last_draw = now
            self._draw()

    def validation(self, stats: dict[str, Any]) -> None:
        """Show a validation's numeric metrics after the losses (a record's ``tag`` and ``step`` are skipped)."""
        self.metrics = {
            k: float(v)
            for k, v in stats.items()
            if k not in ("tag", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self._bar is not None:
            self._draw()

    def clear(self) -> None:
        """Erase the bar's line so other output (validation prints) starts on a clean line."""
        if self._bar is not None:
            self._bar.clear()
            self.stream.flush()
            self._last_draw = 0.0  # redraw at the next update

    def close(self) -> None:
        """Draw the final state and end the bar's line."""
        if self._bar is not None:
            self._bar.n, self._bar.stats = self._step, self._stats()
            self._bar.close()
            self._bar = None

    def _draw(self) -> None:
        assert self._bar is not None
        self._bar.n, self._bar.stats = self._step, self._stats()
        self._bar.refresh()

    def _stats(self) -> str:
        shown = "  ".join(f"{k} {v:.4g}" for k, v in self.losses.items() if not math.isnan(v))
        if self.metrics:
            shown += "  | validation " + "  ".join(f"{k} {v:.4g}" for k, v in self.metrics.items())
        return "  " + shown if shown else ""


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

    ``logger_type="tensorboard"`` also writes the scalars with a SummaryWriter in the same
    folder; ``"wandb"`` starts a wandb run (its files in the folder, ``wandb_config`` as
    its config) and logs each record to it. Records whose tag is in ``local_step_tags``
    (``Config.log_local_step``) are plotted there against their ``local_step``.
    """

    def __init__(
        self,
        directory: str,
        logger_type: str = "none",
        local_step_tags: frozenset[str] = frozenset(),
        wandb_config: dict[str, Any] | None = None,
    ) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.local_step_tags = local_step_tags
        self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a", encoding="utf-8")  # noqa: SIM115
        csv_path = os.path.join(directory, "metrics.csv")
        new = not os.path.exists(csv_path) or os.path.getsize(csv_path) == 0
        self._csv_file = open(csv_path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        self._csv = csv.writer(self._csv_file)
        if new:
            self._csv.writerow(["step", "tag", "key", "value"])
        self._tb: Any = None
        self._wandb: Any = None
        if logger_type == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard missing
                raise ImportError("logger_type='tensorboard' needs `pip install tensorboard`") from exc
            self._tb = SummaryWriter(directory)
        elif logger_type == "wandb":
            try:
                import wandb
            except ImportError as exc:
                raise ImportError("logger_type='wandb' needs `pip install wandb`") from exc
            # NOTE: Betty 0.2.1 defines its wandb.init inside a nested function it never calls
            self._wandb = wandb.init(dir=directory, config=dict(wandb_config or {}))

    @classmethod
    def for_run(
        cls,
        folder: str,
        run_id: str,
        history: list[dict[str, Any]],
        logger_type: str = "none",
        keep: int = 0,
        local_step_tags: frozenset[str] = frozenset(),
    ) -> MetricsLogger:
        """Open ``folder``'s metric files for run ``run_id``, never interleaving another run's.

        A folder with no metrics, or with this run's (a resumed run, a second ``run()``)
        is (re)written: its first ``keep`` records (older than ``history``), then
        ``history``; so records a killed process wrote after its last checkpoint are
        dropped. TensorBoard event files are only appended to; a wandb run is new each
        time (its config names ``run_id``) and gets the whole history.

        Raises:
            ProgramError: the folder holds another run's metrics (nothing is changed then).
        """
        marker = os.path.join(folder, RUN_MARKER)
        files = [p for p in (os.path.join(folder, n) for n in ("metrics.jsonl", "metrics.csv")) if os.path.exists(p)]
        if any(os.path.getsize(p) > 0 for p in files):
            owner = None
            if os.path.exists(marker):
                with open(marker, encoding="utf-8") as fh:
                    owner = json.load(fh).get("run_id")
            if owner != run_id:
                raise ProgramError(
                    f"EngineConfig.output_dir={folder!r} holds the metrics of another run"
                    f"{'' if owner is None else f' ({owner})'}; its files would mix with this run's. Use a new "
                    "output_dir, delete that run's metrics files, or load its checkpoint (Engine.load) to resume it"
                )
        older: list[dict[str, Any]] = []
        jsonl = os.path.join(folder, "metrics.jsonl")
        if keep and os.path.exists(jsonl):
            with open(jsonl, encoding="utf-8") as fh:
                older = [json.loads(line) for _, line in zip(range(keep), fh)]
        for p in files:
            os.remove(p)
        os.makedirs(folder, exist_ok=True)
        with open(marker + ".tmp", "w", encoding="utf-8") as fh:
            json.dump({"run_id": run_id}, fh)
        os.replace(marker + ".tmp", marker)
        logger = cls(folder, logger_type, local_step_tags, {"mlocompile_run_id": run_id})
        for record in [*older, *history]:
            logger.log(record)
        return logger

    def log(self, record: dict[str, Any]) -> None:
        """Write one record: ``{"tag": ..., "step": ..., <metric>: <number>, ...}``."""
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        x = record["step"]
        if record["tag"] in self.local_step_tags and "local_step" in record:
            x = record["local_step"]  # Config.log_local_step (Betty's)
        scalars = {}
        for key, value in record.items():
            if key in ("tag", "step") or not isinstance(value, (int, float)):
                continue
            self._csv.writerow([record["step"], record["tag"], key, value])
            scalars[f"{record['tag']}/{key}"] = value
            if self._tb is not None:
                self._tb.add_scalar(f"{record['tag']}/{key}", value, x)
        self._csv_file.flush()
        if self._tb is not None:
            self._tb.flush()  # as the files: a record is on disk once logged (the engine never closes us)
        if self._wandb is not None and scalars:
            # NOTE: as Betty, the x-axis is a "global_step" key: wandb's own step must only grow,
            # and records of several problems (or their local steps) interleave
            self._wandb.log({**scalars, "global_step": x})

    def close(self) -> None:
        """Close the files."""
        self._jsonl.close()
        self._csv_file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(directory: str) -> list[dict[str, Any]]:
    """Read back every record a MetricsLogger wrote to ``directory``."""
    path = os.path.join(directory, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics.jsonl in {directory!r}; run with EngineConfig(output_dir=...) first")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


Series = dict[str, tuple[list[int], list[float]]]  # line label -> (global steps, values)


def metric_panels(records: list[dict[str, Any]]) -> dict[str, Series]:
    """Group records into plot panels: ``"loss"`` (a line per problem), then ``"validation <metric>"`` each."""
    panels: dict[str, Series] = {"loss": {}}
    for record in records:
        if record.get("tag") == "validation":
            for key, value in record.items():
                if key not in ("tag", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    xs, ys = panels.setdefault(f"validation {key}", {}).setdefault("validation", ([], []))
                    xs.append(record["step"])
                    ys.append(float(value))
        elif isinstance(record.get("loss"), (int, float)):
            xs, ys = panels["loss"].setdefault(str(record["tag"]), ([], []))
            xs.append(record["step"])
            ys.append(float(record["loss"]))
    return {title: series for title, series in panels.items() if series}


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_metrics(panels: dict[str, Series], output: str, *, title: str = "", smooth: int = 1) -> Any:
    """Draw one panel per entry of ``metric_panels`` into ``output``; return the matplotlib Figure.

    With ``smooth`` > 1 each line is its ``moving_average`` over that many records, drawn
    over the raw values (faint). Losses get a log scale when they are all positive.
    """
    from matplotlib.figure import Figure  # NOTE: no pyplot: no global figure or backend state

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5 * ncols, 3.4 * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax, (name, series) in zip(axes, panels.items()):
        for label, (xs, ys) in sorted(series.items()):
            dots = {"marker": "o", "markersize": 3} if len(xs) <= 30 else {}  # a single record still shows
            if smooth > 1:
                (raw,) = ax.plot(xs, ys, alpha=0.25)
                ax.plot(xs, moving_average(ys, smooth), color=raw.get_color(), label=label, **dots)
            else:
                ax.plot(xs, ys, label=label, **dots)
        if name == "loss" and all(y > 0 for _, ys in series.values() for y in ys):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("global step")
        if name == "loss" or len(series) > 1:
            ax.legend()
    for ax in axes[len(panels) :]:
        ax.remove()
    if title:
        fig.suptitle(title)
    fig.savefig(output, dpi=120)
    return fig
