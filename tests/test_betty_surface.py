"""Betty 0.2.1's Problem/Engine surface that ported programs read, ``Env`` and ``set_dependency``.

Each behaviour is checked against Betty's semantics: the iMAML program with an ``Env``
task sampler stepped from an overridden ``Engine.train_step`` runs in Betty 0.2.1 and
here in float64 with equal parameters (1e-10); ``set_dependency`` mid-run equals a
fresh engine built with the new graph from the same state (1e-10).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mlocompile as mlo
from mlocompile import Config, Engine, EngineConfig, Env, ImplicitProblem, ProgramError


@pytest.fixture(autouse=True)
def _float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# -- iMAML with an Env (Betty's examples/implicit_maml, on linear-regression tasks) -----------
K = 3  # inner steps per task (Betty's args.inner_steps)
REG = 0.5


class TaskEnvMixin:
    """A task sampler: each ``step()`` draws a linear-regression task and splits it."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = torch.Generator().manual_seed(7)
        self.batch: dict[str, Any] = {"train": None, "test": None}
        self.steps = 0

    def step(self) -> None:
        w = torch.randn(4, 1, generator=self.gen)
        x = torch.randn(12, 4, generator=self.gen)
        y = x @ w + 0.1 * torch.randn(12, 1, generator=self.gen)
        self.batch["train"], self.batch["test"] = (x[:6], y[:6]), (x[6:], y[6:])
        self.steps += 1


class MamlOuterLoss:
    def training_step(self, batch: Any) -> Tensor:
        x, y = batch
        return F.mse_loss(self.inner(x), y)  # type: ignore[attr-defined]

    def get_batch(self) -> Any:
        return self.env.batch["test"]  # type: ignore[attr-defined]


class MamlInnerLoss:
    def training_step(self, batch: Any) -> Tensor:
        x, y = batch
        reg = sum(((p - q) ** 2).sum() for p, q in zip(self.parameters(), self.outer.parameters()))  # type: ignore[attr-defined]
        return F.mse_loss(self.module(x), y) + REG * reg  # type: ignore[attr-defined]

    def get_batch(self) -> Any:
        return self.env.batch["train"]  # type: ignore[attr-defined]

    def on_inner_loop_start(self) -> None:
        self.module.load_state_dict(self.outer.module.state_dict())  # type: ignore[attr-defined]


def maml_engine_class(base: type) -> type:
    class MAMLEngine(base):  # type: ignore[misc, valid-type]
        def train_step(self) -> None:  # Betty's example, verbatim
            if self.global_step % K == 1 or K == 1:
                self.env.step()
            for leaf in self.leaves:
                leaf.step(global_step=self.global_step)

    return MAMLEngine


def run_maml(lib: SimpleNamespace, iters: int, inner_type: str = "darts") -> tuple[dict[str, Tensor], Any]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    outer_net, inner_net = net, copy.deepcopy(net)
    outer_cls = type("Outer", (MamlOuterLoss, lib.ImplicitProblem), {})
    inner_cls = type("Inner", (MamlInnerLoss, lib.ImplicitProblem), {})
    outer = outer_cls(
        name="outer",
        module=outer_net,
        optimizer=torch.optim.Adam(outer_net.parameters(), lr=1e-2),  # Betty rebuilds AdamW wrongly on torch 2.x
        config=lib.Config(gradient_accumulation=2),
    )
    inner = inner_cls(
        name="inner",
        module=inner_net,
        optimizer=torch.optim.SGD(inner_net.parameters(), lr=0.1),
        config=lib.Config(type=inner_type, unroll_steps=K),
    )
    env = type("TaskEnv", (TaskEnvMixin, lib.Env), {})()
    engine = maml_engine_class(lib.Engine)(
        config=lib.EngineConfig(train_iters=iters, valid_step=10**9, **lib.engine_kwargs),
        problems=[outer, inner],
        dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
        env=env,
    )
    engine.run()
    params = {
        f"{n}.{k}": v.detach().clone()
        for n, p in (("outer", outer), ("inner", inner))
        for k, v in p.module.named_parameters()
    }
    return params, engine


