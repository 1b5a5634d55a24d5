"""examples/data_reweighting.py: the data is noisy and long-tailed, and Meta-Weight-Net learns to down-weight noise."""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from programs import load_example, one_thread

ITERS = 200  # the meta-net separates clean from noisy samples within ~100 steps; a second or two per run


@pytest.fixture(scope="module")
def mwn() -> Iterator[ModuleType]:
    with one_thread():
        yield load_example("data_reweighting")


@pytest.fixture(scope="module")
def trained(mwn: ModuleType) -> Any:
    engine = mwn.build("darts", iters=ITERS, seed=0)
    engine.run()
    return engine


@pytest.fixture(scope="module")
def frozen(mwn: ModuleType) -> Any:
    """The same program with the meta-net's lr = 0: its initial weighting, never trained."""
    engine = mwn.build("darts", iters=ITERS, seed=0, meta_lr=0.0)
    engine.run()
    return engine


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_train_split_is_long_tailed_and_noisy(mwn: ModuleType, seed: int) -> None:
    data = mwn.load_data(seed)
    x, y_seen = data["train"]
    y_true, noisy = data["train_true"], data["noisy"]
    counts = torch.bincount(y_true, minlength=mwn.N_CLASSES)
    assert counts.max().item() / counts.min().item() >= 10, counts
    assert sorted(counts.tolist(), reverse=True) == mwn.class_counts()
    # every flipped label went to another class, and nothing else changed
    assert torch.equal(y_seen != y_true, noisy)
    assert noisy.sum().item() == round(mwn.NOISE * len(noisy)) and noisy.float().mean().item() >= 0.3
    # the flips reach every class, so each observed label mixes clean and noisy samples
    assert set(y_seen[noisy].tolist()) == set(range(mwn.N_CLASSES))
    for split, per_class in (("meta", mwn.N_META), ("test", mwn.N_TEST)):
        labels = data[split][1]
        assert torch.bincount(labels, minlength=mwn.N_CLASSES).tolist() == [per_class] * mwn.N_CLASSES, split
    assert 0.0 <= x.min().item() and x.max().item() <= 1.0
    assert torch.equal(mwn.load_data(seed)["train"][1], y_seen), "load_data must be deterministic per seed"


def test_class_counts_are_exponential_with_ratio_10(mwn: ModuleType) -> None:
    counts = mwn.class_counts()
    assert counts[0] == mwn.N_HEAD and counts[-1] == round(mwn.N_HEAD / 10)
    ratios = [a / b for a, b in zip(counts, counts[1:])]
    assert all(abs(r - 10 ** (1 / 9)) < 0.06 for r in ratios), ratios


@pytest.mark.parametrize("normalize", ["class", "batch", "none"])
def test_constant_weights_give_the_mean_cross_entropy(mwn: ModuleType, normalize: str) -> None:
    gen = torch.Generator().manual_seed(0)
    logits, y = torch.randn(32, 10, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    scale = 1.0 if normalize == "none" else 0.3  # normalized weights are scale-free
    loss = mwn.weighted_loss(logits, y, lambda ce: torch.full_like(ce, scale), normalize)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y))


def test_class_normalization_against_a_loop(mwn: ModuleType) -> None:
    # Reference: per label, the weighted mean CE of its samples, times the label's share of the batch.
    gen = torch.Generator().manual_seed(1)
    logits, y = torch.randn(40, 10, generator=gen), torch.randint(0, 6, (40,), generator=gen)
    w = torch.rand(40, 1, generator=gen)
    ce = F.cross_entropy(logits, y, reduction="none")
    expected = sum((y == c).sum() / len(y) * (w[y == c, 0] * ce[y == c]).sum() / w[y == c, 0].sum() for c in y.unique())
    loss = mwn.weighted_loss(logits, y, lambda _: w, "class")
    torch.testing.assert_close(loss, expected)


def test_meta_net_down_weights_mislabelled_samples(mwn: ModuleType, trained: Any, frozen: Any) -> None:
    stats, control = mwn.evaluate(trained), mwn.evaluate(frozen)
    assert stats["w_noisy"] < 0.5 * stats["w_clean"], stats
    # the untrained meta-net does not tell them apart
    assert abs(control["w_noisy"] / control["w_clean"] - 1) < 0.2, control


def test_reweighting_lowers_meta_loss_and_beats_baselines(mwn: ModuleType, trained: Any, frozen: Any) -> None:
    stats, control = mwn.evaluate(trained), mwn.evaluate(frozen)
    assert stats["meta_loss"] < 0.7 * control["meta_loss"], (stats, control)
    baseline = mwn.accuracy(mwn.fit_baseline(ITERS, 0, trained.data), trained.data["test"])
    assert stats["test_acc"] > max(control["test_acc"], baseline) + 0.05, (stats, control, baseline)


