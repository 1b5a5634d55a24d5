"""SAMA (``Config(type="sama")``): darts' finite difference on a vector preconditioned by the lower's Adam state.

Betty 0.2.1's ``sama(vector, curr, prev)`` preconditions with ``curr``'s optimizer, and
``curr`` is the problem whose ``type="sama"``: the *lower* problem of the hop, whose
solution is differentiated (Betty's ``ImplicitProblem.optimizer_step`` keeps that
problem's applied gradient as ``state["last_grad"]``). Under SGD the preconditioner is
the identity, so sama is darts with ``sama_adam_alpha`` as its step.

Checked in float64: parameters after 20 steps against Betty 0.2.1 running the same
programs (1e-6 relative; measured ~1e-15), one hypergradient against a hand-written
``torch.autograd`` reference of the formula (1e-10), a three-level program with sama on
both lower levels against a chain of the same formula (1e-10) and fx against eager
(1e-12), and the settings that are refused.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import mlocompile as mlo
from programs import Vec, one_thread

pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # tiny models: thread hand-offs cost more than they save
        yield


BACKENDS = ["eager", "fx"]
ALPHA = 0.5  # sama_adam_alpha in the reference tests (Betty's default is 1.0)


def _adam_preconditioned(optimizer: torch.optim.Optimizer, params: list[Tensor], vec: list[Tensor]) -> list[Tensor]:
    """Betty's ``precondition_adam``, written out again from the live torch.optim state."""
    out = []
    for p, v in zip(params, vec, strict=True):
        group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
        st = optimizer.state[p]
        b1, b2 = group["betas"]
        g, m, s = st["last_grad"], st["exp_avg"], st["exp_avg_sq"]
        m0 = (m - (1 - b1) * g) / b1 if b1 != 0 else torch.zeros_like(m)
        s0 = (s - (1 - b2) * g * g) / b2
        scale = ((1 - b1) * b2 * s0 - b1 * (1 - b2) * g * m0) / (s.sqrt() + group["eps"]) ** 3
        out.append(v * scale * group["lr"])
    return out


def _finite_difference(loss, w: list[Tensor], lam: list[Tensor], u: list[Tensor], alpha: float) -> list[Tensor]:
    """``(∇_λ loss(w − εu) − ∇_λ loss(w + εu)) / 2ε``, ``ε = alpha / (‖u‖ + 1e-15)``, by torch.autograd."""
    eps = alpha / (torch.cat([t.flatten() for t in u]).norm() + 1e-15)
    lam = [t.detach().requires_grad_() for t in lam]

    def grad_at(sign: float) -> tuple[Tensor, ...]:
        return torch.autograd.grad(loss([wi + sign * eps * ui for wi, ui in zip(w, u)], lam), lam)

    plus, minus = grad_at(1.0), grad_at(-1.0)
    return [(mi - pl) / (2 * eps) for mi, pl in zip(minus, plus)]


# -- Meta-Weight-Net, as test_betty_parity builds it for both libraries ---------------------------
MWN_CASES: dict[str, tuple[dict[str, Any], str, dict[str, Any]]] = {
    # name: (inner Config, inner optimizer, EngineConfig)
    "adam": ({"type": "sama"}, "adam", {}),
    "sgd": ({"type": "sama"}, "sgd", {}),
    "adam_clip_unroll2_alpha": (
        {"type": "sama", "unroll_steps": 2, "gradient_clipping": 0.05, "sama_adam_alpha": 0.3},
        "adam",
        {},
    ),
    "adam_roll_back": ({"type": "sama"}, "adam", {"roll_back": True}),
}
CHAIN_CONFIG = {"type": "sama", "sama_adam_alpha": 0.2}  # test_betty_parity.chain_program's three levels
INNER_OPTIMIZERS = {
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, betas=(0.8, 0.95)),
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
}


def _mwn_program(case: str):
    from test_betty_parity import mwn_program

    inner_config, opt, _ = MWN_CASES[case]
    program = mwn_program(inner_config)
    program.specs["inner"].optimizer = INNER_OPTIMIZERS[opt]
    return program


@functools.cache
def _betty_params(case: str) -> dict[str, dict[str, Tensor]]:
    from test_betty_parity import BETTY, run_program

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # cached across tests: build it in float64 whoever asks first
    try:
        if case == "chain":
            from test_betty_parity import chain_program

            return run_program(BETTY, chain_program(CHAIN_CONFIG), {"strategy": "cpu"})
        return run_program(BETTY, _mwn_program(case), {**MWN_CASES[case][2], "strategy": "cpu"})
    finally:
        torch.set_default_dtype(old)


