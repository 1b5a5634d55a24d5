"""RMSprop, Adagrad, Adadelta, Adamax, NAdam and RAdam lowered: parity, tracing, itd, checkpoints.

- 50 steps of the functional update against ``torch.optim`` (float64 and float32), on
  seeded gradients: parameters and optimizer state bit for bit.
- Through the Engine: a bilevel program (per-feature L2 for logistic regression, darts)
  with these optimizers on both levels, 50 steps under eager and fx, against Betty 0.2.1
  running the identical program on ``torch.optim`` (parameters and state to 1e-12).
- itd through 3 unrolled updates of each optimizer (from a primed, nonzero state) against
  a hand-written ``torch.autograd`` unroll of the textbook formulas (1e-10).
- A checkpoint saved mid-run and loaded into a new engine continues bit for bit.
- Options that are not reproduced raise ProgramError naming the option.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_optim import clone_params, grad_sequence, make_params, pure_update, run_functional, run_real
from torch import Tensor, nn
from torch.fx.experimental.proxy_tensor import make_fx

import mlocompile as mlo
from mlocompile.errors import ProgramError
from mlocompile.optim import lower_optimizer
from programs import Vec

optim = torch.optim
CONFIGS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "rmsprop": (optim.RMSprop, {"lr": 1e-2}),
    "rmsprop_centered_momentum_wd": (
        optim.RMSprop,
        {"lr": 1e-2, "alpha": 0.9, "centered": True, "momentum": 0.9, "weight_decay": 0.05},
    ),
    "rmsprop_momentum_maximize": (optim.RMSprop, {"lr": 1e-2, "momentum": 0.5, "maximize": True}),
    "rmsprop_centered": (optim.RMSprop, {"lr": 1e-2, "centered": True}),
    "adagrad": (optim.Adagrad, {"lr": 0.1}),
    "adagrad_all": (
        optim.Adagrad,
        {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.05, "initial_accumulator_value": 0.3, "eps": 1e-8},
    ),
    "adagrad_maximize": (optim.Adagrad, {"lr": 0.1, "maximize": True}),
    "adadelta": (optim.Adadelta, {}),
    "adadelta_wd_maximize": (
        optim.Adadelta,
        {"lr": 0.5, "rho": 0.8, "weight_decay": 0.05, "eps": 1e-5, "maximize": True},
    ),
    "adamax": (optim.Adamax, {}),
    "adamax_wd_maximize": (optim.Adamax, {"lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 0.05, "maximize": True}),
    "nadam": (optim.NAdam, {"lr": 1e-2}),
    "nadam_wd_momentum_decay": (optim.NAdam, {"lr": 1e-2, "weight_decay": 0.05, "momentum_decay": 0.01}),
    "nadam_decoupled_maximize": (
        optim.NAdam,
        {"lr": 1e-2, "weight_decay": 0.05, "decoupled_weight_decay": True, "maximize": True},
    ),
    "radam": (optim.RAdam, {"lr": 1e-2}),
    "radam_wd_betas": (optim.RAdam, {"lr": 1e-2, "weight_decay": 0.05, "betas": (0.8, 0.9)}),
    "radam_decoupled_maximize": (
        optim.RAdam,
        {"lr": 1e-2, "weight_decay": 0.05, "decoupled_weight_decay": True, "maximize": True},
    ),
}


def build(config: str, params: dict[str, torch.nn.Parameter]) -> torch.optim.Optimizer:
    cls, kwargs = CONFIGS[config]
    return cls(list(params.values()), foreach=False, **kwargs)


def assert_bitwise(real: torch.optim.Optimizer, ours: torch.optim.Optimizer) -> None:
    a, b = real.state_dict(), ours.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for idx, st in a["state"].items():
        assert st.keys() == b["state"][idx].keys(), idx
        for k, v in st.items():
            w = b["state"][idx][k]
            assert (v.dtype, v.device, v.shape) == (w.dtype, w.device, w.shape), (idx, k)
            assert torch.equal(v, w), (idx, k, (v - w).abs().max())


# -- the update alone, against torch.optim ----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_torch_optim_bitwise_for_50_steps(config: str, dtype: torch.dtype) -> None:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # torch keeps step / mu_product in float32 unless the default is float64
    try:
        params_a, grads = make_params(dtype), grad_sequence(50, dtype)
        params_b = clone_params(params_a)
        opt_a, opt_b = build(config, params_a), build(config, params_b)
        run_real(opt_a, params_a, grads[:5])
        run_real(opt_b, params_b, grads[:5])  # hand over from a torch-stepped state
        run_real(opt_a, params_a, grads[5:])
        run_functional(lower_optimizer(opt_b, params_b), params_b, grads[5:])
        for n in params_a:
            assert torch.equal(params_a[n], params_b[n]), (n, (params_a[n] - params_b[n]).abs().max())
        assert_bitwise(opt_a, opt_b)
        # and a later eager step continues from the written-back state
        extra = grad_sequence(1, dtype, seed=7)
        run_real(opt_a, params_a, extra)
        run_real(opt_b, params_b, extra)
        assert all(torch.equal(params_a[n], params_b[n]) for n in params_a)
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize(
    "config", ["rmsprop_centered_momentum_wd", "adagrad_all", "adadelta", "adamax", "nadam", "radam"]
)
def test_fresh_state_starts_as_torch_does(config: str) -> None:
    params_a, grads = make_params(), grad_sequence(3)
    params_b = clone_params(params_a)
    opt_a, opt_b = build(config, params_a), build(config, params_b)
    run_real(opt_a, params_a, grads)
    run_functional(lower_optimizer(opt_b, params_b), params_b, grads)  # from no state at all
    assert_bitwise(opt_a, opt_b)


@pytest.mark.parametrize(
    "config", ["rmsprop_centered_momentum_wd", "adagrad_all", "adadelta", "adamax", "nadam", "radam"]
)
def test_update_traces_pure_and_replays_bitwise(config: str) -> None:
    params = make_params()
    opt = build(config, params)
    run_real(opt, params, grad_sequence(7))  # RAdam's rectified branch starts at step 6 with these betas
    fopt = lower_optimizer(opt, params)
    inputs = ({n: p.detach().clone() for n, p in params.items()}, grad_sequence(1, seed=3)[0])
    state, hyper = fopt.read_state(), fopt.hyperparameters()
    graph = make_fx(pure_update(fopt))(*inputs, state, hyper)
    for node in graph.graph.nodes:
        if node.op == "call_function" and hasattr(node.target, "_schema"):
            assert not node.target._schema.is_mutable, node.format_node()
    torch.testing.assert_close(graph(*inputs, state, hyper), fopt.update(*inputs, state, hyper), rtol=0, atol=0)
    halved = {k: v * 0.5 for k, v in hyper.items()}  # hyperparameters are inputs, not constants
    torch.testing.assert_close(graph(*inputs, state, halved), fopt.update(*inputs, state, halved), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("make", "option"),
    [
        (lambda p: optim.RMSprop(p, capturable=True), "capturable"),
        (lambda p: optim.Adadelta(p, differentiable=True), "differentiable"),
        (lambda p: optim.NAdam(p, differentiable=True), "differentiable"),
        (lambda p: optim.RAdam(p, capturable=True), "capturable"),
        (lambda p: optim.Adamax(p, differentiable=True), "differentiable"),
        (lambda p: optim.Adagrad(p, fused=True), "fused"),
    ],
)
def test_options_not_reproduced_are_refused(make: Callable[[Any], Any], option: str) -> None:
    params = make_params()
    with pytest.raises(ProgramError, match=rf"param_groups\[0\] has {option}=True: .*construct the optimizer with"):
        lower_optimizer(make(list(params.values())), params)


def test_an_option_switched_on_later_is_refused_at_the_next_step() -> None:
    params = make_params()
    opt = build("nadam", params)
    fopt = lower_optimizer(opt, params)
    opt.param_groups[0]["capturable"] = True
    with pytest.raises(ProgramError, match="capturable=True"):
        fopt.signature()


def test_structural_flags_retrace_values_do_not() -> None:
    params = make_params()
    opt = build("rmsprop", params)
    fopt = lower_optimizer(opt, params)
    before = fopt.signature()
    opt.param_groups[0]["lr"], opt.param_groups[0]["alpha"] = 0.5, 0.7
    assert fopt.signature() == before
    opt.param_groups[0]["momentum"] = 0.3  # a momentum buffer appears: another graph
    assert fopt.signature() != before


# -- through the Engine, against Betty running the same program on torch.optim ------------------------
@pytest.fixture
def _float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class HPOInnerLoss:
    def training_step(self, batch: Any) -> Tensor:
        x, y = batch
        logits = self.module(x).squeeze(-1)
        return (
            F.binary_cross_entropy_with_logits(logits, y)
            + 0.5 * (torch.exp(self.outer()) * self.module.weight.squeeze(0) ** 2).sum()
        )


class HPOOuterLoss:
    def training_step(self, batch: Any) -> Tensor:
        x, y = batch
        return F.binary_cross_entropy_with_logits(self.inner(x).squeeze(-1), y)


def binary_batches(seed: int, n: int, d: int = 6) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=torch.Generator().manual_seed(4321))
    out = []
    for _ in range(n):
        x = torch.randn(16, d, generator=g)
        out.append((x, (torch.sigmoid(x @ w) > torch.rand(16, generator=g)).to(x.dtype)))
    return out


PAIRS = {  # inner optimizer, outer optimizer: every class on both levels
    "rmsprop/adamax": ("rmsprop_centered_momentum_wd", "adamax_wd_maximize"),
    "adagrad/nadam": ("adagrad_all", "nadam_decoupled_maximize"),
    "adadelta/radam": ("adadelta_wd_maximize", "radam_wd_betas"),
    "nadam/rmsprop": ("nadam_wd_momentum_decay", "rmsprop_centered"),
    "radam/adagrad": ("radam_decoupled_maximize", "adagrad_maximize"),
    "adamax/adadelta": ("adamax", "adadelta"),
}
ENGINE_STEPS = 50


def run_bilevel(lib: str, pair: str, backend: str = "fx") -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    if lib == "betty":
        from betty.configs import Config, EngineConfig
        from betty.engine import Engine
        from betty.problems import ImplicitProblem
    else:
        Config, EngineConfig, Engine, ImplicitProblem = mlo.Config, mlo.EngineConfig, mlo.Engine, mlo.ImplicitProblem
    torch.manual_seed(0)
    inner_mod, outer_mod = nn.Linear(6, 1), Vec(torch.full((6,), -1.0))
    inner_cfg, outer_cfg = PAIRS[pair]
    inner_cls = type("Inner", (HPOInnerLoss, ImplicitProblem), {})
    outer_cls = type("Outer", (HPOOuterLoss, ImplicitProblem), {})
    mods = {"inner": inner_mod, "outer": outer_mod}
    cfgs = {"inner": inner_cfg, "outer": outer_cfg}
    data = {"inner": binary_batches(1, 4), "outer": binary_batches(2, 3)}
    problems = {}
    for name, cls in (("inner", inner_cls), ("outer", outer_cls)):
        opt_cls, kwargs = CONFIGS[cfgs[name]]
        opt = opt_cls(mods[name].parameters(), **kwargs)
        problems[name] = cls(
            name=name, config=Config(type="darts"), module=mods[name], optimizer=opt, train_data_loader=data[name]
        )
    extra = {"strategy": "cpu"} if lib == "betty" else {"compile": backend, "progress": False}
    engine = Engine(
        problems=[problems["outer"], problems["inner"]],
        dependencies={"u2l": {problems["outer"]: [problems["inner"]]}, "l2u": {problems["inner"]: [problems["outer"]]}},
        config=EngineConfig(train_iters=ENGINE_STEPS, valid_step=10**9, **extra),
    )
    engine.run()
    return {n: (p.module, p.optimizer) for n, p in problems.items()}


def assert_close_state(ours: torch.optim.Optimizer, ref: torch.optim.Optimizer) -> float:
    a, b = ours.state_dict()["state"], ref.state_dict()["state"]
    assert a.keys() == b.keys()
    worst = 0.0
    for idx in b:
        assert a[idx].keys() == b[idx].keys()
        for k, v in b[idx].items():
            torch.testing.assert_close(
                a[idx][k], v, rtol=1e-12, atol=0, msg=lambda m, i=idx, k=k: f"state {i}.{k}: {m}"
            )
            worst = max(worst, ((a[idx][k] - v).abs() / v.abs().clamp_min(1e-300)).max().item())
    return worst


@pytest.mark.betty
@pytest.mark.usefixtures("_float64")
@pytest.mark.parametrize("backend", ["eager", "fx"])
@pytest.mark.parametrize(
    "pair", [p if p == "adagrad/nadam" else pytest.param(p, marks=pytest.mark.slow) for p in PAIRS]
)  # ~7 s each: one pair in the fast suite
def test_bilevel_engine_matches_betty_on_torch_optim(pair: str, backend: str) -> None:
    pytest.importorskip("betty")
    ref = run_bilevel("betty", pair)
    ours = run_bilevel("mlocompile", pair, backend)
    worst = 0.0
    for name in ("inner", "outer"):
        (mod, opt), (ref_mod, ref_opt) = ours[name], ref[name]
        assert type(opt) is type(ref_opt)
        for (key, p), q in zip(mod.named_parameters(), ref_mod.parameters(), strict=True):
            torch.testing.assert_close(
                p.detach(), q.detach(), rtol=1e-12, atol=0, msg=lambda m, k=key: f"{name}.{k}: {m}"
            )
            worst = max(worst, ((p - q).abs() / q.abs()).max().item())
        worst = max(worst, assert_close_state(opt, ref_opt))
        assert int(ref_opt.state_dict()["state"][0]["step"]) == ENGINE_STEPS
    print(f"{pair} {backend}: max relative difference to Betty {worst:.2e}")


# -- itd through the new optimizers, against a hand-written autograd unroll ----------------------------
ITD_CONFIGS = {  # config -> torch.optim steps taken before the engine's (a nonzero state)
    "rmsprop_centered_momentum_wd": 8,
    "rmsprop_momentum_maximize": 8,
    "adagrad_all": 8,
    "adadelta_wd_maximize": 8,
    "adamax_wd_maximize": 8,
    "nadam_wd_momentum_decay": 8,
    "nadam_decoupled_maximize": 0,
    "radam_wd_betas": 4,  # steps 5-7: rho_t crosses 5, so both branches of the rectification run
    "radam_decoupled_maximize": 0,  # steps 1-3: unrectified; at step 3 the rectification's root is of a negative number
}
K = 3
D = 5


def ridge() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    X, Xv = torch.randn(30, D, generator=g), torch.randn(20, D, generator=g)
    w = torch.randn(D, generator=g)
    return (
        X,
        X @ w + 0.3 * torch.randn(30, generator=g),
        Xv,
        Xv @ w + 0.3 * torch.randn(20, generator=g),
        0.5 + torch.rand(D, generator=g),
    )


def inner_loss(w: Tensor, lam: Tensor, X: Tensor, y: Tensor) -> Tensor:
    return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam * w * w).sum()


class RidgeInner(mlo.ImplicitProblem):
    def training_step(self, batch):
        return inner_loss(self.module(), self.outer(), *batch)


class RidgeOuter(mlo.ImplicitProblem):
    def training_step(self, batch):
        Xv, yv = batch
        return 0.5 * ((Xv @ self.inner() - yv) ** 2).mean()


def reference_step(kind: str, kw: dict[str, Any], p: Tensor, g: Tensor, st: dict[str, Any]) -> Tensor:
    """One step of the textbook algorithm (torch.optim's documentation), in plain differentiable ops."""
    lr, wd = kw.get("lr", 1.0), kw.get("weight_decay", 0.0)
    g = -g if kw.get("maximize") else g
    st["step"] += 1
    t = st["step"]
    if kind in ("nadam", "radam") and kw.get("decoupled_weight_decay"):
        p = p * (1 - lr * wd)
    else:
        g = g + wd * p
    if kind == "rmsprop":
        a = kw.get("alpha", 0.99)
        st["square_avg"] = a * st["square_avg"] + (1 - a) * g * g
        v = st["square_avg"]
        if kw.get("centered"):
            st["grad_avg"] = a * st["grad_avg"] + (1 - a) * g
            v = v - st["grad_avg"] ** 2
        denom = v.sqrt() + kw.get("eps", 1e-8)
        if kw.get("momentum", 0) > 0:
            st["momentum_buffer"] = kw["momentum"] * st["momentum_buffer"] + g / denom
            return p - lr * st["momentum_buffer"]
        return p - lr * g / denom
    if kind == "adagrad":
        st["sum"] = st["sum"] + g * g
        return p - lr / (1 + (t - 1) * kw.get("lr_decay", 0.0)) * g / (st["sum"].sqrt() + kw.get("eps", 1e-10))
    if kind == "adadelta":
        rho, eps = kw.get("rho", 0.9), kw.get("eps", 1e-6)
        st["square_avg"] = rho * st["square_avg"] + (1 - rho) * g * g
        delta = (st["acc_delta"] + eps).sqrt() / (st["square_avg"] + eps).sqrt() * g
        st["acc_delta"] = rho * st["acc_delta"] + (1 - rho) * delta * delta
        return p - lr * delta
    b1, b2 = kw.get("betas", (0.9, 0.999))
    eps = kw.get("eps", 1e-8)
    st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
    if kind == "adamax":
        st["exp_inf"] = torch.maximum(b2 * st["exp_inf"], g.abs() + eps)
        return p - lr / (1 - b1**t) * st["exp_avg"] / st["exp_inf"]
    st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
    if kind == "nadam":
        psi = kw.get("momentum_decay", 4e-3)
        mu, mu_next = b1 * (1 - 0.5 * 0.96 ** (t * psi)), b1 * (1 - 0.5 * 0.96 ** ((t + 1) * psi))
        st["mu_product"] = st["mu_product"] * mu
        denom = (st["exp_avg_sq"] / (1 - b2**t)).sqrt() + eps
        first = lr * (1 - mu) / (1 - st["mu_product"]) * g / denom
        return p - first - lr * mu_next / (1 - st["mu_product"] * mu_next) * st["exp_avg"] / denom
    # radam
    m_hat = st["exp_avg"] / (1 - b1**t)
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
    if rho_t <= 5:
        return p - lr * m_hat
    rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
    return p - lr * m_hat * rect * math.sqrt(1 - b2**t) / (st["exp_avg_sq"].sqrt() + eps)


@pytest.mark.usefixtures("_float64")
@pytest.mark.parametrize("backend", ["eager", "fx"])
@pytest.mark.parametrize("config", list(ITD_CONFIGS))
def test_itd_hypergradient_matches_hand_unrolled_autograd(config: str, backend: str) -> None:
    X, y, Xv, yv, lam0 = ridge()
    batches = [(X[i::K], y[i::K]) for i in range(K)]
    wmod, hmod = Vec(torch.linspace(-1, 1, D)), Vec(lam0)
    cls, kw = CONFIGS[config]
    opt = cls(wmod.parameters(), **kw)
    g = torch.Generator().manual_seed(9)
    for _ in range(ITD_CONFIGS[config]):
        wmod.p.grad = torch.randn(D, generator=g)
        opt.step()
    wmod.p.grad = None
    w0, state0 = wmod.p.detach().clone(), copy.deepcopy(opt.state[wmod.p])
    inner = RidgeInner("inner", mlo.Config(type="itd", unroll_steps=K), wmod, opt, train_data_loader=batches)
    outer = RidgeOuter("outer", mlo.Config(), hmod, optim.SGD(hmod.parameters(), lr=1.0), train_data_loader=[(Xv, yv)])
    engine = mlo.Engine(
        [outer, inner],
        mlo.EngineConfig(compile=backend, progress=False),
        {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
    )
    for _ in range(K):
        engine.train_step()
    hypergrad = lam0 - hmod.p.detach()  # outer: SGD with lr 1, no direct gradient

    lam = lam0.clone().requires_grad_()
    w = w0.clone()
    zero = torch.zeros(D)
    st: dict[str, Any] = {"step": 0.0, "mu_product": 1.0, "sum": zero + kw.get("initial_accumulator_value", 0.0)}
    st |= dict.fromkeys(
        ("square_avg", "grad_avg", "momentum_buffer", "acc_delta", "exp_avg", "exp_avg_sq", "exp_inf"), zero
    )
    st |= {k: (float(v) if k in ("step", "mu_product") else v.clone()) for k, v in state0.items()}
    w.requires_grad_()
    for xb, yb in batches:
        gw = torch.autograd.grad(inner_loss(w, lam, xb, yb), w, create_graph=True)[0]
        w = reference_step(cls.__name__.lower(), kw, w, gw, st)
    expected = torch.autograd.grad(0.5 * ((Xv @ w - yv) ** 2).mean(), lam)[0]
    torch.testing.assert_close(wmod.p.detach(), w.detach(), rtol=1e-12, atol=1e-14)  # the replay is the live run
    torch.testing.assert_close(hypergrad, expected, rtol=1e-10, atol=1e-13)
    assert expected.abs().min() > 1e-7  # not vacuous


# -- checkpoints ------------------------------------------------------------------------------------
@pytest.mark.usefixtures("_float64")
@pytest.mark.parametrize(
    "pair",
    [
        "adagrad/nadam",
        pytest.param("rmsprop/adamax", marks=pytest.mark.slow),
        pytest.param("adadelta/radam", marks=pytest.mark.slow),
    ],
)
def test_checkpoint_round_trip_continues_bitwise(pair: str, tmp_path: Any) -> None:
    global ENGINE_STEPS
    saved, ENGINE_STEPS = ENGINE_STEPS, 6
    try:
        straight = run_bilevel("mlocompile", pair)
    finally:
        ENGINE_STEPS = saved
    engine_a = _hpo_engine(pair)
    for _ in range(3):
        engine_a.train_step()
    path = engine_a.save(str(tmp_path / "ckpt.pt"))
    engine_b = _hpo_engine(pair)
    engine_b.load(path)
    for name in ("inner", "outer"):
        assert_bitwise(engine_a.program.problems[name].optimizer, engine_b.program.problems[name].optimizer)
    for _ in range(3):
        engine_b.train_step()
    for name in ("inner", "outer"):
        mod, opt = straight[name]
        prob = engine_b.program.problems[name]
        for p, q in zip(mod.parameters(), prob.module.parameters(), strict=True):
            assert torch.equal(p, q)
        assert_bitwise(opt, prob.optimizer)


def _hpo_engine(pair: str) -> Any:
    torch.manual_seed(0)
    inner_mod, outer_mod = nn.Linear(6, 1), Vec(torch.full((6,), -1.0))
    inner_cls = type("Inner", (HPOInnerLoss, mlo.ImplicitProblem), {})
    outer_cls = type("Outer", (HPOOuterLoss, mlo.ImplicitProblem), {})
    (ci, ki), (co, ko) = (CONFIGS[c] for c in PAIRS[pair])
    inner = inner_cls(
        name="inner",
        config=mlo.Config(),
        module=inner_mod,
        optimizer=ci(inner_mod.parameters(), **ki),
        train_data_loader=binary_batches(1, 4),
    )
    outer = outer_cls(
        name="outer",
        config=mlo.Config(),
        module=outer_mod,
        optimizer=co(outer_mod.parameters(), **ko),
        train_data_loader=binary_batches(2, 3),
    )
    return mlo.Engine(
        problems=[outer, inner],
        dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
        config=mlo.EngineConfig(train_iters=6, valid_step=10**9, progress=False),
    )
