"""Betty's DARTS, learning-by-ignoring and BERT-reweighting examples, ported by changing imports.

Each program in ``tests/betty_ports/`` (``darts``, ``learning_by_ignoring``,
``bert_reweighting``) is Betty's example written once against a ``lib`` namespace
(``tests/betty_ports/harness_b.py``), on synthetic data of the example's shapes, shrunk to
CPU size (each module's docstring says what was removed and shrunk). It runs 20 global
steps under Betty 0.2.1 and under mlocompile (eager and fx backends) from identical
weights and batches in float64; every parameter of every problem must then agree
(rtol 1e-6, atol 1e-8) and must have moved. Where the ports differ from the example
beyond the imports, it is for Betty on current torch: Betty rebuilds the BERT example's
AdamW from ``opt.defaults``, which current torch's AdamW no longer accepts, so Betty gets
an AdamW subclass that drops ``decoupled_weight_decay`` (same update).

Time to first step (Engine construction + the first ``train_step``, wall seconds) is
printed per program and library (``-s`` shows it); it is not asserted on.

Betty's math is right for all three programs here (darts, unroll_steps 1 or 5, roll_back,
dropout, BatchNorm, 3 levels), so they are compared against Betty directly. Largest
relative parameter difference after 20 steps (2026-12-02): DARTS 1.0e-14, BERT 7.4e-16
(dropout masks included), learning by ignoring 6.7e-11 (absolute 7e-13, all in
``reweight``, whose only gradient is the darts finite difference through two levels,
which divides rounding differences by its epsilon).

Time to first step measured 2026-12-02 on the shared 2-core CPU (fx; Betty in parentheses):
DARTS 117-172 s (2.4-4.2 s), learning by ignoring 57-62 s (3.2-6.1 s), BERT 4.7-5.7 s
(1.6-1.8 s); eager 0.6-6.4 s. Where DARTS' goes (fx, 117 s): four make_fx traces in real
mode, 100 s: the forward-only use checks of the two losses (4 299 nodes each, 17 + 15 s),
the classifier step (7 799 nodes, 23 s) and the arch step with its darts hypergradient
(17 275 nodes, 45 s), ~2.6 ms per traced node; graph passes 10 s; no retrace in 20 steps.
Under cProfile 28% of the time is ``traceback.extract_stack`` in the ``FakeTensorMode()``
that torch's real-mode ``extract_val`` builds for every traced op output (35 073 of them);
without it (monkeypatched, measurement only) the first step took 97 s instead of 146 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("betty")

from betty_ports import bert_reweighting, darts, harness_b, learning_by_ignoring  # noqa: E402

import mlocompile as mlo  # noqa: E402

pytestmark = pytest.mark.betty

STEPS = 20
TOL: dict[str, float] = {"rtol": 1e-6, "atol": 1e-8}
LIBS = harness_b.libs()


@pytest.fixture(autouse=True)
def _float64_one_thread() -> Iterator[None]:
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
        torch.set_num_threads(threads)


_BETTY: dict[str, Any] = {}


def betty_run(name: str, module: Any) -> tuple[Any, dict, dict]:
    """Betty's run of a port (once per session): (engine, initial params, final params)."""
    if name not in _BETTY:
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            engine, init, params, first = harness_b.run(module.build, LIBS["betty"], None, STEPS)
        finally:
            torch.set_default_dtype(old)
        print(f"\n{name}: Betty time to first step {first:.2f} s")
        _BETTY[name] = (engine, init, params)
    return _BETTY[name]


def parity(name: str, module: Any, backend: str) -> Any:
    _, init, ref = betty_run(name, module)
    engine, init_ours, ours, first = harness_b.run(module.build, LIBS["mlocompile"], backend, STEPS)
    for p in init:
        for k in init[p]:
            assert torch.equal(init[p][k], init_ours[p][k]), f"{p}.{k}: the two runs started from other weights"
    rel, rel_delta = harness_b.compare(init, ref, ours, **TOL)
    print(
        f"\n{name} [{backend}]: time to first step {first:.2f} s; max relative difference to Betty after "
        f"{STEPS} steps: parameters {rel:.2e}, their changes {rel_delta:.2e}"
    )
    return engine


