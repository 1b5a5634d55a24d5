"""Functional optimizers against torch.optim: parity, handover, tracing, derivatives."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from mlocompile.errors import ProgramError
from mlocompile.optim import SUPPORTED, FunctionalOptimizer, lower_optimizer

SHAPES = {"w": (3, 4), "b": (4,), "s": ()}
CONFIGS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.1}),
    "sgd_momentum_dampening": (
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "dampening": 0.3},
    ),
    "sgd_nesterov_wd": (
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.01},
    ),
    "sgd_maximize": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.5, "maximize": True}),
    "adam": (torch.optim.Adam, {"lr": 1e-2}),
    "adam_amsgrad_wd": (
        torch.optim.Adam,
        {"lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 0.05, "amsgrad": True},
    ),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "adamw_amsgrad": (
        torch.optim.AdamW,
        {"lr": 2e-2, "amsgrad": True, "maximize": True, "eps": 1e-6},
    ),
}
EXACT: dict[str, Any] = {"rtol": 1e-12, "atol": 1e-14}


def make_params(dtype: torch.dtype = torch.float64) -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for n, s in SHAPES.items()}


def clone_params(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    return {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}


def grad_sequence(steps: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Seeded gradients whose scale varies per step, so amsgrad's max matters."""
    g = torch.Generator().manual_seed(seed)
    return [
        {n: torch.randn(s, generator=g, dtype=dtype) * (0.1 + 2.0 * (k % 3)) for n, s in SHAPES.items()}
        for k in range(steps)
    ]


def make_optimizer(config: str, params: dict[str, torch.nn.Parameter]) -> Any:
    cls: Any = CONFIGS[config][0]
    kwargs = CONFIGS[config][1]
    return cls(list(params.values()), foreach=False, **kwargs)


def run_real(
    opt: torch.optim.Optimizer,
    params: dict[str, torch.nn.Parameter],
    grads: list[dict[str, torch.Tensor]],
    before_step: Callable[[int], None] = lambda k: None,
) -> None:
    for k, step_grads in enumerate(grads):
        before_step(k)
        for n, p in params.items():
            p.grad = step_grads[n].clone()
        opt.step()


def run_functional(
    fopt: FunctionalOptimizer,
    params: dict[str, torch.nn.Parameter],
    grads: list[dict[str, torch.Tensor]],
    before_step: Callable[[int], None] = lambda k: None,
) -> None:
    state = fopt.read_state()
    current = {n: p.detach().clone() for n, p in params.items()}
    for k, step_grads in enumerate(grads):
        before_step(k)
        current, state = fopt.update(current, step_grads, state, fopt.hyperparameters())
    fopt.write_state(state)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(current[n])


def pure_update(fopt: FunctionalOptimizer) -> Callable[..., Any]:
    """A plain function for make_fx, which does not trace bound methods."""

    def update(params: dict, grads: dict, state: dict, hyper: dict) -> Any:
        return fopt.update(params, grads, state, hyper)

    return update


def assert_params_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n].detach(), b[n].detach(), **EXACT)


def assert_state_dicts_equal(real: dict[str, Any], ours: dict[str, Any]) -> None:
    assert real["param_groups"] == ours["param_groups"]
    assert real["state"].keys() == ours["state"].keys()
    for idx, real_state in real["state"].items():
        our_state = ours["state"][idx]
        assert real_state.keys() == our_state.keys(), idx
        for k, v in real_state.items():
            if k == "step":
                assert v.dtype == our_state[k].dtype and v.device == our_state[k].device
                assert torch.equal(v, our_state[k]), (idx, v, our_state[k])
            else:
                torch.testing.assert_close(our_state[k], v, **EXACT)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_torch_optim_for_50_steps(config: str) -> None:
    params_a, grads = make_params(), grad_sequence(50)
    params_b = clone_params(params_a)
    opt_a, opt_b = make_optimizer(config, params_a), make_optimizer(config, params_b)
    run_real(opt_a, params_a, grads)
    run_functional(lower_optimizer(opt_b, params_b), params_b, grads)

    assert_params_equal(params_a, params_b)
    assert_state_dicts_equal(opt_a.state_dict(), opt_b.state_dict())
    # A later eager step continues from the written-back state exactly.
    extra = grad_sequence(1, seed=7)
    run_real(opt_a, params_a, extra)
    run_real(opt_b, params_b, extra)
    assert_params_equal(params_a, params_b)


