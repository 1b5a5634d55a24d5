"""Betty 0.2.1's examples ported with only the imports changed: logistic-regression HPO,
learning-to-reweight (Meta-Weight-Net) and iMAML (issue 12, item 7).

Each port lives in ``tests/betty_ports/<name>.py``, written once against a library
namespace (``BETTY`` / ``ours(backend)`` below); its docstring lists what was shrunk or
removed. Every case runs the program for 20 ``train_step``s in float64 under Betty and
under mlocompile (eager and fx) and compares every parameter (rtol 1e-6, atol 1e-8), and
the optimizer state where it holds the hypergradients (Adam moments). Where Betty cannot
run the example (``HigherIterativeProblem``) or its math is wrong (CG beyond one
iteration / ``cg_alpha != 1``), mlocompile is compared with a hand-written torch.autograd
reference instead, and Betty's failure is asserted. Time to the first step (Engine build +
first ``train_step``, wall seconds) and the slowest later step (where an upper's step is
first traced) are printed for each run, not asserted (the machine is shared).

What the ports change besides imports, for mlocompile: Betty's in-place
``param_callback(self)`` becomes the functional form (logistic regression), ``.item()`` in
a ``training_step`` stays a tensor (Meta-Weight-Net, iMAML). For Betty: the parent's AdamW
is a subclass Betty can rebuild on torch 2.x (iMAML, see ``BettyAdamW``). Betty's
``HigherIterativeProblem`` needs the ``higher`` package (``pip install --no-deps higher``).
"""

from __future__ import annotations

import copy
import importlib.util
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor

pytest.importorskip("betty")

from betty.configs import Config as BettyConfig  # noqa: E402
from betty.configs import EngineConfig as BettyEngineConfig  # noqa: E402
from betty.engine import Engine as BettyEngine  # noqa: E402
from betty.envs import Env as BettyEnv  # noqa: E402
from betty.problems import HigherIterativeProblem as BettyHigherIterativeProblem  # noqa: E402
from betty.problems import ImplicitProblem as BettyImplicitProblem  # noqa: E402
from betty.problems import IterativeProblem as BettyIterativeProblem  # noqa: E402

import mlocompile  # noqa: E402
from tests.betty_ports import implicit_maml, learning_to_reweight, logistic_regression_hpo  # noqa: E402

pytestmark = pytest.mark.betty

STEPS = 20
TOL: dict[str, float] = {"rtol": 1e-6, "atol": 1e-8}

class BettyAdamW(torch.optim.AdamW):
    """torch.optim.AdamW that Betty 0.2.1 can rebuild on torch 2.x.

    Betty rebuilds each optimizer as ``cls(params, **optimizer.defaults)``; torch 2.x's
    AdamW lists ``decoupled_weight_decay`` in its defaults but does not take it as an
    argument, so Betty fails with TypeError. Same class and update otherwise.
    """

    def __init__(self, params: Any, decoupled_weight_decay: bool = True, **kwargs: Any) -> None:
        assert decoupled_weight_decay
        super().__init__(params, **kwargs)


BETTY = SimpleNamespace(
    name="betty",
    Engine=BettyEngine,
    Config=BettyConfig,
    EngineConfig=BettyEngineConfig,
    ImplicitProblem=BettyImplicitProblem,
    IterativeProblem=BettyIterativeProblem,
    HigherIterativeProblem=BettyHigherIterativeProblem,
    Env=BettyEnv,
    AdamW=BettyAdamW,
    # never move anything to a GPU: both libraries compute on CPU in float64
    engine_kwargs={"strategy": "cpu"},
)


def ours(backend: str) -> SimpleNamespace:
    return SimpleNamespace(
        name="mlocompile",
        Engine=mlocompile.Engine,
        Config=mlocompile.Config,
        EngineConfig=mlocompile.EngineConfig,
        ImplicitProblem=mlocompile.ImplicitProblem,
        IterativeProblem=mlocompile.IterativeProblem,
        HigherIterativeProblem=mlocompile.HigherIterativeProblem,
        Env=mlocompile.Env,
        AdamW=torch.optim.AdamW,
        engine_kwargs={"compile": backend, "progress": False},
    )


