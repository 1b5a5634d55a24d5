"""examples/learning_by_ignoring.py: a three-level program that learns to ignore corrupted source samples."""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from programs import load_example, one_thread

ITERS = 100  # 100 steps of each level: the weights separate within the first few dozen


@pytest.fixture(scope="module")
def lbi() -> Iterator[ModuleType]:
    with one_thread():
        yield load_example("learning_by_ignoring")


@pytest.fixture(scope="module")
def trained(lbi: ModuleType) -> tuple[Any, torch.Tensor]:
    engine = lbi.build(iters=ITERS)
    initial = engine.reweight.module.logits.detach().clone()
    engine.run()
    return engine, initial


def test_program_is_three_levels_with_one_path(trained: tuple[Any, torch.Tensor]) -> None:
    program = trained[0].program
    assert {n: program.level(n) for n in ("pretrain", "finetune", "reweight")} == {
        "pretrain": 0,
        "finetune": 1,
        "reweight": 2,
    }
    assert [str(p) for p in program.paths["reweight"]] == ["reweight -u2l-> pretrain -l2u-> finetune"]
    assert not program.paths.get("finetune") and not program.paths.get("pretrain")


def test_reweight_learns_to_ignore_corrupted_samples(lbi: ModuleType, trained: tuple[Any, torch.Tensor]) -> None:
    engine, initial = trained
    logits = engine.reweight.module.logits.detach()
    assert torch.isfinite(logits).all()
    # reweight's loss has no direct gradient: every change below comes from the hypergradient
    assert (logits - initial).abs().mean() > 0.5, "the sample weights barely moved"
    clean, corrupt = lbi.weight_means(engine)
    assert corrupt < 0.5 * clean, f"corrupted samples kept weight {corrupt:.3f} against {clean:.3f} for clean ones"
    stats = lbi.evaluate(engine)
    assert stats["test_acc"] > 0.6 and math.isfinite(stats["val_loss"])


def test_uniform_control_matches_plain_torch_loop(lbi: ModuleType) -> None:
    # The frozen-weights engine against an independent eager loop with the Engine's schedule:
    # each global step, pretrain steps, then finetune steps against the updated pretrained weights.
    steps = 30
    engine = lbi.build(iters=steps, reweight_lr=0.0)
    engine.run()
    torch.manual_seed(0)
    pre, ft = lbi.mlp(), lbi.mlp()
    ft.load_state_dict(pre.state_dict())
    opt_pre = torch.optim.SGD(pre.parameters(), lr=lbi.PRE_LR, momentum=lbi.MOMENTUM, weight_decay=lbi.PRE_DECAY)
    opt_ft = torch.optim.SGD(ft.parameters(), lr=lbi.FT_LR, momentum=lbi.MOMENTUM)
    (xs, ys), (xt, yt) = engine.data["source"], engine.data["train"]
    for _ in range(steps):
        opt_pre.zero_grad()
        F.cross_entropy(pre(xs), ys).backward()  # equal weights: the weighted mean is the mean
        opt_pre.step()
        opt_ft.zero_grad()
        anchor = [p.detach() for p in pre.parameters()]
        prox = sum(((p - q) ** 2).sum() for p, q in zip(ft.parameters(), anchor))
        (F.cross_entropy(ft(xt), yt) + lbi.MU * prox).backward()
        opt_ft.step()
    for mine, ref in ((engine.pretrain.module, pre), (engine.finetune.module, ft)):
        for a, b in zip(mine.parameters(), ref.parameters()):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-4, atol=1e-5)
    assert lbi.weight_means(engine) == (0.5, 0.5)


def test_unknown_method_is_rejected(lbi: ModuleType) -> None:
    with pytest.raises(ValueError, match="unknown method 'maml'"):
        lbi.build(iters=1, method="maml")


def _selected(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The study's rule, written out independently: best validation accuracy, then lowest loss, then earliest."""
    best_acc = max(r["val_acc"] for r in records)
    tied = [r for r in records if r["val_acc"] == best_acc]
    best_loss = min(r["val_loss"] for r in tied)
    return next(r for r in tied if r["val_loss"] == best_loss)


def test_main_reports_final_and_validation_selected_accuracy(
    lbi: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.set_num_threads(2)
    rows = lbi.main(["--iters", "10", "--seeds", "0", "1", "--methods", "darts", "--compile", "eager"])
    out = capsys.readouterr().out
    assert torch.get_num_threads() == 2, "main() must restore the caller's thread count"
    torch.set_num_threads(1)
    assert "method" in out and "final test acc" in out and "at val" in out and "w corrupt" in out
    assert [r["method"] for r in rows] == ["target only", "target +val", "uniform", "LBI darts", "oracle"]
    assert all(r["seeds"] == 2 and math.isfinite(r["test_acc"]) for r in rows)
    table = out[out.index("final test acc") :].splitlines()
    assert any(line.startswith("LBI darts") and line.count("±") == 2 for line in table)
    assert "[ LBI darts s1] step    10" in out
    by_name = {r["method"]: r for r in rows}
    # target +val trains on the validation split: it has nothing to select a step with
    assert "selected_test_acc" not in by_name["target +val"]
    for name in ("target only", "uniform", "LBI darts", "oracle"):
        row = by_name[name]
        assert [run["seed"] for run in row["runs"]] == [0, 1]
        for run in row["runs"]:
            history = run["history"]
            assert [h["step"] for h in history] == list(range(1, 11)), name  # every iters // EVALS = 1 steps
            best = _selected(history)
            assert (run["selected_step"], run["selected_test_acc"]) == (best["step"], best["test_acc"]), name
            assert history[-1]["test_acc"] == run["test_acc"], name  # the last record is the final model
        assert row["selected_test_acc"] == pytest.approx(sum(r["selected_test_acc"] for r in row["runs"]) / 2)
        assert f"[{name:>13}] seed 1: selected step" in out


def test_selection_never_reads_test_accuracy(lbi: ModuleType) -> None:
    records = [
        {"step": 10, "val_acc": 0.90, "val_loss": 0.30, "test_acc": 0.99},
        {"step": 20, "val_acc": 0.95, "val_loss": 0.25, "test_acc": 0.10},
        {"step": 30, "val_acc": 0.95, "val_loss": 0.20, "test_acc": 0.20},  # a tie on accuracy: lower loss wins
    ]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):  # any test accuracies: the same step
        shuffled = [{**r, "test_acc": torch.rand(1, generator=gen).item()} for r in records]
        assert lbi.select_step(shuffled)["step"] == 30
    assert lbi.select_step([{k: v for k, v in r.items() if k != "test_acc"} for r in records])["step"] == 30


def test_target_only_history_describes_the_model_at_each_step(lbi: ModuleType) -> None:
    data = lbi.load_data(0)
    history: list[dict[str, Any]] = []
    final = lbi.target_only(40, data, 0, history=history)
    assert [h["step"] for h in history] == list(range(2, 41, 2)) and history[-1]["test_acc"] == final
    assert history[14]["step"] == 30 and history[14]["test_acc"] == lbi.target_only(30, data, 0)
    with pytest.raises(ValueError, match="cannot select a step"):
        lbi.target_only(4, data, 0, ("train", "val"), history=[])
