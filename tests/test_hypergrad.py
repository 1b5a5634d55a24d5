"""Hypergradients in float64 against independent references (closed forms, hand-unrolled autograd)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mlocompile as mlo
from mlocompile.hypergrad import segment_bounds
from programs import Vec

BACKENDS = ["eager", "fx"]


pytestmark = pytest.mark.usefixtures("float64")


# --- ridge regression with per-feature L2: the closed form ------------------------------------
D, N, M = 5, 40, 30


def ridge_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(N, D, generator=g), torch.randn(M, D, generator=g)
    w_true = torch.randn(D, generator=g)
    y = X @ w_true + 0.3 * torch.randn(N, generator=g)
    yv = Xv @ w_true + 0.3 * torch.randn(M, generator=g)
    lam = 0.5 + torch.rand(D, generator=g)
    return X, y, Xv, yv, lam


def ridge_inner_loss(w, lam, X, y):
    return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam * w * w).sum()


def ridge_outer_loss(w, Xv, yv):
    return 0.5 * ((Xv @ w - yv) ** 2).mean()


class RidgeInner(mlo.ImplicitProblem):
    def training_step(self, batch):
        X, y = batch
        return ridge_inner_loss(self.module(), self.outer(), X, y)


class RidgeOuter(mlo.ImplicitProblem):
    def training_step(self, batch):
        Xv, yv = batch
        return ridge_outer_loss(self.inner(), Xv, yv)


def ridge_engine(
    config: mlo.Config, backend: str, w0: torch.Tensor, inner_batches, outer_lr: float = 1.0, inner_cls=None
):
    X, y, Xv, yv, lam = ridge_data()
    wmod, hmod = Vec(w0), Vec(lam)
    inner = (inner_cls or RidgeInner)(
        "inner", config, wmod, torch.optim.SGD(wmod.parameters(), lr=0.1, momentum=0.9), train_data_loader=inner_batches
    )
    outer = RidgeOuter(
        "outer", mlo.Config(), hmod, torch.optim.SGD(hmod.parameters(), lr=outer_lr), train_data_loader=[(Xv, yv)]
    )
    deps = {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}
    return mlo.Engine([outer, inner], mlo.EngineConfig(compile=backend), deps), wmod, hmod


def ridge_closed_form():
    X, y, Xv, yv, lam = ridge_data()
    H = X.T @ X / N + torch.diag(lam)
    w_star = torch.linalg.solve(H, X.T @ y / N)
    grad_c = Xv.T @ (Xv @ w_star - yv) / M
    return w_star, -w_star * torch.linalg.solve(H, grad_c), H, grad_c


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "config",
    [
        mlo.Config(type="cg", cg_iterations=D),
        mlo.Config(type="cg", cg_iterations=D, cg_alpha=0.3),
        mlo.Config(type="neumann", neumann_iterations=600, neumann_alpha=0.25),
    ],
    ids=["cg", "cg_alpha0.3", "neumann"],
)
def test_ridge_closed_form(config, backend):
    X, y, *_ = ridge_data()
    w_star, expected, H, _ = ridge_closed_form()
    if config.type == "neumann":
        assert torch.linalg.eigvalsh(H).max() * config.neumann_alpha < 2  # the series converges
    engine, _, _ = ridge_engine(config, backend, w_star, [(X, y)])
    got = engine.gradients("outer")["p"]
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_darts_equals_mixed_second_derivative_times_v(backend):
    """darts approximates H⁻¹ by I: the result is −∇²_{λw}L · v (exact FD for this quadratic)."""
    X, y, Xv, yv, lam = ridge_data()
    w_star, _, _, grad_c = ridge_closed_form()
    w = (w_star + 0.1).requires_grad_()  # away from the optimum: darts needs no optimality
    lam_ = lam.clone().requires_grad_()
    v = torch.autograd.grad(ridge_outer_loss(w, Xv, yv), w)[0]
    gw = torch.autograd.grad(ridge_inner_loss(w, lam_, X, y), w, create_graph=True)[0]
    expected = -torch.autograd.grad(gw @ v, lam_)[0]
    engine, _, _ = ridge_engine(mlo.Config(type="darts", darts_alpha=1e-3), backend, w.detach(), [(X, y)])
    got = engine.gradients("outer")["p"]
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)


# --- a non-quadratic bilevel program: darts to finite-difference accuracy ----------------------
class LogisticInner(mlo.ImplicitProblem):
    def training_step(self, batch):
        x, t = batch
        per = nn.functional.binary_cross_entropy_with_logits(self.module(x).squeeze(-1), t, reduction="none")
        # NOTE: the weight net reads x, not per.detach(): finite differences see through a
        # detach (they re-run the forward), so −∇²_{λw}L·v is only the reference without one
        weights = torch.sigmoid(self.outer(x)).squeeze(-1)
        return (weights * per).mean()


class LogisticOuter(mlo.ImplicitProblem):
    def training_step(self, batch):
        x, t = batch
        return nn.functional.binary_cross_entropy_with_logits(self.inner(x).squeeze(-1), t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_darts_nonquadratic_matches_autograd(backend):
    torch.manual_seed(0)
    x, t = torch.randn(32, 4), (torch.rand(32) > 0.5).double()
    net, wnet = nn.Linear(4, 1), nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    inner = LogisticInner(
        "inner",
        mlo.Config(darts_alpha=1e-4),
        net,
        torch.optim.SGD(net.parameters(), lr=0.1),
        train_data_loader=[(x, t)],
    )
    outer = LogisticOuter(
        "outer", mlo.Config(), wnet, torch.optim.SGD(wnet.parameters(), lr=0.1), train_data_loader=[(x[:16], t[:16])]
    )
    engine = mlo.Engine(
        [outer, inner], mlo.EngineConfig(compile=backend), {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}
    )
    got = engine.gradients("outer")
    # independent: v = dC/dw, then −∂/∂λ (∇_w L · v) by double backward
    w, lam = list(net.parameters()), list(wnet.parameters())
    v = torch.autograd.grad(outer.training_step((x[:16], t[:16])), w)
    gw = torch.autograd.grad(inner.training_step((x, t)), w, create_graph=True)
    expected = torch.autograd.grad(sum((g * vv).sum() for g, vv in zip(gw, v)), lam)
    for (name, _), e in zip(wnet.named_parameters(), expected):
        torch.testing.assert_close(got[name], -e, rtol=1e-5, atol=1e-9)


# --- itd: reverse mode through the unrolled optimizer, against a hand-unrolled loop ---------------
K = 3


def itd_batches():
    X, y, *_ = ridge_data()
    return [(X[i::K], y[i::K]) for i in range(K)]


def hand_unrolled_hypergradient(w0, lam0, batches, Xv, yv, init_from_lam=False):
    lam = lam0.clone().requires_grad_()
    w = lam.clone() if init_from_lam else w0.clone().requires_grad_()
    buf = None
    for i, (xb, yb) in enumerate(batches):
        g = torch.autograd.grad(ridge_inner_loss(w, lam, xb, yb), w, create_graph=True)[0]
        buf = g if i == 0 else 0.9 * buf + g  # SGD momentum 0.9, dampening 0
        w = w - 0.1 * buf
    return torch.autograd.grad(ridge_outer_loss(w, Xv, yv), lam)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_itd_matches_hand_unrolled_loop(backend):
    X, y, Xv, yv, lam = ridge_data()
    w0 = torch.linspace(-1, 1, D)
    engine, wmod, hmod = ridge_engine(mlo.Config(type="itd", unroll_steps=K), backend, w0, itd_batches())
    lam_before = hmod.p.detach().clone()
    for _ in range(K):
        engine.train_step()
    hypergrad = lam_before - hmod.p.detach()  # outer is SGD with lr=1
    expected = hand_unrolled_hypergradient(w0, lam_before, itd_batches(), Xv, yv)
    torch.testing.assert_close(hypergrad, expected, rtol=1e-10, atol=1e-13)
    assert expected.abs().min() > 1e-6  # the comparison is not vacuous


class MamlInner(RidgeInner):
    def on_inner_loop_start(self):
        self.load_parameters_from(self.outer)


@pytest.mark.parametrize("backend", BACKENDS)
def test_itd_differentiates_through_initialisation(backend):
    """MAML-style: the inner starts each window from the upper's parameters (a u2l init edge)."""
    X, y, Xv, yv, lam = ridge_data()
    config = mlo.Config(type="itd", unroll_steps=K)
    engine, wmod, hmod = ridge_engine(config, backend, torch.zeros(D), itd_batches(), inner_cls=MamlInner)
    lam_before = hmod.p.detach().clone()
    for _ in range(K):
        engine.train_step()
    expected = hand_unrolled_hypergradient(None, lam_before, itd_batches(), Xv, yv, init_from_lam=True)
    torch.testing.assert_close(lam_before - hmod.p.detach(), expected, rtol=1e-10, atol=1e-13)
    assert "edge u2l outer -> inner via=loss+init" in engine.compile().ir


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("segments", [2, 3, 6])
@pytest.mark.parametrize("init_from_lam", [False, True], ids=["plain", "maml_init"])
def test_itd_segments_match_hand_unrolled_loop(backend, segments, init_from_lam):
    """Checkpointed itd (the unroll replayed segment by segment) equals the hand-unrolled gradient."""
    k = 6
    X, y, Xv, yv, lam = ridge_data()
    batches = [(X[i::k], y[i::k]) for i in range(k)]
    w0 = torch.zeros(D) if init_from_lam else torch.linspace(-1, 1, D)
    config = mlo.Config(type="itd", unroll_steps=k, itd_segments=segments)
    engine, wmod, hmod = ridge_engine(
        config, backend, w0, batches, inner_cls=MamlInner if init_from_lam else RidgeInner
    )
    lam_before = hmod.p.detach().clone()
    for _ in range(k):
        engine.train_step()
    expected = hand_unrolled_hypergradient(w0, lam_before, batches, Xv, yv, init_from_lam=init_from_lam)
    torch.testing.assert_close(lam_before - hmod.p.detach(), expected, rtol=1e-10, atol=1e-13)
    assert expected.abs().min() > 1e-6
    if backend == "fx":
        ir = engine.compile().ir
        assert f"segment=replay {segment_bounds(k, segments)[-2]}-{k}" in ir
        assert ("segment=sweep 0-" in ir) == (segments > 1)