@pytest.fixture(autouse=True)
def _float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def run_timed(build: Callable[[], Any], label: str) -> tuple[Any, float, float]:
    """Build an engine and ``run()`` it; return it, the time to its first step and the total.

    The steps are timed through an instance attribute, which both libraries' ``run()``
    call (``self.train_step()``); the slowest step is printed too (where an upper's step
    is traced, when it first steps).
    """
    t0 = time.perf_counter()
    engine = build()
    ends: list[float] = []
    step = engine.train_step

    def timed_step() -> None:
        step()
        ends.append(time.perf_counter())

    engine.train_step = timed_step
    engine.run()
    total = time.perf_counter() - t0
    assert len(ends) == STEPS
    durations = [b - a for a, b in zip([t0, *ends[:-1]], ends, strict=True)][1:]
    slowest = max(range(len(durations)), key=durations.__getitem__)
    print(
        f"[{label}] time to first step {ends[0] - t0:.2f} s, slowest later step {durations[slowest]:.2f} s "
        f"(global step {slowest + 2}), {len(ends)} steps in {total:.2f} s"
    )
    return engine, ends[0] - t0, total


def params_of(engine: Any, names: list[str]) -> dict[str, Tensor]:
    return {
        f"{n}.{k}": v.detach().clone() for n in names for k, v in getattr(engine, n).module.named_parameters()
    }


def optimizer_states(engine: Any, names: list[str]) -> dict[str, Tensor]:
    """Every tensor of each problem's optimizer state (momentum buffers, Adam moments, steps)."""
    out = {}
    for n in names:
        for idx, state in getattr(engine, n).optimizer.state_dict()["state"].items():
            for k, v in state.items():
                out[f"{n}.{idx}.{k}"] = torch.as_tensor(v, dtype=torch.float64)
    return out


def assert_same_params(
    got: dict[str, Tensor], ref: dict[str, Tensor], init: dict[str, Tensor], against: str = "betty"
) -> float:
    """Every parameter equal to the reference's (and moved from its initial value); return max relative diff."""
    assert got.keys() == ref.keys()
    worst = 0.0
    for key, value in ref.items():
        assert not torch.equal(value, init[key]), f"{key} never changed in {against}"
        torch.testing.assert_close(got[key], value, **TOL, msg=lambda m, k=key: f"{k}: {m}")
        rel = ((got[key] - value).abs() / value.abs().clamp(min=1e-12)).max().item()
        worst = max(worst, rel)
    print(f"max relative |mlocompile - {against}| = {worst:.3e}")
    return worst


# -- logistic_regression_hpo ---------------------------------------------------------------------
LR_NAMES = ["outer", "inner"]


def lr_initial() -> dict[str, Tensor]:
    return {
        **{f"outer.{k}": v.detach().clone() for k, v in logistic_regression_hpo.ParentNet().named_parameters()},
        **{f"inner.{k}": v.detach().clone() for k, v in logistic_regression_hpo.ChildNet().named_parameters()},
    }


def val_loss(engine: Any) -> float:
    x, y = logistic_regression_hpo.make_data(0)["valid"]
    with torch.no_grad():
        return torch.nn.functional.binary_cross_entropy_with_logits(engine.inner.module(x)[0], y).item()


@pytest.mark.parametrize("backend", ["eager", "fx"])
@pytest.mark.parametrize("child_type", ["darts", "neumann", "cg"])
def test_logistic_regression_implicit(child_type: str, backend: str) -> None:
    """logistic_regression_implicit.py: darts, neumann (3 iterations), cg (1 iteration, alpha 1)."""
    port = logistic_regression_hpo
    ref_engine, _, _ = run_timed(lambda: port.build(BETTY, "implicit", child_type), f"lr-{child_type} betty")
    engine, _, _ = run_timed(lambda: port.build(ours(backend), "implicit", child_type), f"lr-{child_type} {backend}")
    ref = params_of(ref_engine, LR_NAMES)
    assert_same_params(params_of(engine, LR_NAMES), ref, lr_initial())
    # the penalties stayed clamped positive (param_callback), and moved away from 1
    assert (ref["outer.w"] >= 1e-8).all() and not torch.allclose(ref["outer.w"], torch.ones(20))
    assert engine.outer.count == STEPS // 5 and engine.inner.count == STEPS


