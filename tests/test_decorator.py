"""The decorator API: problems from loss functions, dependencies inferred from traced use."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlocompile as mlo
from programs import mwn_data


def _decorated(method: str = "darts", inner_level: int = 0, outer_level: int = 1):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    wnet = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))

    @mlo.problem(
        level=inner_level,
        module=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        train_data_loader=mwn_data(0),
        config=mlo.Config(type=method),
    )
    def inner(self, batch):
        x, t = batch
        per = F.cross_entropy(self.module(x), t, reduction="none").reshape(-1, 1)
        return (torch.sigmoid(self.outer(per.detach())) * per).mean()

    @mlo.problem(
        level=outer_level,
        module=wnet,
        optimizer=torch.optim.Adam(wnet.parameters(), lr=1e-2),
        train_data_loader=mwn_data(1),
    )
    def outer(self, batch):
        x, t = batch
        return F.cross_entropy(self.inner(x), t)

    return inner, outer


def test_decorated_functions_become_problems():
    inner, outer = _decorated()
    assert isinstance(inner, mlo.Problem) and inner.name == "inner" and inner.level == 0
    assert outer.config.type == "darts"


def test_dependencies_are_inferred_from_use():
    inner, outer = _decorated()
    engine = mlo.Engine(problems=[inner, outer])
    assert engine.program.edges("u2l") == [("outer", "inner")]
    assert engine.program.edges("l2u") == [("inner", "outer")]
    assert [str(p) for p in engine.program.paths["outer"]] == ["outer -u2l-> inner"]


def test_inferred_program_trains_like_the_class_api():
    from programs import mwn_engine

    inner, outer = _decorated()
    engine = mlo.Engine(problems=[outer, inner], config=mlo.EngineConfig(train_iters=4))
    engine.run()
    reference = mwn_engine("darts")
    reference.config.train_iters = 4
    reference.run()
    for a, b in zip(outer.module.parameters(), reference.program.problems["outer"].module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_explicit_dependencies_win_and_undeclared_use_is_reported():
    inner, outer = _decorated()
    # declare only the l2u edge: the u2l use of outer inside inner's loss is undeclared
    engine = mlo.Engine(problems=[inner, outer], dependencies={"u2l": {}, "l2u": {inner: [outer]}})
    assert engine.program.edges("u2l") == []
    with pytest.warns(UserWarning, match="training_step of 'inner' uses 'outer' but no dependency connects them"):
        engine.train_step()


def test_missing_levels_and_same_level_use_are_errors():
    inner, outer = _decorated()
    inner.level = None
    with pytest.raises(mlo.ProgramError, match=r"problems \['inner'\] have no level"):
        mlo.Engine(problems=[inner, outer])
    inner, outer = _decorated(outer_level=0)
    with pytest.raises(mlo.ProgramError, match="uses 'outer' on the same level"):
        mlo.Engine(problems=[inner, outer])


def test_declared_levels_must_agree_with_explicit_edges():
    inner, outer = _decorated(inner_level=2, outer_level=1)
    with pytest.raises(mlo.ProgramError, match="declared levels are 2 and 1"):
        mlo.Engine(problems=[inner, outer], dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
