"""Same data, same order as Betty 0.2.1: iterators made at Engine build, peeks that draw nothing.

Meta-Weight-Net with shuffled DataLoaders (the lower on torch's global generator, the upper
with its own ``torch.Generator``) and dropout in both losses, in float64: every batch each
problem fetches, the global random state after the Engine is built and the parameters after
20 steps equal Betty running the identical program. Then the data positions survive what
mlocompile adds: peeks, checkpoints and rolled-back steps.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("betty")

from test_betty_parity import BETTY, OURS, mlp, problem_class  # noqa: E402

import mlocompile as mlo  # noqa: E402

pytestmark = pytest.mark.betty
STEPS = 20


@pytest.fixture(autouse=True)
def _float64(float64: None) -> None:
    """Every test here runs in float64."""


class Recording:
    """Keeps the sample indices of every batch ``get_batch`` hands to the step."""

    def get_batch(self) -> Any:
        batch = super().get_batch()  # type: ignore[misc]
        self.__dict__.setdefault("seen", []).append(batch[2].tolist())
        return batch


class InnerLoss(Recording):
    def training_step(self, batch: Any) -> Tensor:
        x, y, _ = batch
        loss = F.cross_entropy(self.module(F.dropout(x, 0.3)), y, reduction="none").reshape(-1, 1)
        return (torch.sigmoid(self.outer(loss.detach())) * loss).mean()


class OuterLoss(Recording):
    def training_step(self, batch: Any) -> Tensor:
        x, y, _ = batch
        return F.cross_entropy(self.inner(F.dropout(x, 0.2)), y)


def dataset(seed: int, n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g), torch.arange(n))


def build(lib: Any, inner_config: dict[str, Any] | None = None, **engine: Any) -> Any:
    """The program in ``lib`` (BETTY or OURS); 5 lower and 3 upper batches per epoch."""
    torch.manual_seed(0)
    net, wnet = mlp(10, 16, 3), mlp(1, 8, 1)
    lower_data = DataLoader(dataset(1, 40), batch_size=8, shuffle=True)
    upper_data = DataLoader(dataset(2, 24), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(7))
    inner = problem_class(lib, InnerLoss)(
        name="inner",
        module=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        train_data_loader=lower_data,
        config=lib.Config(**(inner_config or {"type": "darts"})),
    )
    outer = problem_class(lib, OuterLoss)(
        name="outer",
        module=wnet,
        optimizer=torch.optim.Adam(wnet.parameters(), lr=1e-2),
        train_data_loader=upper_data,
        config=lib.Config(),
    )
    extra = {"strategy": "cpu", **engine} if lib is BETTY else {"progress": False, **engine}
    torch.manual_seed(123)  # NOTE: the state Engine construction starts from
    return lib.Engine(
        problems=[outer, inner],
        dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
        config=lib.EngineConfig(train_iters=STEPS, valid_step=10**9, **extra),
    )


def params(engine: Any) -> dict[str, Tensor]:
    return {f"{p.name}.{k}": v.detach().clone() for p in engine.problems for k, v in p.module.named_parameters()}


def seen(engine: Any) -> dict[str, list[list[int]]]:
    return {p.name: p.__dict__.get("seen", []) for p in engine.problems}


CASES = {"darts": ({"type": "darts"}, False), "unroll2_roll_back": ({"type": "darts", "unroll_steps": 2}, True)}


@pytest.mark.parametrize("backend", ["eager", "fx"])
@pytest.mark.parametrize("case", list(CASES))
def test_batches_random_state_and_parameters_equal_betty(case: str, backend: str) -> None:
    config, roll_back = CASES[case]
    ref = build(BETTY, config, roll_back=roll_back)
    ref_rng = torch.get_rng_state()
    ours = build(OURS, config, roll_back=roll_back, compile=backend)
    assert torch.equal(torch.get_rng_state(), ref_rng)  # construction drew what Betty's drew
    init = params(ours)
    ref.run()
    torch.set_rng_state(ref_rng)  # NOTE: both runs start from the state their construction left
    ours.run()
    assert seen(ours) == seen(ref)
    lower = seen(ref)["inner"]
    assert len(lower) == STEPS and lower[0] != list(range(8)), "not shuffled"
    assert sorted(sum(lower[5:10], [])) == list(range(40))  # a whole second epoch, reshuffled
    assert lower[5:10] != lower[:5]
    want, got = params(ref), params(ours)
    for key, value in want.items():
        assert not torch.equal(value, init[key]), key
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-10, msg=key)


def _streams(engine: Any) -> list[Tensor]:
    gen = engine.outer.train_data_loader.generator
    return [torch.get_rng_state(), gen.get_state()]


@pytest.mark.parametrize("steps", [0, 7])
def test_peek_draws_nothing_and_shows_what_get_batch_returns(steps: int) -> None:
    engine = build(OURS, compile="eager")
    for _ in range(steps):
        engine.train_step()
    for problem in (engine.inner, engine.outer):
        problem.cur_batch = None  # NOTE: a peek returns the last batch if there is one
        before = _streams(engine)
        peeked = problem.peek_batch()
        peeked_again = problem.peek_batch()
        assert all(torch.equal(a, b) for a, b in zip(_streams(engine), before))
        got = problem.get_batch()
        for a, b, c in zip(peeked, peeked_again, got):
            assert torch.equal(a, b) and torch.equal(a, c)


def test_resume_from_a_checkpoint_mid_epoch_is_exact(tmp_path: Any) -> None:
    engine = build(OURS, compile="eager")
    for _ in range(7):  # mid-epoch for both: lower 2 of 5, upper 1 of 3 (generator-owning) batches
        engine.train_step()
    engine.save(str(tmp_path / "mid.pt"))
    for _ in range(8):
        engine.train_step()
    fresh = build(OURS, compile="eager")
    torch.manual_seed(999)  # the checkpoint restores every stream, whatever they are now
    fresh.outer.train_data_loader.generator.manual_seed(999)
    fresh.load(str(tmp_path / "mid.pt"))
    for _ in range(8):
        fresh.train_step()
    assert seen(fresh)["inner"] == seen(engine)["inner"][7:] and seen(fresh)["outer"] == seen(engine)["outer"][7:]
    for key, value in params(engine).items():
        assert torch.equal(params(fresh)[key], value), key


def test_a_step_that_fails_after_an_epoch_restart_is_undone_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """The upper's 4th fetch starts its second epoch (a draw from its own generator), then fails."""
    ref = build(OURS, compile="eager")
    for _ in range(6):
        ref.train_step()
    engine = build(OURS, compile="eager")
    real = type(engine.outer).get_batch
    calls = []

    def fails_once(self: Any) -> Any:
        batch = real(self)
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("data source failed")
        return batch

    monkeypatch.setattr(type(engine.outer), "get_batch", fails_once)
    failed = 0
    while engine.global_step < 6:
        lengths = {p.name: len(p.__dict__.get("seen", [])) for p in engine.problems}
        try:
            engine.global_step += 1
            engine.train_step()
        except RuntimeError:
            engine.global_step -= 1
            for p in engine.problems:  # what the failed step fetched is not seen
                del p.__dict__.setdefault("seen", [])[lengths[p.name] :]
            failed += 1
    assert failed == 1
    assert seen(engine) == seen(ref)
    for key, value in params(ref).items():
        assert torch.equal(params(engine)[key], value), key


def test_old_data_positions_are_refused_by_format(tmp_path: Any) -> None:
    engine = build(OURS, compile="eager")
    engine.save(str(tmp_path / "a.pt"))
    state = torch.load(str(tmp_path / "a.pt"), weights_only=True)
    state["format"] = 4
    torch.save(state, str(tmp_path / "old.pt"))
    with pytest.raises(mlo.CheckpointError, match="format 4, expected 5"):
        engine.load(str(tmp_path / "old.pt"))


def test_a_checkpoint_for_a_loader_without_its_generator_is_refused(tmp_path: Any) -> None:
    engine = build(OURS, compile="eager")
    engine.train_step()
    engine.save(str(tmp_path / "a.pt"))
    fresh = build(OURS, compile="eager")
    loader = fresh.outer.train_data_loader
    fresh.outer.train_data_loader = DataLoader(loader.dataset, batch_size=8, shuffle=True)  # no generator
    before = copy.deepcopy(fresh.outer.data_state())
    with pytest.raises(mlo.CheckpointError, match=r"problem 'outer'.*\[1\] torch.Generator"):
        fresh.load(str(tmp_path / "a.pt"))
    assert fresh.outer.data_state()["cursors"][0]["consumed"] == before["cursors"][0]["consumed"] == 0