@pytest.mark.betty
@pytest.mark.parametrize("backend", ["eager", "fx"])
def test_imaml_env_equals_betty(backend: str) -> None:
    pytest.importorskip("betty")
    from betty.configs import Config as BConfig
    from betty.configs import EngineConfig as BEngineConfig
    from betty.engine import Engine as BEngine
    from betty.envs import Env as BEnv
    from betty.problems import ImplicitProblem as BImplicitProblem

    iters = 4 * K * 2  # four outer updates (gradient_accumulation=2)
    betty = SimpleNamespace(
        Config=BConfig,
        EngineConfig=BEngineConfig,
        Engine=BEngine,
        Env=BEnv,
        ImplicitProblem=BImplicitProblem,
        engine_kwargs={"strategy": "cpu"},
    )
    ours = SimpleNamespace(
        Config=Config,
        EngineConfig=EngineConfig,
        Engine=Engine,
        Env=Env,
        ImplicitProblem=ImplicitProblem,
        engine_kwargs={"compile": backend, "progress": False},
    )
    ref, _ = run_maml(betty, iters)
    got, engine = run_maml(ours, iters)
    torch.manual_seed(0)
    init = dict(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).named_parameters())
    for key, value in ref.items():
        assert not torch.equal(value, init[key.split(".", 1)[1]]), f"{key} never moved in Betty"
        torch.testing.assert_close(got[key], value, rtol=1e-10, atol=1e-10, msg=lambda m, k=key: f"{k}: {m}")
    env = engine.env
    assert env.steps == iters // K and env.outer is engine.outer and engine.inner.env is env
    assert (engine.inner.count, engine.outer.count) == (iters, iters // K)
    assert engine.env.device == torch.device("cpu")


def test_user_get_batch_must_not_consume() -> None:
    class Drawing(MamlInnerLoss, ImplicitProblem):
        def get_batch(self) -> Any:
            return (torch.randn(6, 4), torch.randn(6, 1))  # a new batch every call

    net = nn.Linear(4, 1)
    outer = type("O", (MamlOuterLoss, ImplicitProblem), {})(
        name="outer", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1)
    )
    inner_net = nn.Linear(4, 1)
    inner = Drawing(name="inner", module=inner_net, optimizer=torch.optim.SGD(inner_net.parameters(), lr=0.1))
    env = type("TaskEnv", (TaskEnvMixin, Env), {})()
    env.step()
    deps = {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}
    engine = Engine(problems=[outer, inner], dependencies=deps, env=env, config=EngineConfig(progress=False))
    with pytest.raises(ProgramError, match=r"get_batch\(\) returned different batches.*train_data_loader"):
        engine.train_step()


def test_env_under_distributed_is_refused() -> None:
    net = nn.Linear(4, 1)
    p = type("P", (MamlOuterLoss, ImplicitProblem), {})(
        name="p", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1)
    )
    with pytest.raises(ProgramError, match="Env under EngineConfig.strategy='distributed'. is not supported"):
        Engine(problems=[p], dependencies={}, config=EngineConfig(strategy="distributed"), env=Env())


# -- set_dependency: a bilevel program becomes a three-level chain mid-run ------------------------
class BottomLoss:
    def training_step(self, batch: Any) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.module(x), y, reduction="none").reshape(-1, 1)
        return (torch.sigmoid(self.middle(loss.detach())) * loss).mean()


class MiddleLoss:
    def training_step(self, batch: Any) -> Tensor:
        x, y = batch
        reg = sum((p**2).sum() for p in self.module.parameters())
        return F.cross_entropy(self.bottom(x), y) + 0.5 * torch.exp(self.top()).sum() * reg


class TopLoss:
    def training_step(self, batch: Any) -> Tensor:
        (z,) = batch
        return ((torch.sigmoid(self.middle(z)) - 0.5) ** 2).mean() + 0.1 * (self.module() ** 2).sum()


class Bottom(BottomLoss, ImplicitProblem):
    pass


class Middle(MiddleLoss, ImplicitProblem):
    pass


class Top(TopLoss, ImplicitProblem):
    pass


class Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.full((1,), -1.0))

    def forward(self) -> Tensor:
        return self.v


BILEVEL = {"u2l": {"middle": ["bottom"]}, "l2u": {"bottom": ["middle"]}}
CHAIN = {"u2l": {"middle": ["bottom"], "top": ["middle"]}, "l2u": {"bottom": ["middle"], "middle": ["top"]}}
N1, N2 = 3, 4  # steps before and after the switch


def chain_data() -> dict[str, list[Any]]:
    g = torch.Generator().manual_seed(3)
    cls = [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(N1 + N2)]
    meta = [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(N1 + N2)]
    z = [(torch.randn(8, 1, generator=g),) for _ in range(N1 + N2)]
    return {"bottom": cls, "middle": meta, "top": z}


def chain_modules() -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    torch.manual_seed(1)
    bottom = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    middle = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1))
    top = Scalar()
    return {
        "bottom": (bottom, torch.optim.SGD(bottom.parameters(), lr=0.1, momentum=0.9)),
        "middle": (middle, torch.optim.Adam(middle.parameters(), lr=1e-2)),
        "top": (top, torch.optim.SGD(top.parameters(), lr=0.5)),
    }