@pytest.mark.parametrize("config", ["sgd_momentum_dampening", "adam_amsgrad_wd", "adamw"])
def test_handover_after_real_steps(config: str) -> None:
    params_a, grads = make_params(), grad_sequence(20)
    params_b = clone_params(params_a)
    opt_a, opt_b = make_optimizer(config, params_a), make_optimizer(config, params_b)
    run_real(opt_a, params_a, grads)
    run_real(opt_b, params_b, grads[:10])
    run_functional(lower_optimizer(opt_b, params_b), params_b, grads[10:])

    assert_params_equal(params_a, params_b)
    assert_state_dicts_equal(opt_a.state_dict(), opt_b.state_dict())


def test_fresh_state_matches_torch_initialisation() -> None:
    params = make_params()
    state = lower_optimizer(make_optimizer("adam_amsgrad_wd", params), params).read_state()
    for n, p in params.items():
        assert set(state[n]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert state[n]["step"].dtype == torch.float64 and state[n]["step"].item() == 0
        assert torch.equal(state[n]["exp_avg"], torch.zeros_like(p))
    sgd = make_optimizer("sgd_momentum_dampening", params)
    state = lower_optimizer(sgd, params).read_state()
    assert set(state["w"]) == {"step", "momentum_buffer"}
    assert len(sgd.state) == 0  # reading must not create entries in optimizer.state


@pytest.mark.parametrize("config", ["sgd_nesterov_wd", "adamw_amsgrad"])
def test_lr_schedule_is_picked_up_by_one_trace(config: str) -> None:
    params_a, grads = make_params(), grad_sequence(15)
    params_b = clone_params(params_a)
    opt_a, opt_b = make_optimizer(config, params_a), make_optimizer(config, params_b)
    fopt = lower_optimizer(opt_b, params_b)

    def schedule(opt: torch.optim.Optimizer) -> Callable[[int], None]:
        def set_lr(k: int) -> None:
            opt.param_groups[0]["lr"] = 0.1 * 0.7**k

        return set_lr

    run_real(opt_a, params_a, grads, schedule(opt_a))
    state = fopt.read_state()
    current = {n: p.detach().clone() for n, p in params_b.items()}
    graph = make_fx(pure_update(fopt))(current, grads[0], state, fopt.hyperparameters())
    lrs = []
    for k, step_grads in enumerate(grads):
        schedule(opt_b)(k)
        hyper = fopt.hyperparameters()
        lrs.append(hyper["0.lr"].item())
        current, state = graph(current, step_grads, state, hyper)

    assert lrs == [0.1 * 0.7**k for k in range(15)]
    assert_params_equal(dict(params_a), current)
    # A constant LR must give different parameters, or this test could not fail.
    params_c = clone_params(make_params())
    run_real(make_optimizer(config, params_c), params_c, grads)
    assert not torch.allclose(params_c["w"], params_a["w"])


@pytest.mark.parametrize("config", list(CONFIGS))
def test_update_traces_and_replays_equal_to_eager(config: str) -> None:
    params = make_params()
    opt = make_optimizer(config, params)
    run_real(opt, params, grad_sequence(3))  # nonzero state, step > 0
    fopt = lower_optimizer(opt, params)
    inputs = (
        {n: p.detach().clone() for n, p in params.items()},
        grad_sequence(1, seed=3)[0],
        fopt.read_state(),
        fopt.hyperparameters(),
    )
    snapshot = torch.utils._pytree.tree_map(torch.clone, inputs)
    graph = make_fx(pure_update(fopt), tracing_mode="real")(*inputs)

    for node in graph.graph.nodes:
        if node.op == "call_function" and hasattr(node.target, "_schema"):
            assert not node.target._schema.is_mutable, node.format_node()
    eager = fopt.update(*inputs)
    replay = graph(*inputs)
    torch.testing.assert_close(replay, eager, rtol=0, atol=0)
    # Pure: inputs untouched by eager and traced calls.
    torch.testing.assert_close(inputs, snapshot, rtol=0, atol=0)
    # Hyperparameters are graph inputs, not baked-in constants.
    hyper = {k: v * 0.5 for k, v in inputs[3].items()}
    torch.testing.assert_close(graph(*inputs[:3], hyper), fopt.update(*inputs[:3], hyper), rtol=0, atol=0)


def test_sgd_momentum_grads_wrt_params_and_grads_closed_form() -> None:
    params = make_params()
    opt = make_optimizer("sgd_momentum_dampening", params)
    fopt = lower_optimizer(opt, params)
    lr, damp = 0.05, 0.3
    g = torch.Generator().manual_seed(5)
    c = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()}
    d = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()}
    hyper, grads = fopt.hyperparameters(), grad_sequence(1)[0]
    p0 = {n: p.detach().clone() for n, p in params.items()}

    def objective(p: dict, gr: dict, state: dict) -> torch.Tensor:
        new_p, new_s = fopt.update(p, gr, state, hyper)
        terms = [(c[n] * new_p[n]).sum() + (d[n] * new_s[n]["momentum_buffer"]).sum() for n in new_p]
        return torch.stack(terms).sum()

    # First step (buf = grad), then a later step (buf = mu*buf + (1-damp)*grad).
    for state, grad_scale in ((fopt.read_state(), 1.0), (None, 1 - damp)):
        if state is None:
            run_real(opt, params, grad_sequence(2))
            state = fopt.read_state()
        dp, dg = torch.func.grad(objective, argnums=(0, 1))(p0, grads, state)
        for n in SHAPES:
            torch.testing.assert_close(dp[n], c[n], **EXACT)
            expected = grad_scale * (d[n] - lr * c[n])
            torch.testing.assert_close(dg[n], expected, **EXACT)


