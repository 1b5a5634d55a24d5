"""fx time to the first step (Engine build + first train_step) and the slowest of the next steps, per Betty port.

    python benchmarks/betty_ports_first_step.py [--no-copy] [lr higher test mwn maml darts lbi bert sanas]

``--no-copy`` traces both darts evaluations instead of copying the second from the first
(``mlocompile/regions.py``), to measure what the copy saves.

The ports are tests/betty_ports/*; the README's table of Betty's examples holds what this
printed on the project's 2-core CPU with nothing else running. Float64, one thread.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import test_betty_ports_a as ports_a  # noqa: E402
import test_betty_ports_c as ports_c  # noqa: E402
from betty_ports import bert_reweighting, darts, harness_b, implicit_maml, learning_by_ignoring, sanas  # noqa: E402
from betty_ports import learning_to_reweight as mwn  # noqa: E402
from betty_ports import logistic_regression_hpo as lr  # noqa: E402


def timed(label: str, build: Callable[[], Any], later: int = 5) -> None:
    start = time.perf_counter()
    engine = build()
    engine.train_step()
    first = time.perf_counter() - start
    worst = 0.0
    for _ in range(later):
        t = time.perf_counter()
        engine.train_step()
        worst = max(worst, time.perf_counter() - t)
    print(f"{label}: fx first step {first:.1f} s; slowest of the next {later} steps {worst:.1f} s", flush=True)


def main(which: list[str]) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    fx = ports_a.ours("fx")
    ours_b = harness_b.libs()["mlocompile"]
    engine_b = {"compile": "fx", "progress": False}
    programs: dict[str, Callable[[], Any]] = {
        "lr": lambda: timed("logistic_regression_implicit (darts)", lambda: lr.build(fx, "implicit", "darts")),
        "higher": lambda: timed("logistic_regression (higher, itd)", lambda: lr.build(fx, "higher")),
        "test": lambda: timed("logistic_regression test.py (cg 3)", lambda: lr.build(fx, "test")),
        "mwn": lambda: timed("learning_to_reweight", lambda: mwn.build(fx, save_dir=tempfile.mkdtemp())),
        # its Engine overrides train_step (Betty's MAML pattern): timed through run()
        "maml": lambda: ports_a.run_timed(lambda: implicit_maml.build(fx, "cg"), "implicit_maml (cg) fx"),
        "darts": lambda: timed("DARTS", lambda: darts.build(ours_b, train_iters=20, engine_config=engine_b)),
        "lbi": lambda: timed(
            "learning_by_ignoring", lambda: learning_by_ignoring.build(ours_b, train_iters=20, engine_config=engine_b)
        ),
        "bert": lambda: timed(
            "bert_reweighting", lambda: bert_reweighting.build(ours_b, train_iters=20, engine_config=engine_b)
        ),
        "sanas": lambda: timed(
            "SANAS", lambda: sanas.build(ports_c.ours("fx"), sanas.make_data(train_iters=20), "func_buffers"), later=1
        ),
    }
    for name in which or list(programs):
        programs[name]()


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--no-copy" in args:
        import mlocompile.hypergrad

        args.remove("--no-copy")
        mlocompile.hypergrad.call_twice = lambda fn, first, second: (fn(*first), fn(*second()))  # type: ignore[assignment]
    main(args)
