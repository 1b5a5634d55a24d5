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


def test_main_prints_table(lbi: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(2)
    rows = lbi.main(["--iters", "10", "--seeds", "0", "1", "--methods", "darts", "--compile", "eager"])
    out = capsys.readouterr().out
    assert torch.get_num_threads() == 2, "main() must restore the caller's thread count"
    torch.set_num_threads(1)
    assert "method" in out and "target test acc" in out and "w corrupt" in out
    assert [r["method"] for r in rows] == ["target only", "target +val", "uniform", "LBI darts", "oracle"]
    assert all(r["seeds"] == 2 and math.isfinite(r["test_acc"]) for r in rows)
    table = out[out.index("target test acc") :].splitlines()
    assert any(line.startswith("LBI darts") and "±" in line for line in table)
    assert "[ LBI darts s1] step    10" in out