def test_unknown_method_is_rejected(mwn: ModuleType) -> None:
    with pytest.raises(ValueError, match="unknown method 'mwn'"):
        mwn.build("mwn", iters=10)


def _selected(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The study's rule, written out independently: best meta accuracy, then lowest meta loss, then earliest."""
    best_acc = max(r["meta_acc"] for r in records)
    tied = [r for r in records if r["meta_acc"] == best_acc]
    best_loss = min(r["meta_loss"] for r in tied)
    return next(r for r in tied if r["meta_loss"] == best_loss)


def test_main_reports_final_and_validation_selected_accuracy(
    mwn: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.set_num_threads(2)
    rows = mwn.main(["--seeds", "0", "1", "--iters", "20"])
    out = capsys.readouterr().out
    assert torch.get_num_threads() == 2, "main() must restore the caller's thread count"
    torch.set_num_threads(1)
    assert "baseline final" in out and "MWN final" in out and "at val" in out and "w noisy" in out
    assert "[  darts] step    20" in out
    assert [r["seed"] for r in rows] == [0, 1]
    table = out[out.index("baseline final") :].splitlines()
    assert any(line.startswith("mean±std") and line.count("±") == 1 + 4 for line in table)  # label, 4 accuracies
    assert all(0.0 <= r["mwn_acc"] <= 1.0 and math.isfinite(r["w_clean"]) for r in rows)
    for r in rows:
        for arm in ("mwn", "baseline"):
            history = r[f"{arm}_history"]
            # one record every iters // EVALS = 1 steps, each with meta-set and test metrics
            assert [h["step"] for h in history] == list(range(1, 21)), arm
            best = _selected(history)
            assert (r[f"{arm}_selected_step"], r[f"{arm}_selected_acc"]) == (best["step"], best["test_acc"]), arm
        # the engine's last record is the model the final accuracy was measured on
        assert r["mwn_history"][-1]["test_acc"] == r["mwn_acc"]
        assert r["baseline_history"][-1]["test_acc"] == r["baseline_acc"]


def test_selection_never_reads_test_accuracy(mwn: ModuleType) -> None:
    records = [
        {"step": 10, "meta_acc": 0.80, "meta_loss": 0.70, "test_acc": 0.95},
        {"step": 20, "meta_acc": 0.85, "meta_loss": 0.60, "test_acc": 0.10},
        {"step": 30, "meta_acc": 0.85, "meta_loss": 0.50, "test_acc": 0.20},  # a tie on accuracy: lower loss wins
        {"step": 40, "meta_acc": 0.70, "meta_loss": 0.40, "test_acc": 0.99},
    ]
    assert mwn.select_step(records)["step"] == 30
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):  # any test accuracies: the same step
        shuffled = [{**r, "test_acc": torch.rand(1, generator=gen).item()} for r in records]
        assert mwn.select_step(shuffled)["step"] == 30
    assert mwn.select_step([{k: v for k, v in r.items() if k != "test_acc"} for r in records])["step"] == 30
    with pytest.raises(ValueError, match="no validation records"):
        mwn.select_step([])


def test_baseline_history_describes_the_model_at_each_step(mwn: ModuleType, trained: Any) -> None:
    history: list[dict[str, Any]] = []
    mwn.fit_baseline(40, 0, trained.data, history=history)
    assert [h["step"] for h in history] == list(range(2, 41, 2))
    # the record at step 30 is what training for 30 steps alone gives (same batches, same init)
    alone = mwn.fit_baseline(30, 0, trained.data)
    assert history[14]["step"] == 30
    assert history[14]["test_acc"] == mwn.accuracy(alone, trained.data["test"])
    assert history[14]["meta_acc"] == mwn.accuracy(alone, trained.data["meta"])


def test_engine_records_validation_every_iters_over_evals(mwn: ModuleType, trained: Any) -> None:
    records = mwn.validation_records(trained.history)
    every = ITERS // mwn.EVALS
    assert [r["step"] for r in records] == list(range(every, ITERS + 1, every))
    assert {"meta_loss", "meta_acc", "test_acc", "w_clean", "w_noisy"} <= set(records[-1])
    assert records[-1]["test_acc"] == mwn.evaluate(trained)["test_acc"]


def test_resnet_variant_tracks_running_statistics_and_evaluates_in_eval_mode(mwn: ModuleType) -> None:
    engine = mwn.build("darts", iters=3, seed=0, model="resnet")
    net = engine.inner.module
    engine.run()
    bn = net.stem[1]
    # 3 classifier steps and 3 meta steps each ran one train-mode forward of the classifier
    # (validation ran in eval mode and advanced nothing)
    assert int(bn.num_batches_tracked) == 6 and net.training
    before = bn.running_mean.clone()
    stats = mwn.evaluate(engine)
    assert torch.equal(bn.running_mean, before) and net.training and 0.0 <= stats["test_acc"] <= 1.0