def loss_fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.sin(p["w"]).sum() + (p["w"] @ p["b"]).square().sum() + p["s"] * p["b"].sum()


@pytest.mark.parametrize("config", ["sgd_nesterov_wd", "adam"])
def test_unrolled_hypergradient_matches_hand_written_autograd(config: str) -> None:
    """d(val loss after 3 unrolled steps)/d(initial params) vs an independent unroll."""
    params = make_params()
    fopt = lower_optimizer(make_optimizer(config, params), params)
    hyper = fopt.hyperparameters()
    p0 = {n: p.detach().clone() for n, p in params.items()}

    def outer(p: dict[str, torch.Tensor]) -> torch.Tensor:
        state = fopt.read_state()
        for _ in range(3):
            p, state = fopt.update(p, torch.func.grad(loss_fn)(p), state, hyper)
        return (p["w"] ** 2).sum() + p["b"].sum() + p["s"] ** 3

    ours = torch.func.grad(outer)(p0)

    leaves = {n: v.clone().requires_grad_() for n, v in p0.items()}
    p = dict(leaves)
    kw = CONFIGS[config][1]
    m = {n: torch.zeros_like(v) for n, v in p.items()}
    v2 = {n: torch.zeros_like(v) for n, v in p.items()}
    for t in range(1, 4):
        gs = torch.autograd.grad(loss_fn(p), list(p.values()), create_graph=True)
        for (n, x), gr in zip(list(p.items()), gs, strict=True):
            if config == "adam":
                b1, b2 = 0.9, 0.999
                m[n] = b1 * m[n] + (1 - b1) * gr
                v2[n] = b2 * v2[n] + (1 - b2) * gr * gr
                mhat, vhat = m[n] / (1 - b1**t), v2[n] / (1 - b2**t)
                p[n] = x - kw["lr"] * mhat / (vhat.sqrt() + 1e-8)
            else:
                gr = gr + kw["weight_decay"] * x
                m[n] = gr if t == 1 else kw["momentum"] * m[n] + gr
                p[n] = x - kw["lr"] * (gr + kw["momentum"] * m[n])
    val = (p["w"] ** 2).sum() + p["b"].sum() + p["s"] ** 3
    reference = dict(zip(leaves, torch.autograd.grad(val, list(leaves.values())), strict=True))
    for n in SHAPES:
        torch.testing.assert_close(ours[n], reference[n], rtol=1e-9, atol=1e-12)

    # And a central finite difference in one random direction.
    g = torch.Generator().manual_seed(11)
    direction = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()}
    h = 1e-6
    plus = outer({n: p0[n] + h * direction[n] for n in p0})
    minus = outer({n: p0[n] - h * direction[n] for n in p0})
    directional = sum((ours[n] * direction[n]).sum() for n in SHAPES)
    torch.testing.assert_close((plus - minus) / (2 * h), directional, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("config", ["sgd_nesterov_wd", "adam_amsgrad_wd", "adamw"])
def test_float32_params_stay_float32_and_match(config: str) -> None:
    params_a, grads = make_params(torch.float32), grad_sequence(10, torch.float32)
    params_b = clone_params(params_a)
    opt_a, opt_b = make_optimizer(config, params_a), make_optimizer(config, params_b)
    fopt = lower_optimizer(opt_b, params_b)
    state = fopt.read_state()
    current = {n: p.detach().clone() for n, p in params_b.items()}
    for step_grads in grads:
        current, state = fopt.update(current, step_grads, state, fopt.hyperparameters())
    run_real(opt_a, params_a, grads)

    for n in SHAPES:
        assert current[n].dtype == torch.float32
        assert all(v.dtype == torch.float32 for k, v in state[n].items() if k != "step"), state[n]
        torch.testing.assert_close(current[n], params_a[n].detach(), rtol=1e-6, atol=1e-7)


def test_unsupported_optimizer_names_class_and_supported_set() -> None:
    params = make_params()
    with pytest.raises(ProgramError, match="Rprop") as info:
        lower_optimizer(torch.optim.Rprop(list(params.values())), params)
    assert SUPPORTED in str(info.value)
    for name in ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam"):
        assert f"{name} (" in SUPPORTED


def test_parameter_mismatch_names_the_parameters() -> None:
    params = make_params()
    opt = make_optimizer("adam", params)
    located = "in the optimizer but not named: param_groups[0]['params'][1] (shape (4,))"
    with pytest.raises(ProgramError, match=re.escape(located)):
        lower_optimizer(opt, {n: p for n, p in params.items() if n != "b"})
    extra = {**params, "extra": torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))}
    with pytest.raises(ProgramError, match="named but not in the optimizer: 'extra'"):
        lower_optimizer(opt, extra)


