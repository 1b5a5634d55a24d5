"""Random multilevel programs, some invalid: a clear MLOError before any state changes, or eager == fx.

Each seed draws 2-4 problems on a random DAG (every problem below the top has one or two
uppers; u2l and l2u edges both ways), a random method, unroll length, gradient
accumulation, optimizer and momentum per problem, and a random engine (roll_back or not).
One case in four then gets one fault: a bad setting, an unknown method, a cycle, a
dependency the losses never use, a duplicate name, a non-scalar loss, a missing optimizer,
a batch of the wrong shape or with NaN, a loss that fails. The invariant: a faulty program
raises an ``MLOError`` (a ``NonFiniteError`` for NaN) and no parameter, optimizer state or
counter has moved; a valid one trains the same under ``eager`` and ``fx`` (float64, 1e-10).
``MLO_FUZZ_CASES=N`` runs more seeds.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlocompile as mlo

CASES = int(os.environ.get("MLO_FUZZ_CASES", "24"))
STEPS = 4
FAULTS = (
    "unroll_steps=0",
    "gradient_accumulation=-1",
    "unknown method",
    "negative alpha",
    "cycle",
    "unused dependency",
    "duplicate name",
    "non-scalar loss",
    "no optimizer",
    "bad logger_type",
    "batch of the wrong shape",
    "NaN batch",
    "loss raises",
)


class Fuzzed(mlo.ImplicitProblem):
    """A linear model; its loss mixes in the models of the problems it reads (``reads``)."""

    reads: tuple[str, ...] = ()
    fault: str | None = None

    def training_step(self, batch):
        x, t = batch
        out = self.module(x)
        for name in self.reads:
            out = out + 0.3 * torch.tanh(getattr(self, name).module(x))
        if self.fault == "non-scalar loss":
            return (out - t) ** 2
        if self.fault == "loss raises":
            raise ValueError("a bug in the user's loss")
        return F.mse_loss(out, t) + 1e-2 * sum((p**2).sum() for p in self.module.parameters())


def _program(seed: int) -> dict[str, Any]:
    """Draw a program description (plain data, so eager and fx runs build the same thing)."""
    rng = random.Random(seed)
    n = rng.randint(2, 4)
    uppers = {i: sorted(rng.sample(range(i), k=min(i, rng.choice([1, 1, 2])))) for i in range(1, n)}
    problems = []
    for i in range(n):
        problems.append(
            {
                "name": f"p{i}",
                "type": rng.choice(["darts", "neumann", "cg", "itd"]),
                "unroll_steps": rng.choice([1, 1, 2]),
                "gradient_accumulation": rng.choice([1, 1, 2]),
                "optimizer": rng.choice(["sgd", "sgd_momentum", "adam"]),
            }
        )
    fault = rng.choice(FAULTS) if rng.random() < 0.25 else None
    return {"problems": problems, "uppers": uppers, "roll_back": rng.random() < 0.25, "fault": fault, "seed": seed}


def _build(desc: dict[str, Any], backend: str) -> tuple[mlo.Engine | None, list[nn.Module], list[Any]]:
    """Build the engine; return it (None if construction raised: the error is re-raised by the caller)."""
    torch.manual_seed(desc["seed"])
    g = torch.Generator().manual_seed(desc["seed"])
    fault, uppers = desc["fault"], desc["uppers"]
    names = [p["name"] for p in desc["problems"]]
    lowers = {u: [i for i, us in uppers.items() if u in us] for u in range(len(names))}
    modules, problems = [], []
    for i, spec in enumerate(desc["problems"]):
        x, t = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)
        if fault == "batch of the wrong shape" and i == 0:
            x = torch.randn(8, 4, dtype=torch.float64)
        if fault == "NaN batch" and i == 0:
            x = torch.full_like(x, float("nan"))
        reads = [names[u] for u in uppers.get(i, [])] + [names[lo] for lo in lowers[i]]
        if fault == "unused dependency" and i == len(names) - 1:
            reads = reads[1:]  # the top problem's loss ignores one of its declared lowers
        cls = type(f"F{i}", (Fuzzed,), {"reads": tuple(reads), "fault": fault if i == 0 else None})
        module = nn.Linear(3, 1).double()
        modules.append(module)
        kind = spec["optimizer"]
        if fault == "no optimizer" and i == 0:
            opt = None
        elif kind == "adam":
            opt = torch.optim.Adam(module.parameters(), lr=1e-2)
        else:
            opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9 if kind == "sgd_momentum" else 0.0)
        cfg = mlo.Config(
            type="no-such-method" if fault == "unknown method" and i == 0 else spec["type"],
            unroll_steps=0 if fault == "unroll_steps=0" and i == 0 else spec["unroll_steps"],
            gradient_accumulation=-1 if fault == "gradient_accumulation=-1" and i == 0 else spec["gradient_accumulation"],
            darts_alpha=-1.0 if fault == "negative alpha" and i == 0 else 0.01,
            neumann_iterations=2,
            neumann_alpha=0.1,
            cg_iterations=2,
        )
        name = names[1] if fault == "duplicate name" and i == 0 else names[i]
        problems.append(cls(name, cfg, module, opt, train_data_loader=[(x, t)]))
    u2l = {problems[u]: [problems[i] for i in lowers[u]] for u in range(len(names)) if lowers[u]}
    l2u = {problems[i]: [problems[u] for u in us] for i, us in uppers.items()}
    if fault == "cycle":
        u2l.setdefault(problems[1], []).append(problems[0])  # p1 is below p0 already: now also above it
        u2l.setdefault(problems[0], []).append(problems[1])
    logger = "wandb-ish" if fault == "bad logger_type" else "none"
    config = mlo.EngineConfig(compile=backend, roll_back=desc["roll_back"], progress=False, logger_type=logger)
    engine = mlo.Engine(problems, config, {"u2l": u2l, "l2u": l2u})
    return engine, modules, [p.optimizer for p in problems]


def _snapshot(modules: list[nn.Module], optimizers: list[Any]) -> list[Any]:
    params = [p.detach().clone() for m in modules for p in m.parameters()]
    states = [len(o.state) if o is not None else None for o in optimizers]
    return [params, states]


def _unchanged(before: list[Any], modules: list[nn.Module], optimizers: list[Any]) -> bool:
    after = _snapshot(modules, optimizers)
    return all(torch.equal(a, b) for a, b in zip(before[0], after[0])) and before[1] == after[1]


def _outcome(desc: dict[str, Any], backend: str) -> tuple[str, Any]:
    """("rejected", error) at construction, ("failed", error) in a step that changed nothing, or
    ("trained", parameters) after STEPS steps."""
    try:
        engine, modules, optimizers = _build(desc, backend)
    except mlo.MLOError as exc:
        return "rejected", exc
    for _ in range(STEPS):
        before = _snapshot(modules, optimizers)
        counts = {n: c.count for n, c in engine.schedule.counters.items()}
        try:
            engine.train_step()
        except mlo.MLOError as exc:
            assert _unchanged(before, modules, optimizers), f"{desc}: {exc} changed parameters or optimizer state"
            assert {n: c.count for n, c in engine.schedule.counters.items()} == counts, f"{desc}: counters moved"
            return "failed", exc
    return "trained", [p.detach().clone() for m in modules for p in m.parameters()]


@pytest.mark.parametrize("seed", range(CASES))
def test_a_random_program_fails_clearly_before_changing_anything_or_trains_the_same_compiled(seed):
    desc = _program(seed)
    eager, fx = _outcome(desc, "eager"), _outcome(desc, "fx")
    if desc["fault"] is not None:
        assert eager[0] != "trained" and fx[0] != "trained", desc
    if eager[0] == "trained" or fx[0] == "trained":
        assert eager[0] == fx[0] == "trained", (desc, eager, fx)
        for a, b in zip(eager[1], fx[1]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert not all(torch.equal(a, b) for a, b in zip(eager[1], _build(desc, "eager")[1][0].parameters()))
    else:
        assert type(eager[1]) is type(fx[1]) or eager[0] != fx[0], (desc, eager, fx)


def test_every_fault_is_drawn():
    """The seeds the suite runs cover a useful share of the fault kinds (the rest: MLO_FUZZ_CASES=200)."""
    drawn = {_program(s)["fault"] for s in range(200)}
    assert set(FAULTS) <= drawn