def chain_engine(mods: Any, data: dict[str, list[Any]], deps: Any, backend: str, shift: int = 0) -> Engine:
    classes = {"bottom": Bottom, "middle": Middle, "top": Top}
    problems = {
        n: classes[n](
            name=n,
            module=mods[n][0],
            optimizer=mods[n][1],
            train_data_loader=data[n][shift:] + data[n][:shift],
            config=Config(type="neumann" if n == "middle" else "darts", neumann_iterations=2, neumann_alpha=0.5),
        )
        for n in classes
    }
    named = {kind: {problems[u]: [problems[v] for v in vs] for u, vs in edges.items()} for kind, edges in deps.items()}
    return Engine(
        problems=list(problems.values()), dependencies=named, config=EngineConfig(compile=backend, progress=False)
    )


def params_of(engine: Engine) -> dict[str, Tensor]:
    return {
        f"{n}.{k}": v.detach().clone()
        for n, p in engine.program.problems.items()
        for k, v in p.module.named_parameters()
    }


@pytest.mark.filterwarnings("ignore:the training_step of")
@pytest.mark.parametrize("backend", ["eager", "fx"])
def test_set_dependency_mid_run_equals_a_fresh_engine(backend: str) -> None:
    data = chain_data()
    engine = chain_engine(chain_modules(), data, BILEVEL, backend)
    for _ in range(N1):
        engine.train_step()
    assert [p.name for p in engine.leaves] == ["bottom", "top"] and engine.top.parents == []
    before = engine.compile().ir
    state = copy.deepcopy({n: (p.module, p.optimizer) for n, p in engine.program.problems.items()})
    engine.set_dependency(CHAIN)  # problems by name, as in every dependencies dict
    assert [p.name for p in engine.leaves] == ["bottom"] and engine.top.children == [engine.middle]
    assert engine.top.paths == [[engine.top, engine.middle, engine.top]]
    assert engine.middle.parents == [engine.top] and not engine.top.leaf
    for _ in range(N2):
        engine.train_step()
    after = engine.compile().ir
    assert "path top -u2l-> middle" in after and "path top" not in before

    fresh = chain_engine(state, data, CHAIN, backend, shift=N1)
    for _ in range(N2):
        fresh.train_step()
    ours, ref = params_of(engine), params_of(fresh)
    for key, value in ref.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-10, atol=1e-10, msg=lambda m, k=key: f"{k}: {m}")
    # the switch mattered: staying bilevel trains top (a leaf on its own) differently
    stay = chain_engine(copy.deepcopy(state), data, BILEVEL, backend, shift=N1)
    for _ in range(N2):
        stay.train_step()
    assert not torch.allclose(params_of(stay)["top.v"], ref["top.v"])
    assert (engine.bottom.count, engine.middle.count, engine.top.count) == (N1 + N2, N1 + N2, N1 + N2)


@pytest.mark.filterwarnings("ignore:the training_step of")
def test_set_dependency_rejects_a_bad_graph_and_keeps_the_old() -> None:
    engine = chain_engine(chain_modules(), chain_data(), BILEVEL, "fx")
    engine.train_step()
    program = engine.program
    with pytest.raises(ProgramError, match="no l2u path back"):
        engine.set_dependency({"u2l": {"top": ["middle"]}, "l2u": {}})
    with pytest.raises(ProgramError, match="never uses"):
        engine.set_dependency({"u2l": {"top": ["bottom"]}, "l2u": {"bottom": ["top"]}})
    assert engine.program is program and engine.compiler.program is program
    engine.train_step()


# -- attributes -----------------------------------------------------------------------------------
def small_engine(**cfg: Any) -> Engine:
    torch.manual_seed(0)
    net, wnet = (
        nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.0), nn.Linear(8, 3)),
        nn.Sequential(nn.Linear(1, 4), nn.Linear(4, 1)),
    )
    data = chain_data()

    class Meta(ImplicitProblem):
        def training_step(self, batch: Any) -> Tensor:
            x, y = batch
            return F.cross_entropy(self.bottom(x), y)

    bottom = Bottom(
        name="bottom",
        module=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        train_data_loader=data["bottom"],
        config=Config(unroll_steps=2),
    )
    middle_p = Meta(
        name="middle",
        module=wnet,
        optimizer=torch.optim.SGD(wnet.parameters(), lr=0.1),
        train_data_loader=data["middle"],
        extra_config={"note": 1},
    )
    return Engine(
        problems=[middle_p, bottom],
        dependencies={"u2l": {middle_p: [bottom]}, "l2u": {bottom: [middle_p]}},
        config=EngineConfig(progress=False, **cfg),
    )