# -- DARTS ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "fx"])
def test_darts_nas_equals_betty(backend: str) -> None:
    engine = parity("darts", darts, backend)
    # the validation ran (report_freq 10) and derived a genotype of the 2-node cells
    assert len(engine.genotype.normal) == 4 and len(engine.genotype.reduce) == 4
    # the search learns: the classifier's loss on its first training batch fell
    x, y = darts.cifar_like(1, 1, darts.DEFAULTS["batchsz"])[0]
    start = darts.build(LIBS["mlocompile"], train_iters=STEPS, engine_config={"compile": "eager"})
    with torch.no_grad():
        before = start.classifier.module.loss(x, start.arch(), y)
        after = engine.classifier.module.loss(x, engine.arch(), y)
    assert after < before, (after, before)


# -- learning by ignoring -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "fx"])
def test_learning_by_ignoring_equals_betty(backend: str) -> None:
    engine = parity("learning_by_ignoring", learning_by_ignoring, backend)
    records = [r for r in engine.history if "best_acc" in r]
    assert len(records) == STEPS // learning_by_ignoring.DEFAULTS["valid_step"]
    # Betty's param_groups() hook is honoured (its groups are the optimizer's): two lrs per problem
    for problem in engine.problems:
        assert [g["lr"] for g in problem.optimizer.param_groups] == [1e-4, 1e-3]


# -- BERT data reweighting -----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "fx"])
def test_bert_reweighting_equals_betty(backend: str) -> None:
    engine = parity("bert_reweighting", bert_reweighting, backend)
    assert len(engine.valid_losses) == 2  # validation at steps 10 and 20, in eval mode (no dropout)
    # reweight's own loss never reads its parameters: all it moved is by the hypergradient, and the
    # weights it gives stay in the MLP's range (0, 2)
    engine.reweight.module.eval()
    w = engine.reweight.module(torch.linspace(0, 3, 7).reshape(-1, 1))
    assert ((w > 0) & (w < 2)).all()


# -- param_groups(): honoured where it is the optimizer given, else refused -------------------------------
class _Quadratic(mlo.ImplicitProblem):
    def training_step(self, batch):
        (x,) = batch
        return F.mse_loss(self.module(x), torch.zeros(len(x), 2))


def _engine_with_groups(groups_fn: Any) -> mlo.Engine:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.Adam([{"params": net[0].parameters(), "lr": 1e-2}, {"params": net[2].parameters()}], lr=1e-3)
    cls = type("Grouped", (_Quadratic,), {"param_groups": groups_fn})
    problem = cls(name="p", module=net, optimizer=opt, train_data_loader=[(torch.randn(5, 3),)], config=mlo.Config())
    deps: dict[str, dict] = {"u2l": {}, "l2u": {}}
    return mlo.Engine(problems=[problem], dependencies=deps, config=mlo.EngineConfig(train_iters=2, progress=False))


def test_param_groups_equal_to_the_optimizer_are_honoured() -> None:
    def same(self):  # what Betty rebuilds: group 2 takes lr from the optimizer's defaults
        return [{"params": self.module[0].parameters(), "lr": 1e-2}, {"params": self.module[2].parameters()}]

    engine = _engine_with_groups(same)
    engine.run()
    assert [g["lr"] for g in engine.p.optimizer.param_groups] == [1e-2, 1e-3]


@pytest.mark.parametrize(
    "groups, says",
    [
        (lambda self: [{"params": self.module[0].parameters()}, {"params": self.module[2].parameters()}], "lr=0.001"),
        (lambda self: list(self.module.parameters()), "returns 1 groups, the optimizer has 2"),
        (lambda self: [{"params": self.module[2].parameters()}, {"params": self.module[0].parameters()}], "other"),
    ],
    ids=["other-lr", "flat-list", "other-params"],
)
def test_param_groups_that_betty_would_rebuild_differently_are_refused(groups: Any, says: str) -> None:
    with pytest.raises(mlo.ProgramError, match="defines param_groups()") as err:
        _engine_with_groups(groups)
    assert says in str(err.value)
