"""Every ``torch.optim.lr_scheduler`` class through the Engine, against a plain PyTorch loop.

Each case trains one problem (least squares, float64) for a full run of ``STEPS`` steps
with the Engine and, from identical weights and data, with a plain loop
(``loss.backward(); optimizer.step(); scheduler.step()``). The learning rates after
every step must be identical and so must the final parameters (to 1e-12; measured:
bit for bit): the parameters prove the updates used what the scheduler set, including
the momenta and betas that CyclicLR and OneCycleLR cycle. ReduceLROnPlateau steps on
``validation()``'s ``early_stopping_metric``; its reference loop calls
``scheduler.step(metric)`` at the same steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs

import mlocompile as mlo

STEPS = 30
VALID_STEP = 3
SGD: Callable[[Any], torch.optim.Optimizer] = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)  # noqa: E731
ADAM: Callable[[Any], torch.optim.Optimizer] = lambda p: torch.optim.Adam(p, lr=0.05)  # noqa: E731
RMSPROP: Callable[[Any], torch.optim.Optimizer] = lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5)  # noqa: E731

SCHEDULERS: dict[str, tuple[Callable[[Any], torch.optim.Optimizer], Callable[[Any], Any]]] = {
    "StepLR": (SGD, lambda o: lrs.StepLR(o, step_size=5, gamma=0.5)),
    "MultiStepLR": (SGD, lambda o: lrs.MultiStepLR(o, milestones=[3, 10, 20], gamma=0.3)),
    "ConstantLR": (SGD, lambda o: lrs.ConstantLR(o, factor=0.3, total_iters=7)),
    "LinearLR": (ADAM, lambda o: lrs.LinearLR(o, start_factor=0.2, total_iters=10)),
    "ExponentialLR": (SGD, lambda o: lrs.ExponentialLR(o, gamma=0.9)),
    "PolynomialLR": (ADAM, lambda o: lrs.PolynomialLR(o, total_iters=20, power=2.0)),
    "CosineAnnealingLR": (SGD, lambda o: lrs.CosineAnnealingLR(o, T_max=12, eta_min=1e-3)),
    "CosineAnnealingWarmRestarts": (ADAM, lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2)),
    "CyclicLR_sgd_momentum": (SGD, lambda o: lrs.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=4)),
    "CyclicLR_adam_beta1": (ADAM, lambda o: lrs.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=4)),
    "CyclicLR_rmsprop_momentum": (RMSPROP, lambda o: lrs.CyclicLR(o, 0.001, 0.02, step_size_up=3, mode="triangular2")),
    "OneCycleLR_sgd_momentum": (SGD, lambda o: lrs.OneCycleLR(o, max_lr=0.1, total_steps=STEPS)),
    "OneCycleLR_adam_beta1": (ADAM, lambda o: lrs.OneCycleLR(o, max_lr=0.1, total_steps=STEPS, three_phase=True)),
    "LambdaLR": (SGD, lambda o: lrs.LambdaLR(o, lambda k: 1.0 / (1 + 0.3 * k))),
    "MultiplicativeLR": (ADAM, lambda o: lrs.MultiplicativeLR(o, lambda k: 0.95)),
    "SequentialLR": (
        SGD,
        lambda o: lrs.SequentialLR(
            o, [lrs.LinearLR(o, start_factor=0.1, total_iters=5), lrs.ExponentialLR(o, gamma=0.9)], milestones=[5]
        ),
    ),
    "ChainedScheduler": (
        ADAM,
        lambda o: lrs.ChainedScheduler([lrs.ConstantLR(o, factor=0.5, total_iters=4), lrs.ExponentialLR(o, 0.9)]),
    ),
    "ReduceLROnPlateau": (SGD, lambda o: lrs.ReduceLROnPlateau(o, patience=0, factor=0.5, threshold=0.3)),
}


@pytest.fixture(autouse=True)
def _float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 1, generator=g)
    out = []
    for _ in range(4):
        x = torch.randn(8, 3, generator=g)
        out.append((x, x @ w + 0.1 * torch.randn(8, 1, generator=g)))
    return out


def loss_of(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((module(x) - y) ** 2).mean()


def metric_of(module: nn.Module) -> float:
    """The validation metric: loss on a held-out batch (deterministic in the weights)."""
    with torch.no_grad():
        return float(loss_of(module, data()[0]) + 0.01 * module.weight.abs().sum())


class Regression(mlo.ImplicitProblem):
    def training_step(self, batch):
        return loss_of(self.module, batch)


class ValidatingEngine(mlo.Engine):
    def validation(self):
        return {"loss": metric_of(self.p.module)}


def group_values(opt: torch.optim.Optimizer) -> tuple[Any, ...]:
    g = opt.param_groups[0]
    return (g["lr"], g.get("momentum"), g.get("betas"))


def run_engine(case: str, backend: str) -> tuple[list[Any], nn.Module]:
    make_opt, make_sched = SCHEDULERS[case]
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    opt = make_opt(net.parameters())
    problem = Regression("p", mlo.Config(), net, opt, make_sched(opt), train_data_loader=data())
    config = mlo.EngineConfig(train_iters=1, valid_step=VALID_STEP, progress=False, compile=backend)
    engine = ValidatingEngine([problem], config, dependencies={"u2l": {}, "l2u": {}})
    seen = []
    for _ in range(STEPS):
        engine.run()  # one step (train_iters=1) and, every VALID_STEP steps, the validation
        seen.append(group_values(opt))
    return seen, net


def run_reference(case: str) -> tuple[list[Any], nn.Module]:
    make_opt, make_sched = SCHEDULERS[case]
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    opt = make_opt(net.parameters())
    sched = make_sched(opt)
    batches = data()
    seen = []
    for k in range(1, STEPS + 1):
        opt.zero_grad()
        loss_of(net, batches[(k - 1) % len(batches)]).backward()
        opt.step()
        if isinstance(sched, lrs.ReduceLROnPlateau):
            if k % VALID_STEP == 0:
                sched.step(metric_of(net))
        else:
            sched.step()
        seen.append(group_values(opt))
    return seen, net


# every case under fx; under eager too, those that write more than lr or step unusually
CASES = [(c, "fx") for c in SCHEDULERS] + [
    (c, "eager") for c in SCHEDULERS if any(s in c for s in ("Cyclic", "OneCycle", "Plateau", "Sequential"))
]


@pytest.mark.parametrize(("case", "backend"), CASES)
def test_lr_sequence_and_parameters_equal_plain_pytorch(case: str, backend: str) -> None:
    ours, net = run_engine(case, backend)
    ref, ref_net = run_reference(case)
    assert ours == ref  # lr (and momentum / betas) after every step, exactly
    assert len({v[0] for v in ref}) >= 2, "the schedule must change the learning rate, or this test cannot fail"
    if "Cyclic" in case or "OneCycle" in case:
        assert len({v[1] or v[2] for v in ref}) > 2, "momentum / beta1 must cycle"
    for a, b in zip(net.parameters(), ref_net.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=0)


def test_a_stale_momentum_would_be_caught() -> None:
    """The parameter comparison above sees the cycled momentum: fixing it changes the result."""
    _, ref_net = run_reference("CyclicLR_sgd_momentum")
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    opt = SGD(net.parameters())
    sched = lrs.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=4)
    batches = data()
    for k in range(STEPS):
        opt.zero_grad()
        loss_of(net, batches[k % len(batches)]).backward()
        opt.param_groups[0]["momentum"] = 0.9  # what a trace that baked the first momentum would use
        opt.step()
        sched.step()
    assert not torch.allclose(net.weight, ref_net.weight, rtol=1e-6, atol=0)


def _plateau_problem() -> Regression:
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    opt = SGD(net.parameters())
    return Regression("p", mlo.Config(), net, opt, lrs.ReduceLROnPlateau(opt), train_data_loader=data())


def test_plateau_without_validation_is_refused_before_the_first_step() -> None:
    with pytest.raises(mlo.ProgramError, match=r"problem 'p': ReduceLROnPlateau .* no validation\(\)"):
        mlo.Engine([_plateau_problem()], mlo.EngineConfig(progress=False), dependencies={"u2l": {}, "l2u": {}})


def test_plateau_missing_metric_raises_and_changes_nothing() -> None:
    class NoLoss(mlo.Engine):
        def validation(self):
            return {"acc": 1.0}

    problem = _plateau_problem()
    config = mlo.EngineConfig(train_iters=2, valid_step=2, progress=False)
    engine = NoLoss([problem], config, dependencies={"u2l": {}, "l2u": {}})
    with pytest.raises(mlo.ProgramError, match=r"'loss' \(EngineConfig.early_stopping_metric\).*keys: \['acc'\]"):
        engine.run()
    assert engine.global_step == 1  # the failed step (and its validation) was undone
    # the metric named by early_stopping_metric is what it reads
    engine.config.early_stopping_metric = "acc"
    engine.run()
    assert engine.global_step == 2 and problem.scheduler.best == 1.0


def test_plateau_under_distributed_is_refused() -> None:
    class Validating(mlo.Engine):
        def validation(self):
            return {"loss": 0.0}

    with pytest.raises(mlo.ProgramError, match="not supported with strategy='distributed'"):
        Validating(
            [_plateau_problem()],
            mlo.EngineConfig(strategy="distributed", progress=False),
            dependencies={"u2l": {}, "l2u": {}},
        )