def test_count_follows_the_schedule_and_attributes_read_like_betty() -> None:
    engine = small_engine()
    bottom, middle = engine.bottom, engine.middle
    assert (bottom.count, middle.count, bottom.cur_batch) == (0, 0, None)
    for i in range(1, 5):
        engine.train_step()
        assert bottom.count == engine.schedule.counters["bottom"].count == i
        assert middle.count == i // 2
    assert bottom.cur_batch is not None and torch.equal(bottom.cur_batch[0], chain_data()["bottom"][3][0])
    assert bottom.device == middle.device == engine.device == torch.device("cpu")
    assert bottom.is_rank_zero() and engine.is_rank_zero() and middle.cfg == {"note": 1}
    assert bottom.env is None and (bottom.leaf, middle.leaf) == (True, False)
    assert middle.paths == [[middle, bottom, middle]] and bottom.paths == []


def test_eval_mode_retraces_and_refuses_to_step() -> None:
    engine = small_engine()
    engine.train_step()
    traced = sum(key[0].problem == "bottom" for key in engine.compiler._traced)
    engine.bottom.eval()
    assert not engine.bottom.module.training
    with pytest.raises(ProgramError, match=r"\['bottom'\] are in evaluation mode.*engine.train\(\)"):
        engine.train_step()
    engine.bottom.module.train()  # the module alone: the problem is still in eval mode
    with pytest.raises(ProgramError, match="evaluation mode"):
        engine.train_step()
    engine.eval()
    engine.train()
    engine.bottom.module[1].eval()  # a submodule's mode is part of the trace key: traces again
    engine.train_step()
    assert sum(key[0].problem == "bottom" for key in engine.compiler._traced) == traced + 1


def test_log_records_into_history() -> None:
    engine = small_engine()
    engine.train_step()
    engine.bottom.log({"acc": torch.tensor(0.5), "n": 3}, global_step=7)
    engine.middle.log({"x": 1.5})
    assert engine.history[-2] == {"tag": "bottom", "step": 7, "local_step": 1, "acc": 0.5, "n": 3.0}
    assert engine.history[-1] == {"tag": "middle", "step": 0, "local_step": 0, "x": 1.5}


def test_problem_step_outside_train_step() -> None:
    engine = small_engine()
    with pytest.raises(ProgramError, match="global_step=self.global_step"):
        engine.bottom.step(global_step=5)
    engine.bottom.step()
    engine.middle.step()  # not ready (its child has not finished a window): nothing happens
    assert (engine.bottom.count, engine.middle.count) == (1, 0)
    engine.bottom.step()
    assert (engine.bottom.count, engine.middle.count) == (2, 1)
    with pytest.raises(ProgramError, match="not attached"):
        ImplicitProblem(name="x").step()


def test_iterative_problem_selects_itd() -> None:
    cfg = Config(unroll_steps=2)
    p = mlo.IterativeProblem(name="p", config=cfg)
    assert p.config.type == "itd" and cfg.type == "darts" and p.config.unroll_steps == 2
    assert mlo.HigherIterativeProblem(name="q").config.type == "itd"
    with pytest.raises(ProgramError, match="type='itd'.*type='cg'"):
        mlo.IterativeProblem(name="r", config=Config(type="cg"))


@pytest.mark.betty
def test_paths_parents_children_name_what_betty_names() -> None:
    pytest.importorskip("betty")
    from betty.configs import Config as BConfig
    from betty.configs import EngineConfig as BEngineConfig
    from betty.engine import Engine as BEngine
    from betty.problems import ImplicitProblem as BImplicitProblem

    deps = {"u2l": {"top": ["bottom"], "middle": ["bottom"]}, "l2u": {"bottom": ["middle"], "middle": ["top"]}}

    def build(engine_cls: type, base: type, config: Any, engine_config: Any) -> dict[str, Any]:
        mods = chain_modules()
        problems = {
            n: type(n, (cls, base), {})(name=n, module=mods[n][0], optimizer=mods[n][1], config=config())
            for n, cls in (("bottom", BottomLoss), ("middle", MiddleLoss), ("top", TopLoss))
        }
        named = {k: {problems[u]: [problems[v] for v in vs] for u, vs in e.items()} for k, e in deps.items()}
        engine_cls(problems=list(problems.values()), dependencies=named, config=engine_config)
        return {
            n: (
                [[q.name for q in path] for path in p.paths],
                [q.name for q in p.parents],
                [q.name for q in p.children],
                p.leaf,
            )
            for n, p in problems.items()
        }

    ref = build(BEngine, BImplicitProblem, BConfig, BEngineConfig(strategy="cpu"))
    ours = build(Engine, ImplicitProblem, Config, EngineConfig(progress=False))
    assert ours == ref
    assert ref["top"][0] == [["top", "middle", "bottom", "top"]]  # a two-hop path, reversed as Betty lists it