def lr_reference(method: str, windows: int = STEPS // 5, unroll: int = 5) -> dict[str, Tensor]:
    """The logistic-regression HPO program written out in torch.autograd, for where Betty fails.

    ``method="itd"``: reverse mode through each 5-step unroll from w = 0 (``higher``'s
    ``track_higher_grads=True``); ``method="cg3"``: the implicit hypergradient
    ``-∂²L/∂λ∂w · α x`` with ``x`` from 3 textbook conjugate-gradient iterations on
    ``(α H) x = ∂L_val/∂w`` (α = 0.1), H and the mixed second derivative formed as explicit
    20x20 matrices (``torch.autograd.functional``). The parent is SGD(lr=1, momentum=0.9)
    followed by the clamp at 1e-8; the child SGD(lr=0.1).
    """
    data = logistic_regression_hpo.make_data(0, split="fixed" if method == "cg3" else "random")
    (xt, yt), (xv, yv) = data["train"], data["valid"]
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def train_loss(w: Tensor, lam: Tensor) -> Tensor:
        return bce(xt @ w, yt) + 0.5 * (w.unsqueeze(0) @ torch.diag(lam) @ w.unsqueeze(1)).sum()

    def valid_loss(w: Tensor) -> Tensor:
        return bce(xv @ w, yv)

    lam, buf = torch.ones(20), None
    w = torch.zeros(20)
    for _ in range(windows):
        lam_v = lam.clone().requires_grad_(method == "itd")
        w = torch.zeros(20)  # on_inner_loop_start
        for _ in range(unroll):
            (g,) = torch.autograd.grad(train_loss(w.requires_grad_() if w.is_leaf else w, lam_v), w,
                                       create_graph=method == "itd")
            w = w - 0.1 * g
        if method == "itd":
            (hyper,) = torch.autograd.grad(valid_loss(w), lam_v)
            w = w.detach()
        else:
            w = w.detach()
            alpha = 0.1
            v = torch.autograd.functional.jacobian(valid_loss, w)
            hess = torch.autograd.functional.hessian(lambda w_: train_loss(w_, lam), w)
            mixed = torch.autograd.functional.jacobian(
                lambda l_: torch.autograd.functional.jacobian(lambda w_: train_loss(w_, l_), w, create_graph=True),
                lam,
            )  # mixed[i, j] = ∂²L / ∂w_i ∂λ_j
            a = alpha * hess
            x, r = torch.zeros(20), v.clone()
            p = r.clone()
            for _ in range(3):
                step = (r @ r) / (p @ a @ p)
                x = x + step * p
                r_new = r - step * (a @ p)
                p = r_new + (r_new @ r_new) / (r @ r) * p
                r = r_new
            hyper = -(mixed.T @ (alpha * x))
        buf = hyper.clone() if buf is None else 0.9 * buf + hyper
        lam = (lam - 1.0 * buf).clamp(min=1e-8)
    return {"outer.w": lam, "inner.w": w}


@pytest.mark.parametrize("backend", ["eager", "fx"])
def test_logistic_regression_higher_iterative(backend: str) -> None:
    """logistic_regression.py: the child a HigherIterativeProblem, the parent first_order=False.

    Betty 0.2.1 cannot run this example: ``HigherIterativeProblem.patch_module`` is called
    once by ``Problem.initialize`` (``patch_everything``) and again at the first step, and
    ``higher`` refuses to monkey-patch its own patched module ("Monkey-patching
    monkey-patched modules is untested uncharted territory"), so the first ``train_step``
    raises ValueError; Betty's torch.func ``IterativeProblem`` in its place fails when built
    (``initialize_optimizer_state``: KeyError 'params'). Both checked below. mlocompile's run
    is compared with a hand-written torch.autograd unroll instead (``lr_reference("itd")``).
    """
    port = logistic_regression_hpo
    if importlib.util.find_spec("higher") is None:  # Betty's HigherIterativeProblem needs it
        with pytest.raises(ImportError, match="requires higher"):
            port.build(BETTY, "higher")
    else:
        with pytest.raises(ValueError, match="Monkey-patching monkey-patched modules"):
            port.build(BETTY, "higher").run()
    betty_torch_func = SimpleNamespace(**{**vars(BETTY), "HigherIterativeProblem": BETTY.IterativeProblem})
    with pytest.raises(KeyError, match="params"):
        port.build(betty_torch_func, "higher")

    engine, _, _ = run_timed(lambda: port.build(ours(backend), "higher"), f"lr-higher {backend}")
    assert engine.inner.config.type == "itd" and engine.outer.config.first_order is False
    ref = lr_reference("itd")
    assert_same_params(params_of(engine, LR_NAMES), ref, lr_initial(), "torch.autograd unroll")
    assert engine.outer.count == STEPS // 5


@pytest.mark.parametrize("backend", ["eager", "fx"])
def test_logistic_regression_test_py(backend: str) -> None:
    """test.py: fixed split, the child cg with 3 iterations and cg_alpha=0.1.

    Betty's CG is wrong there (it updates the residual with the unscaled ``hvp`` while its
    step size uses ``cg_alpha * hvp``, and builds the next direction from the old residual),
    so mlocompile is compared with a hand-written textbook CG on explicit matrices
    (``lr_reference("cg3")``), and Betty is shown to differ from that reference.
    """
    port = logistic_regression_hpo
    engine, _, _ = run_timed(lambda: port.build(ours(backend), "test"), f"lr-test.py {backend}")
    ref = lr_reference("cg3")
    assert_same_params(params_of(engine, LR_NAMES), ref, lr_initial(), "textbook cg")
    betty_engine = port.build(BETTY, "test")
    betty_engine.run()
    betty = params_of(betty_engine, LR_NAMES)
    assert not torch.allclose(betty["outer.w"], ref["outer.w"], **TOL)


def test_first_order_false_over_itd_lowers_means_itd() -> None:
    """first_order=False on the parent of an itd lower (Betty's logistic_regression.py) is accepted and
    trains as the default first_order=True does; over an ImplicitProblem lower it is still refused."""
    port = logistic_regression_hpo
    lib = ours("eager")
    engine = port.build(lib, "higher", train_iters=10)
    engine.run()
    default = port.build(lib, "higher", train_iters=10, parent_first_order=True)
    assert default.outer.config.first_order is True
    default.run()
    for key, value in params_of(default, LR_NAMES).items():
        assert torch.equal(params_of(engine, LR_NAMES)[key], value), key
    with pytest.raises(mlocompile.ProgramError, match="first_order=False is not supported"):
        bad = SimpleNamespace(**{**vars(lib), "HigherIterativeProblem": mlocompile.ImplicitProblem})
        port.build(bad, "higher")


# -- learning_to_reweight --------------------------------------------------------------------------
MWN_NAMES = ["outer", "inner"]


def weighted_train_loss(engine: Any) -> float:
    """The inner objective over the whole (noisy, long-tailed) train set, on a copy in train mode."""
    net, wnet = copy.deepcopy(engine.inner.module).train(), engine.outer.module
    loader = learning_to_reweight.build_dataloader(
        seed=1, num_meta_total=50, imbalanced_factor=10, corruption_type="uniform", corruption_ratio=0.4,
        batch_size=10**6,
    )[0]
    (x, y), = list(loader)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(net(x), y, reduction="none").reshape(-1, 1)
        return (wnet(loss) * loss).mean().item()


@pytest.mark.parametrize(
    ("backend", "rollback"), [("eager", False), pytest.param("fx", False, marks=pytest.mark.slow), ("eager", True)]
)
def test_learning_to_reweight(backend: str, rollback: bool, tmp_path: Any) -> None:
    """main.py / model.py (ResNet32 with BatchNorm, 1 block per stage, width 4) on synthetic CIFAR-shaped
    long-tailed noisy data: darts, as the example, also with its ``--rollback``. Parameters and optimizer
    state (SGD momentum, Adam moments: the hypergradients) equal Betty's; the LR schedule and validation
    ran in both."""
    port = learning_to_reweight
    label = f"mwn{'-rollback' if rollback else ''}"
    ref_engine, _, _ = run_timed(lambda: port.build(BETTY, rollback=rollback), f"{label} betty")
    start = None

    def build() -> Any:
        nonlocal start
        engine = port.build(ours(backend), save_dir=str(tmp_path), rollback=rollback)
        start = params_of(engine, MWN_NAMES)
        return engine

    engine, _, _ = run_timed(build, f"{label} {backend}")
    assert start is not None
    # the same initial weights (configure_module under the same seed, in the same order)
    init_engine = port.build(BETTY)
    for key, value in params_of(init_engine, MWN_NAMES).items():
        assert torch.equal(start[key], value), key
    assert_same_params(params_of(engine, MWN_NAMES), params_of(ref_engine, MWN_NAMES), start)
    ref_state, state = optimizer_states(ref_engine, MWN_NAMES), optimizer_states(engine, MWN_NAMES)
    assert state.keys() == ref_state.keys() and any(".exp_avg" in k for k in state)
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, **TOL, msg=lambda m, k=key: f"{k}: {m}")
    # the MultiStepLR milestones [13, 17] passed: lr 0.1 -> 0.001, in both
    assert engine.inner.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert ref_engine.inner.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert engine.outer.count == engine.inner.count == STEPS
    # BatchNorm running statistics differ, as documented (README, "Differences from Betty"): here they
    # advance once per forward of a step (the inner's own and the outer's loss through it), while Betty
    # also advances them in its darts re-evaluations (w+ and w-); parameters agree regardless
    # (with roll_back both restore the buffers with the parameters and redo only the inner's step)
    tracked = int(engine.inner.module.bn1.num_batches_tracked), int(ref_engine.inner.module.bn1.num_batches_tracked)
    assert tracked == ((STEPS, STEPS) if rollback else (2 * STEPS, 4 * STEPS))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{m}_{s}.pt" for m in ("net", "meta_net") for s in (10, 20)
    )
    # training did something: the weighted training objective went down from the initial weights
    assert weighted_train_loss(engine) < weighted_train_loss(init_engine)