def test_segment_bounds():
    assert segment_bounds(20, 5) == [0, 4, 8, 12, 16, 20]
    assert segment_bounds(7, 3) == [0, 2, 5, 7]
    assert segment_bounds(4, 1) == [0, 4]
    assert segment_bounds(3, 10) == [0, 1, 2, 3]


# --- three levels: every method against explicit matrices / hand-unrolled updates -----------------
def three_level_losses():
    g = torch.Generator().manual_seed(3)
    PA, PB, PC = (torch.randn(4, 3, generator=g) for _ in range(3))
    qa, qb, qc = (torch.randn(4, generator=g) for _ in range(3))

    def loss_a(a, b, c):
        return 0.5 * ((PA @ a - qa) ** 2).sum() + 0.5 * (torch.exp(0.3 * c) * a * a).sum() + 0.2 * torch.tanh(b @ a)

    def loss_b(b, a, c):
        return 0.5 * ((PB @ b - qb - 0.5 * torch.tanh(a).sum()) ** 2).sum() + 0.5 * (torch.sigmoid(c) * b * b).sum()

    def loss_c(c, b):
        return 0.5 * ((PC @ b - qc) ** 2).sum() + 0.05 * (c * c).sum()

    return loss_a, loss_b, loss_c


def three_level_engine(method: str, backend: str, lr: float = 0.05):
    loss_a, loss_b, loss_c = three_level_losses()

    class A(mlo.ImplicitProblem):
        def training_step(self, batch):
            return loss_a(self.module(), self.B(), self.C())

    class B(mlo.ImplicitProblem):
        def training_step(self, batch):
            return loss_b(self.module(), self.A(), self.C())

    class C(mlo.ImplicitProblem):
        def training_step(self, batch):
            return loss_c(self.module(), self.B())

    cfg = mlo.Config(type=method, darts_alpha=1e-4, neumann_iterations=4, neumann_alpha=0.1, cg_iterations=3)
    mods = {n: Vec(torch.full((3,), v)) for n, v in (("A", 0.3), ("B", -0.2), ("C", 0.1))}
    dummy = [(torch.zeros(1),)]
    probs = {
        n: cls(n, cfg, mods[n], torch.optim.SGD(mods[n].parameters(), lr=lr), train_data_loader=dummy)
        for n, cls in (("A", A), ("B", B), ("C", C))
    }
    deps = {
        "u2l": {probs["C"]: [probs["B"], probs["A"]], probs["B"]: [probs["A"]]},
        "l2u": {probs["A"]: [probs["B"]], probs["B"]: [probs["C"]]},
    }
    engine = mlo.Engine(list(probs.values()), mlo.EngineConfig(compile=backend), deps)
    return engine, mods


