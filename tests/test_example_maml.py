"""examples/maml.py: tasks line up across the two problems, the hypergradient is MAML's, and meta-training helps."""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from programs import load_example, one_thread

META_STEPS = 100  # with meta_lr 1e-2: the 1-step query MSE drops from 4.2 to 3.0; ~3 s


@pytest.fixture(scope="module")
def maml() -> Iterator[ModuleType]:
    with one_thread():
        yield load_example("maml")


@pytest.fixture(scope="module")
def test_tasks(maml: ModuleType) -> list[dict[str, Any]]:
    return maml.sample_tasks(50, seed=123, n_query=maml.TEST_QUERY)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in module.named_parameters()}


def test_tasks_are_sinusoids_in_range(maml: ModuleType) -> None:
    tasks = maml.sample_tasks(200, seed=0)
    for task in tasks:
        assert 0.1 <= task["amp"] <= 5.0 and 0.0 <= task["phase"] <= math.pi
        for (x, y), n in ((task["support"], maml.K_SUPPORT), (task["query"], maml.K_QUERY)):
            assert x.shape == y.shape == (n, 1)
            assert x.min().item() >= -5.0 and x.max().item() <= 5.0
            torch.testing.assert_close(y, task["amp"] * torch.sin(x - task["phase"]))
    amps = torch.tensor([t["amp"] for t in tasks])
    assert amps.min().item() < 0.5 and amps.max().item() > 4.5, "amplitudes should cover U[0.1, 5]"
    again = maml.sample_tasks(200, seed=0)
    assert all(torch.equal(a["support"][0], b["support"][0]) for a, b in zip(tasks, again))


def test_both_problems_see_the_same_task(maml: ModuleType) -> None:
    # Drive the real schedule and check, every time the meta problem has stepped, that
    # the adapted model's last batch is the support set of the task whose query set
    # the meta problem just used, and that every step of the window used that task.
    steps, meta_batch = 3, 2
    engine = maml.build(iters=3, seed=0, steps=steps, meta_batch=meta_batch)
    tasks = maml.sample_tasks(3 * meta_batch, seed=0)
    for t in range(3 * meta_batch * steps):
        engine.train_step()
        task = tasks[t // steps]
        assert torch.equal(engine.adapt.cur_batch[0], task["support"][0]), t
        if (t + 1) % steps == 0:
            assert torch.equal(engine.meta.cur_batch[0], task["query"][0]), t


def test_adaptation_restarts_from_the_meta_parameters(maml: ModuleType) -> None:
    engine = maml.build(iters=2, seed=0, steps=2, meta_batch=1)
    tasks = maml.sample_tasks(2, seed=0)
    for task in tasks:
        start = _params(engine.meta.module)  # before the window: the initialization it must start from
        engine.train_step()
        x, y = task["support"]
        model = maml.make_regressor()
        model.load_state_dict(start)
        loss = F.mse_loss(model(x), y)
        grads = dict(zip(start, torch.autograd.grad(loss, list(model.parameters()))))
        for k, p in engine.adapt.module.named_parameters():
            torch.testing.assert_close(p.detach(), start[k] - maml.INNER_LR * grads[k], rtol=1e-5, atol=1e-6)
        engine.train_step()  # the window's second step; then the meta problem steps


@pytest.mark.parametrize("steps", [1, 2])
def test_meta_gradient_is_second_order_maml(maml: ModuleType, steps: int) -> None:
    # Adam's first step stores exp_avg = (1 - beta1) * grad: the gradient the engine used.
    # Reference: autograd through `steps` hand-written SGD steps from the initialization.
    engine = maml.build(iters=1, seed=0, steps=steps, meta_batch=1)
    init = {k: p.detach().clone().requires_grad_(True) for k, p in engine.meta.module.named_parameters()}
    for _ in range(steps):
        engine.train_step()
    task = maml.sample_tasks(1, seed=0)[0]
    model = maml.make_regressor()
    w = dict(init)
    for _ in range(steps):
        loss = F.mse_loss(torch.func.functional_call(model, w, (task["support"][0],)), task["support"][1])
        grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
        w = {k: p - maml.INNER_LR * g for (k, p), g in zip(w.items(), grads)}
    query = F.mse_loss(torch.func.functional_call(model, w, (task["query"][0],)), task["query"][1])
    expected = dict(zip(init, torch.autograd.grad(query, list(init.values()))))
    beta1 = engine.meta.optimizer.param_groups[0]["betas"][0]
    for k, p in engine.meta.module.named_parameters():
        got = engine.meta.optimizer.state[p]["exp_avg"] / (1 - beta1)
        torch.testing.assert_close(got, expected[k], rtol=1e-4, atol=1e-6)


def test_meta_training_improves_post_adaptation_mse(maml: ModuleType, test_tasks: list[dict[str, Any]]) -> None:
    engine = maml.build(iters=META_STEPS, seed=0, steps=1, meta_lr=1e-2)
    before = _params(engine.meta.module)
    initial = maml.adapted_mse(engine.meta.module, test_tasks, (1,))[1][0]
    engine.run()
    after = _params(engine.meta.module)
    assert any(not torch.allclose(before[k], after[k]) for k in before), "the meta-parameters did not move"
    trained = maml.adapted_mse(engine.meta.module, test_tasks, (0, 1, 10))
    assert trained[1][0] < 0.85 * initial, (initial, trained)
    assert trained[10][0] < trained[0][0], trained  # adapting from the learned initialization helps


def test_main_prints_per_seed_tables_and_mean_std(maml: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(2)
    rows = maml.main(["--meta-steps", "10", "--steps", "1", "--test-tasks", "10", "--seeds", "0", "1"])
    out = capsys.readouterr().out
    assert torch.get_num_threads() == 2, "main() must restore the caller's thread count"
    torch.set_num_threads(1)
    assert "init" in out and "0 steps" in out and "10 steps" in out and "seconds" in out
    assert out.count("[maml] meta-step    10") == 2 and "seed 1:" in out
    assert [r["init"] for r in rows] == ["MAML", "pretrained"]
    summary = out[out.index("over 2 seeds") :].splitlines()
    assert any(line.startswith("pretrained") for line in summary)
    for r in rows:
        assert r["seeds"] == 2 and [run["seed"] for run in r["runs"]] == [0, 1]
        for k in (0, 1, 10):
            means = [run[k][0] for run in r["runs"]]
            assert r[k][0] == pytest.approx(sum(means) / 2)
            assert r[k][1] == pytest.approx(abs(means[0] - means[1]) / math.sqrt(2))  # sample std over seeds