# fx against eager for unrolling, clipping and roll-back: test_fx_equals_eager (fewer steps, no Betty run)
MWN_RUNS = [("adam", "eager"), ("adam", "fx"), ("sgd", "eager"), ("sgd", "fx")]
MWN_RUNS += [("adam_clip_unroll2_alpha", "eager"), ("adam_roll_back", "eager")]


@pytest.mark.betty
@pytest.mark.parametrize(("case", "backend"), MWN_RUNS)
def test_meta_weight_net_matches_betty(case: str, backend: str) -> None:
    pytest.importorskip("betty")
    from test_betty_parity import OURS, TOL, run_program

    program = _mwn_program(case)
    ours = run_program(OURS, program, {**MWN_CASES[case][2], "compile": backend})
    ref = _betty_params(case)
    init = {n: dict(spec.module.named_parameters()) for n, spec in program.specs.items()}
    for name in ref:
        for key, value in ref[name].items():
            assert not torch.equal(value, init[name][key].detach()), f"{name}.{key} never changed in Betty"
            torch.testing.assert_close(ours[name][key], value, **TOL, msg=lambda m, n=name, k=key: f"{n}.{k}: {m}")


@pytest.mark.betty
@pytest.mark.parametrize("backend", BACKENDS)
def test_three_levels_match_betty(backend: str) -> None:
    # bottom: SGD (identity preconditioner), middle: Adam (its state preconditions top's hypergradient)
    pytest.importorskip("betty")
    from test_betty_parity import OURS, TOL, chain_program, run_program

    program = chain_program(CHAIN_CONFIG)
    ours = run_program(OURS, program, {"compile": backend})
    for name, params in _betty_params("chain").items():
        init = dict(program.specs[name].module.named_parameters())
        for key, value in params.items():
            assert not torch.equal(value, init[key].detach()), f"{name}.{key} never changed in Betty"
            torch.testing.assert_close(ours[name][key], value, **TOL, msg=lambda m, n=name, k=key: f"{n}.{k}: {m}")


# -- one hypergradient against a hand-written reference -------------------------------------------
class Reweighted(mlo.ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        per = F.cross_entropy(self.module(x), y, reduction="none").reshape(-1, 1)
        return (torch.sigmoid(self.outer(per.detach())) * per).mean()


class Meta(mlo.ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.inner(x), y)


def _mwn_engine(backend: str, optimizer: str, clip: float = 0.0, **engine_kw: Any):
    from test_betty_parity import classification_batches, mlp

    torch.manual_seed(0)
    net, wnet = mlp(10, 16, 3), mlp(1, 8, 1)
    if optimizer == "adam_groups":  # two groups: their own lr, betas (beta1 = 0 included) and eps
        opt = torch.optim.Adam(
            [
                {"params": net[0].parameters(), "lr": 3e-2, "betas": (0.0, 0.9), "eps": 1e-6},
                {"params": net[2].parameters()},
            ],
            lr=1e-2,
            betas=(0.8, 0.95),
        )
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        opt = INNER_OPTIMIZERS[optimizer](net)
    cfg = mlo.Config(type="sama", sama_adam_alpha=ALPHA, gradient_clipping=clip)
    inner = Reweighted("inner", cfg, net, opt, train_data_loader=classification_batches(1, 5, noise=0.4))
    outer = Meta(
        "outer",
        mlo.Config(),
        wnet,
        torch.optim.Adam(wnet.parameters(), lr=1e-2),
        train_data_loader=classification_batches(2, 3),
    )
    deps = {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}
    return mlo.Engine([outer, inner], mlo.EngineConfig(compile=backend, **engine_kw), deps), inner, outer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["adam_groups", "adamw", "sgd"])
def test_hypergradient_matches_autograd_reference(optimizer: str, backend: str) -> None:
    engine, inner, outer = _mwn_engine(backend, optimizer)
    for _ in range(3):
        engine.train_step()
    batch = outer.peek_batch()
    got = engine.gradients("outer", batch)

    net, wnet = inner.module, outer.module
    w, lam = list(net.parameters()), list(wnet.parameters())
    names = [n for n, _ in net.named_parameters()]
    x, y = batch
    v = torch.autograd.grad(F.cross_entropy(net(x), y), w)
    u = list(v) if optimizer == "sgd" else _adam_preconditioned(inner.optimizer, w, list(v))

    def inner_loss(w_: list[Tensor], lam_: list[Tensor]) -> Tensor:
        xi, yi = inner.cur_batch
        logits = torch.func.functional_call(net, dict(zip(names, w_)), (xi,))
        per = F.cross_entropy(logits, yi, reduction="none").reshape(-1, 1)
        weight = torch.func.functional_call(
            wnet, dict(zip([n for n, _ in wnet.named_parameters()], lam_)), (per.detach(),)
        )
        return (torch.sigmoid(weight) * per).mean()

    expected = _finite_difference(inner_loss, [t.detach() for t in w], lam, u, ALPHA)  # + a zero direct gradient
    for (name, _), e in zip(wnet.named_parameters(), expected):
        torch.testing.assert_close(got[name], e, rtol=1e-10, atol=1e-14)
    assert max(e.abs().max() for e in expected) > 1e-6  # not trivially zero
    if optimizer != "sgd":  # the preconditioner matters: darts' direction gives another result
        darts = _finite_difference(inner_loss, [t.detach() for t in w], lam, list(v), ALPHA)
        assert max((a - b).abs().max() for a, b in zip(darts, expected)) > 1e-4