def test_signature_tracks_structure_not_values() -> None:
    params = make_params()
    opt = make_optimizer("sgd_momentum_dampening", params)
    fopt = lower_optimizer(opt, params)
    before = fopt.signature()
    hash(before)
    opt.param_groups[0]["lr"] = 0.3
    opt.param_groups[0]["momentum"] = 0.5
    assert fopt.signature() == before
    opt.param_groups[0]["nesterov"] = True
    opt.param_groups[0]["dampening"] = 0.0
    assert fopt.signature() != before
    opt.param_groups[0]["nesterov"] = False
    opt.param_groups[0]["momentum"] = 0.0
    assert fopt.signature() != before


def test_param_without_grad_is_skipped_like_torch() -> None:
    params_a = make_params()
    params_b = clone_params(params_a)
    opt_a, opt_b = make_optimizer("adam", params_a), make_optimizer("adam", params_b)
    grads = grad_sequence(3)
    for step_grads in grads:
        for n, p in params_a.items():
            p.grad = None if n == "s" else step_grads[n].clone()
        opt_a.step()
    partial = [{n: g for n, g in step.items() if n != "s"} for step in grads]
    run_functional(lower_optimizer(opt_b, params_b), params_b, partial)
    assert_params_equal(params_a, params_b)
    assert_state_dicts_equal(opt_a.state_dict(), opt_b.state_dict())


@pytest.mark.parametrize(
    "make", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: torch.optim.Adam(p, lr=0.1)]
)
def test_writing_back_a_never_stepped_state_clears_it(make):
    """Restoring a snapshot from before the first step must leave no state (as load_state_dict does)."""
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = make([p])
    fo = lower_optimizer(opt, {"p": p})
    s0 = fo.read_state()
    _, s1 = fo.update({"p": p.detach()}, {"p": torch.ones(2, dtype=torch.float64)}, s0, fo.hyperparameters())
    fo.write_state(s1)
    assert opt.state[p]
    fo.write_state(s0)
    assert not opt.state.get(p)
    assert float(fo.read_state()["p"]["step"]) == 0.0