# -- implicit_maml ---------------------------------------------------------------------------------
MAML_NAMES = ["outer", "inner"]


@pytest.mark.parametrize(
    ("child_type", "backend"),
    [("cg", "eager"), pytest.param("cg", "fx", marks=pytest.mark.slow), ("darts", "eager")],
)
def test_implicit_maml(child_type: str, backend: str) -> None:
    """main.py / models.py (ConvOmniglot with BatchNorm, hidden 8) on synthetic 5-way 5-shot 1x28x28 tasks
    from an Env, Betty's MAMLEngine.train_step, AdamW + CosineAnnealingLR on the parent with gradient
    accumulation 2: cg (1 iteration, alpha 1; the example's 3 iterations are where Betty's CG is wrong)
    and darts (the example's alternative)."""
    port = implicit_maml
    ref_engine, _, _ = run_timed(lambda: port.build(BETTY, child_type), f"imaml-{child_type} betty")
    start = None

    def build() -> Any:
        nonlocal start
        engine = port.build(ours(backend), child_type)
        start = params_of(engine, MAML_NAMES)
        return engine

    engine, _, _ = run_timed(build, f"imaml-{child_type} {backend}")
    assert start is not None
    assert_same_params(params_of(engine, MAML_NAMES), params_of(ref_engine, MAML_NAMES), start)
    ref_state, state = optimizer_states(ref_engine, ["outer"]), optimizer_states(engine, ["outer"])
    assert state.keys() == ref_state.keys() and any(".exp_avg_sq" in k for k in state)
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, **TOL, msg=lambda m, k=key: f"{k}: {m}")
    # the schedule: 10 outer local steps (5 AdamW updates), the cosine run to its end
    assert (engine.outer.count, engine.inner.count) == (ref_engine.outer.count, ref_engine.inner.count) == (10, 20)
    assert engine.outer.scheduler.last_epoch == ref_engine.outer.scheduler.last_epoch == 10
    assert engine.outer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)
    # validation (eager adaptation from the meta-parameters, as the example) ran and agrees
    assert engine.best_acc == ref_engine.best_acc > 20.0  # above 5-way chance
