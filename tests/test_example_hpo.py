"""examples/hpo_l2.py: per-feature L2 HPO trains, beats its frozen control and prints its table."""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import torch

from programs import load_example, one_thread

ITERS = 300  # 30 outer steps: enough for lambda to move, a second or two per method


@pytest.fixture(scope="module")
def hpo() -> Iterator[ModuleType]:
    with one_thread():
        yield load_example("hpo_l2")


@pytest.fixture(scope="module")
def control(hpo: ModuleType) -> Any:
    """The engine with the outer's lr = 0: lambda stays at its initial value."""
    engine = hpo.build("darts", iters=ITERS, outer_lr=0.0)
    engine.run()
    return engine


@pytest.fixture(scope="module")
def trained(hpo: ModuleType) -> dict[str, dict[str, float]]:
    results = {}
    for method in hpo.METHODS:
        engine = hpo.build(method, iters=ITERS)
        engine.run()
        results[method] = hpo.evaluate(engine)
        results[method]["log_lambda_std"] = engine.outer.module.log_lambda.detach().std().item()
    return results


def test_frozen_lambda_matches_plain_torch_loop(hpo: ModuleType, control: Any) -> None:
    # The engine's inner updates against an independent eager torch.optim loop.
    reference = hpo.fit_fixed(hpo.INIT_LAMBDA, ITERS, control.data)
    net = control.inner.module
    torch.testing.assert_close(net.weight.detach(), reference.weight.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net.bias.detach(), reference.bias.detach(), rtol=1e-4, atol=1e-5)
    lam = control.outer().detach()
    torch.testing.assert_close(lam, torch.full_like(lam, hpo.INIT_LAMBDA))


@pytest.mark.parametrize("method", ["darts", "neumann", "cg", "itd"])
def test_hpo_lowers_validation_loss(
    hpo: ModuleType, control: Any, trained: dict[str, dict[str, float]], method: str
) -> None:
    stats = trained[method]
    baseline = hpo.evaluate(control)
    assert math.isfinite(stats["val_loss"]) and math.isfinite(stats["test_acc"])
    # The control trains the same inner for the same steps: the gap is what the tuned lambdas did.
    assert stats["val_loss"] < 0.9 * baseline["val_loss"], (stats, baseline)
    assert stats["mean_lambda"] > 3 * hpo.INIT_LAMBDA, stats
    assert stats["log_lambda_std"] > 0.1, "lambdas moved in lock-step: the hypergradient is not per-feature"
    assert stats["test_acc"] > 0.9


def test_methods_agree_on_lambda(trained: dict[str, dict[str, float]]) -> None:
    # Four approximations of one hypergradient: after 30 Adam steps their lambdas stay close.
    means = {m: math.log(s["mean_lambda"]) for m, s in trained.items()}
    assert max(means.values()) - min(means.values()) < math.log(1.5), means


def test_unknown_method_is_rejected(hpo: ModuleType) -> None:
    with pytest.raises(ValueError, match="unknown method 'maml'"):
        hpo.build("maml", iters=10)


def test_main_prints_per_seed_tables_and_mean_std(hpo: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(2)
    rows = hpo.main(["--methods", "darts", "--iters", "50", "--seeds", "1", "2"])
    out = capsys.readouterr().out
    assert torch.get_num_threads() == 2, "main() must restore the caller's thread count"
    torch.set_num_threads(1)
    assert "method" in out and "val loss" in out and "test acc" in out and "mean lambda" in out
    assert [r["method"] for r in rows] == ["fixed", "grid", "darts"]
    assert out.count("[  darts] step    50") == 2 and "seed 1" in out and "seed 2" in out
    summary = out[out.index("mean ± std over 2 seeds") :].splitlines()
    assert any(line.startswith("darts") and line.count("±") == 3 for line in summary)
    for r in rows:
        assert r["seeds"] == 2 and [run["seed"] for run in r["runs"]] == [1, 2]
        losses = [run["test_loss"] for run in r["runs"]]
        assert r["test_loss"] == pytest.approx(sum(losses) / 2)
        assert r["test_loss_std"] == pytest.approx(abs(losses[0] - losses[1]) / math.sqrt(2))  # sample std
        assert all(math.isfinite(run["val_loss"]) for run in r["runs"])
    assert all(run["method"].startswith("grid ") for run in rows[1]["runs"])  # each seed's chosen lambda