def test_the_lower_keeps_the_gradient_it_applied() -> None:
    # Betty: state["last_grad"] = param.grad after clip_grad_norm_ and optimizer.step()
    engine, inner, outer = _mwn_engine("eager", "adam_groups", clip=0.05)
    engine.train_step()
    net, wnet = inner.module, outer.module
    before = {k: t.detach().clone() for k, t in net.named_parameters()}
    lam = {k: t.detach().clone() for k, t in wnet.named_parameters()}
    engine.train_step()
    x, y = inner.cur_batch
    w = {k: t.requires_grad_() for k, t in before.items()}
    per = F.cross_entropy(torch.func.functional_call(net, w, (x,)), y, reduction="none").reshape(-1, 1)
    loss = (torch.sigmoid(torch.func.functional_call(wnet, lam, (per.detach(),))) * per).mean()
    grads = dict(zip(w, torch.autograd.grad(loss, list(w.values()))))
    coef = 0.05 / (torch.cat([g.flatten() for g in grads.values()]).norm() + 1e-6)
    assert coef < 1  # clipped
    grads = {k: g * coef for k, g in grads.items()}
    for key, p in net.named_parameters():
        torch.testing.assert_close(inner.optimizer.state[p]["last_grad"], grads[key], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("engine_kw", [{"in_place_updates": True}, {"roll_back": True}], ids=["in_place", "roll_back"])
def test_fx_equals_eager(engine_kw: dict[str, Any]) -> None:
    runs = {}
    for backend in BACKENDS:
        engine, inner, outer = _mwn_engine(backend, "adam", **engine_kw)
        for _ in range(4):
            engine.train_step()
        runs[backend] = [p.detach().clone() for prob in (inner, outer) for p in prob.module.parameters()]
    for a, b in zip(runs["eager"], runs["fx"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# -- three levels: sama on both lower problems, every hop preconditioned by its own optimizer -------
def _three_level_engine(backend: str):
    from test_hypergrad import three_level_losses

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

    mods = {n: Vec(torch.tensor(v)) for n, v in (("A", [0.3, -0.1, 0.2]), ("B", [-0.2, 0.4, 0.1]), ("C", [0.1] * 3))}
    opts = {
        "A": torch.optim.Adam(mods["A"].parameters(), lr=0.05, betas=(0.7, 0.9)),
        "B": torch.optim.AdamW(mods["B"].parameters(), lr=0.03, weight_decay=0.05),
        "C": torch.optim.SGD(mods["C"].parameters(), lr=0.05),
    }
    cfg = mlo.Config(type="sama", sama_adam_alpha=ALPHA)
    dummy = [(torch.zeros(1),)]
    probs = {n: cls(n, cfg, mods[n], opts[n], train_data_loader=dummy) for n, cls in (("A", A), ("B", B), ("C", C))}
    deps = {
        "u2l": {probs["C"]: [probs["B"], probs["A"]], probs["B"]: [probs["A"]]},
        "l2u": {probs["A"]: [probs["B"]], probs["B"]: [probs["C"]]},
    }
    return mlo.Engine(list(probs.values()), mlo.EngineConfig(compile=backend), deps), mods, opts


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_levels_match_a_chain_of_the_formula(backend: str) -> None:
    from test_hypergrad import _grad, three_level_losses

    engine, mods, opts = _three_level_engine(backend)
    for _ in range(3):
        engine.train_step()
    loss_a, loss_b, loss_c = three_level_losses()
    a, b, c = (mods[n].p.detach() for n in "ABC")

    def hop(lower: str, loss, x: Tensor, prev: Tensor, vec: Tensor) -> Tensor:
        # one sama hop, preconditioned by the optimizer of the lower problem (whose type="sama")
        (u,) = _adam_preconditioned(opts[lower], [mods[lower].p], [vec])
        (out,) = _finite_difference(lambda w_, l_: loss(w_[0], l_[0]), [x], [prev], [u], ALPHA)
        return out

    # B: direct + path B -u2l-> A (A's Adam state)
    v_a = _grad(lambda a_: loss_b(b, a_, c), a)
    expected_b = _grad(lambda b_: loss_b(b_, a, c), b) + hop("A", lambda a_, b_: loss_a(a_, b_, c), a, b, v_a)
    torch.testing.assert_close(engine.gradients("B")["p"], expected_b, rtol=1e-10, atol=1e-14)
    # C: direct + path C -u2l-> B (B's AdamW state) + path C -u2l-> A -l2u-> B (B's, then A's)
    v_b = _grad(lambda b_: loss_c(c, b_), b)
    path1 = hop("B", lambda b_, c_: loss_b(b_, a, c_), b, c, v_b)
    u_a = hop("B", lambda b_, a_: loss_b(b_, a_, c), b, a, v_b)
    path2 = hop("A", lambda a_, c_: loss_a(a_, b, c_), a, c, u_a)
    expected_c = _grad(lambda c_: loss_c(c_, b), c) + path1 + path2
    torch.testing.assert_close(engine.gradients("C")["p"], expected_c, rtol=1e-10, atol=1e-14)
    assert path1.abs().max() > 1e-6 and path2.abs().max() > 1e-8  # both paths contribute


def test_three_levels_fx_equals_eager() -> None:
    runs = {}
    for backend in BACKENDS:
        engine, mods, _ = _three_level_engine(backend)
        init = {n: m.p.detach().clone() for n, m in mods.items()}
        for _ in range(5):
            engine.train_step()
        runs[backend] = {n: m.p.detach().clone() for n, m in mods.items()}
    for n in runs["eager"]:
        assert not torch.equal(runs["eager"][n], init[n]), n
        torch.testing.assert_close(runs["fx"][n], runs["eager"][n], rtol=1e-12, atol=1e-14)


# -- settings that are refused --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sama_adam_alpha", 0.0, "sama_adam_alpha must be a finite number > 0"),
        ("sama_adam_alpha", -1.0, "sama_adam_alpha must be a finite number > 0"),
        ("sama_adam_alpha", float("nan"), "sama_adam_alpha must be a finite number > 0"),
        ("sama_adam_alpha", float("inf"), "sama_adam_alpha must be a finite number > 0"),
        ("sama_adam_alpha", "1", "sama_adam_alpha must be a finite number > 0"),
        ("sama_multitask", True, "sama_multitask=True is not supported"),
    ],
)
def test_bad_sama_settings_fail_at_construction(field: str, value: Any, message: str) -> None:
    from programs import mwn_engine

    cfg = mlo.Config(type="sama")
    setattr(cfg, field, value)
    with pytest.raises(mlo.ProgramError) as err:
        mwn_engine("sama", "eager", lower_config=cfg)
    assert f"Config of problem 'inner': {field}={value!r}" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_with_beta2_zero_is_refused_and_nothing_changes(backend: str) -> None:
    engine, inner, outer = _mwn_engine(backend, "adam")
    inner.optimizer.param_groups[0]["betas"] = (0.9, 0.0)
    before = [p.detach().clone() for prob in (inner, outer) for p in prob.module.parameters()]
    with pytest.raises(mlo.ProgramError, match=r"problem 'inner': type='sama' .* betas\[1\]=0.0; use beta2 > 0"):
        engine.train_step()  # the outer's step reads the inner's Adam state
    after = [p.detach() for prob in (inner, outer) for p in prob.module.parameters()]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert not inner.optimizer.state  # the inner's update was rolled back too


def test_a_checkpoint_keeps_last_grad_and_resumes_exactly(tmp_path) -> None:
    # the gradient the lower applied is optimizer state: saved, loaded, and read by the next hypergradient
    straight, inner, _ = _mwn_engine("eager", "adam")
    for _ in range(4):
        straight.train_step()
    expected = straight.gradients("outer")
    engine, inner, _ = _mwn_engine("eager", "adam")
    for _ in range(2):
        engine.train_step()
    engine.save(str(tmp_path / "ck.pt"))
    resumed, inner, _ = _mwn_engine("eager", "adam")
    resumed.load(str(tmp_path / "ck.pt"))
    assert all("last_grad" in st for st in inner.optimizer.state.values())
    for _ in range(2):
        resumed.train_step()
    got = resumed.gradients("outer")
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_the_step_diagram_shows_the_lower_optimizer_input() -> None:
    engine, _, _ = _mwn_engine("fx", "adam")
    engine.train_step()
    compiled = mlo.compile(engine)
    assert "method=sama" in compiled.ir
    assert "lower_opt.inner" in compiled.to_dot(kind="step")