def _grad(f, x, create_graph=False):
    x = x if x.requires_grad else x.detach().requires_grad_()
    return torch.autograd.grad(f(x), x, create_graph=create_graph)[0]


def reference_br(method: str, loss, x, prev, u):
    """(∂x*/∂prev)ᵀ u for loss(x, prev) with explicit matrices (independent of the library)."""
    H = torch.autograd.functional.hessian(lambda x_: loss(x_, prev), x)
    J = torch.autograd.functional.jacobian(
        lambda p_: torch.autograd.functional.jacobian(lambda x_: loss(x_, p_), x, create_graph=True), prev
    )
    # J[i, j] = ∂²L/∂x_i∂prev_j
    if method == "cg":
        return -J.T @ torch.linalg.solve(H, u)
    if method == "neumann":
        alpha, acc, term = 0.1, u.clone(), u.clone()
        for _ in range(4):
            term = term - alpha * H @ term
            acc = acc + term
        return -J.T @ (alpha * acc)
    eps = 1e-4 / u.norm()
    g = lambda xx: torch.autograd.functional.jacobian(lambda p_: loss(xx, p_), prev)  # noqa: E731
    return (g(x - eps * u) - g(x + eps * u)) / (2 * eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["darts", "neumann", "cg"])
def test_three_level_implicit_methods(method, backend):
    engine, mods = three_level_engine(method, backend)
    for _ in range(2):
        engine.train_step()
    loss_a, loss_b, loss_c = three_level_losses()
    a, b, c = (mods[n].p.detach() for n in "ABC")
    tol = {"rtol": 1e-6, "atol": 1e-9} if method == "darts" else {"rtol": 1e-9, "atol": 1e-12}
    # B: direct + path B -u2l-> A
    v_a = _grad(lambda a_: loss_b(b, a_, c), a)
    la = lambda a_, p_: loss_a(a_, p_, c)  # noqa: E731
    expected_b = _grad(lambda b_: loss_b(b_, a, c), b) + reference_br(method, la, a, b, v_a)
    torch.testing.assert_close(engine.gradients("B")["p"], expected_b, **tol)
    # C: direct + path C -u2l-> B + path C -u2l-> A -l2u-> B
    v_b = _grad(lambda b_: loss_c(c, b_), b)
    path1 = reference_br(method, lambda b_, c_: loss_b(b_, a, c_), b, c, v_b)
    u_a = reference_br(method, lambda b_, a_: loss_b(b_, a_, c), b, a, v_b)
    path2 = reference_br(method, lambda a_, c_: loss_a(a_, b, c_), a, c, u_a)
    expected_c = _grad(lambda c_: loss_c(c_, b), c) + path1 + path2
    torch.testing.assert_close(engine.gradients("C")["p"], expected_c, **tol)
    assert path2.abs().max() > 1e-6  # the two-hop path contributes


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_level_itd_matches_hand_unrolled(backend):
    lr = 0.05
    engine, mods = three_level_engine("itd", backend, lr=lr)
    engine.train_step()
    a0, b0, c0 = (mods[n].p.detach().clone() for n in "ABC")
    engine.train_step()  # A: a0->a1 (b0, c0); B: b0->b1 (a1, c0); C steps with both replays
    a1, b1 = mods["A"].p.detach(), mods["B"].p.detach()
    c1 = mods["C"].p.detach()
    loss_a, loss_b, loss_c = three_level_losses()

    def a_next(c):
        return a0 - lr * _grad(lambda a_: loss_a(a_, b0, c), a0.clone().requires_grad_(), create_graph=True)

    def b_next(a, c):
        return b0 - lr * _grad(lambda b_: loss_b(b_, a, c), b0.clone().requires_grad_(), create_graph=True)

    v_b = _grad(lambda b_: loss_c(c1, b_), b1)
    c_var = c0.clone().requires_grad_()
    path1 = torch.autograd.grad(b_next(a1, c_var) @ v_b, c_var)[0]
    a_var = a1.clone().requires_grad_()
    u_a = torch.autograd.grad(b_next(a_var, c0) @ v_b, a_var)[0]
    c_var = c0.clone().requires_grad_()
    path2 = torch.autograd.grad(a_next(c_var) @ u_a, c_var)[0]
    expected = _grad(lambda c_: loss_c(c_, b1), c1) + path1 + path2
    torch.testing.assert_close(engine.gradients("C")["p"], expected, rtol=1e-10, atol=1e-13)
    assert path2.abs().max() > 1e-8
