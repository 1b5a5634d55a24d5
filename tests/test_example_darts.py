"""examples/darts_nas.py: the DARTS search moves alpha, derives a valid cell and prints its table."""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from programs import load_example, one_thread

ITERS = 20  # 20 weight + 20 alpha steps: a few seconds once traced


@pytest.fixture(scope="module")
def darts() -> Iterator[ModuleType]:
    with one_thread():
        yield load_example("darts_nas")


@pytest.fixture(scope="module")
def searched(darts: ModuleType) -> tuple[Any, torch.Tensor]:
    engine = darts.build(iters=ITERS)
    initial = engine.arch.module.alpha.detach().clone()
    engine.run()
    return engine, initial


def test_search_moves_alpha_away_from_uniform(darts: ModuleType, searched: tuple[Any, torch.Tensor]) -> None:
    engine, initial = searched
    alpha = engine.arch.module.alpha.detach()
    assert alpha.shape == (len(darts.EDGES), len(darts.OPS))
    assert torch.isfinite(alpha).all()
    # alpha starts at 1e-3 * randn; 20 Adam steps at lr 3e-3 can move an entry by up to 0.06
    assert (alpha - initial).abs().max() > 0.02, "alpha barely moved: no gradient reached the architecture"
    probs = F.softmax(alpha, -1)
    assert (probs - 1 / len(darts.OPS)).abs().max() > 0.005, probs
    # the zero op can only hurt the validation loss early in the search, so its weight falls on average
    assert probs[:, darts.OPS.index("zero")].mean() < 1 / len(darts.OPS) - 0.003, probs


def test_derive_picks_one_nonzero_argmax_op_per_edge(darts: ModuleType, searched: tuple[Any, torch.Tensor]) -> None:
    engine, _ = searched
    arch = darts.derive(engine)
    assert len(arch) == len(darts.EDGES)
    assert all(op in darts.OPS and op != "zero" for op in arch), arch
    alpha = engine.arch.module.alpha.detach()
    for e, op in enumerate(arch):
        others = [alpha[e, k] for k, name in enumerate(darts.OPS) if name not in ("zero", op)]
        assert all(alpha[e, darts.OPS.index(op)] >= a for a in others), (e, op, alpha[e])


def test_derive_skips_zero_even_when_it_wins(darts: ModuleType, searched: tuple[Any, torch.Tensor]) -> None:
    engine, _ = searched
    saved = engine.arch.module.alpha.detach().clone()
    try:
        with torch.no_grad():
            alpha = engine.arch.module.alpha
            alpha.zero_()
            alpha[:, darts.OPS.index("zero")] = 5.0
            for e in range(len(darts.EDGES)):
                alpha[e, 1 + e % (len(darts.OPS) - 1)] = 1.0  # the runner-up cycles through the non-zero ops
        expected = tuple(darts.OPS[1 + e % (len(darts.OPS) - 1)] for e in range(len(darts.EDGES)))
        assert darts.derive(engine) == expected
    finally:
        with torch.no_grad():
            engine.arch.module.alpha.copy_(saved)


def test_retrained_derived_architecture_learns(darts: ModuleType, searched: tuple[Any, torch.Tensor]) -> None:
    engine, _ = searched
    arch = darts.derive(engine)
    net = darts.Net([[op] for op in arch])
    assert sum(len(edge) for edge in net.edges) == sum(op != "zero" for op in arch)  # one op module per edge
    acc = darts.retrain(arch, engine.data, seed=0, steps=60)
    assert acc > 0.8, f"the derived architecture reached only {acc:.3f} test accuracy after 60 steps"


def test_main_prints_table(darts: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(2)
    args = ["--iters", "2", "--random", "2", "--retrains", "1", "--retrain-steps", "5", "--compile", "eager"]
    rows = darts.main(args)
    out = capsys.readouterr().out
    assert torch.get_num_threads() == 2, "main() must restore the caller's thread count"
    torch.set_num_threads(1)
    assert "architecture" in out and "test acc" in out and "ops (edge i->j)" in out
    assert [r["name"] for r in rows] == ["supernet", "DARTS", "random x2"]
    table = out[out.index("architecture") :].splitlines()
    assert any(line.startswith("DARTS") and "0->1:" in line for line in table)
    assert all(0.0 <= r["test_acc"] <= 1.0 and math.isfinite(r["seconds"]) for r in rows)
    assert "DARTS retrain seed 0: test acc" in out and "retraining seeds of the cell searched with seed 0" in out
    assert rows[1]["test_std"] is None  # one retraining: no spread to report
    randoms = [float(line.split("test acc ")[1].split()[0]) for line in out.splitlines() if "  random " in line]
    assert len(randoms) == 2 and rows[2]["test_std"] == pytest.approx(
        abs(randoms[0] - randoms[1]) / math.sqrt(2), abs=1e-4
    )
