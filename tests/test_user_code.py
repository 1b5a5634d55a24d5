"""Valid user code is not rejected; code that cannot work is refused with the rewrite that does.

- Betty's own test problem (``test/test_engine.py``: per-feature L2 through ``torch.diag(λ)``)
  builds a d × d matrix in its loss: ``check_no_jacobians`` must not take the user's forward,
  or its gradient, for a best-response Jacobian (fx equals eager to 1e-12, and Betty).
- ``torch.autograd.grad`` / ``requires_grad_()`` inside a ``training_step`` (an adversarial
  attack, as in Betty's saliency-aware NAS example) cannot run under torch.func: a
  ProgramError shows the ``torch.func.grad`` rewrite, and that rewrite equals Betty
  running the autograd version.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

pytest.importorskip("betty")

from test_betty_parity import BETTY, OURS, mlp, problem_class  # noqa: E402

import mlocompile as mlo  # noqa: E402
from mlocompile.errors import IRVerificationError  # noqa: E402
from passes import check_no_jacobians  # noqa: E402

pytestmark = pytest.mark.betty
D = 20


@pytest.fixture(autouse=True)
def _float64(float64: None) -> None:
    """Every test here runs in float64."""


# -- Betty's test problem: torch.diag(lambda) in the lower loss ------------------------------
class ChildNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(D))

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        return inputs @ self.w, self.w


class ParentNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(D))

    def forward(self) -> Tensor:
        return self.w


class DiagInner:
    def training_step(self, batch: Any) -> Tensor:
        inputs, targets = batch
        outs, params = self.module(inputs)
        penalty = (params.unsqueeze(0) @ torch.diag(self.outer()) @ params.unsqueeze(1)).sum()
        return F.binary_cross_entropy_with_logits(outs, targets) + 0.5 * penalty

    def on_inner_loop_start(self) -> None:
        self.module.w.data.zero_()


class DiagOuter:
    def training_step(self, batch: Any) -> Tensor:
        inputs, targets = batch
        return F.binary_cross_entropy_with_logits(self.inner(inputs)[0], targets)


class BettyClamp:
    def param_callback(self) -> None:  # Betty's hook: in place
        for p in self.trainable_parameters():
            p.data.clamp_(min=1e-8)


class OursClamp:
    def param_callback(self, params: dict[str, Tensor]) -> dict[str, Tensor]:  # ours: functional
        return {k: p.clamp(min=1e-8) for k, p in params.items()}


def diag_program(lib: Any, method: str, **engine: Any) -> tuple[Any, nn.Module]:
    g = torch.Generator().manual_seed(0)
    w_gt, x = torch.randn(D, generator=g), torch.randn(100, D, generator=g)
    y = ((x @ w_gt + 0.1 * torch.randn(100, generator=g)) > 0).to(x.dtype)
    child, parent = ChildNet(), ParentNet()
    clamp = BettyClamp if lib is BETTY else OursClamp
    outer = problem_class(lib, type("DiagOuterClamped", (DiagOuter, clamp), {}))(
        name="outer",
        module=parent,
        optimizer=torch.optim.SGD(parent.parameters(), lr=0.1, momentum=0.9),
        train_data_loader=[(x[50:], y[50:])],
        config=lib.Config(),
    )
    inner = problem_class(lib, DiagInner)(
        name="inner",
        module=child,
        optimizer=torch.optim.SGD(child.parameters(), lr=0.1),
        train_data_loader=[(x[:50], y[:50])],
        config=lib.Config(type=method, unroll_steps=10),
    )
    extra = {"strategy": "cpu"} if lib is BETTY else {"progress": False, **engine}
    config = lib.EngineConfig(train_iters=20, valid_step=10**9, **extra)
    return lib.Engine(
        problems=[outer, inner], dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}, config=config
    ), parent


@pytest.mark.parametrize("method", ["darts", "neumann", "cg", "itd"])
def test_betty_test_problem_with_torch_diag_runs_under_fx_and_equals_eager(method: str) -> None:
    results = {}
    for backend in ("eager", "fx"):
        engine, parent = diag_program(OURS, method, compile=backend)
        engine.run()
        results[backend] = parent.w.detach().clone()
    assert not torch.equal(results["eager"], torch.ones(D))
    torch.testing.assert_close(results["fx"], results["eager"], rtol=0, atol=1e-12)
    if method == "darts":  # Betty's defaults; its neumann/cg/itd differ (README: "Differences from Betty")
        engine, parent = diag_program(BETTY, method)
        engine.run()
        torch.testing.assert_close(results["fx"], parent.w.detach(), rtol=0, atol=1e-10)


def test_a_jacobian_the_machinery_makes_is_still_caught_next_to_a_user_matrix() -> None:
    """A user's d x d forward value is exempt; a d x 5 node outside the forward is not."""

    def step(lam: Tensor, w: Tensor) -> Tensor:
        user = torch.diag(lam)  # forward: (20, 20)
        jac = torch.outer(lam, w)  # hypergrad: (20, 5), a best-response Jacobian's shape
        return user.sum() + jac.sum()

    gm = torch.fx.experimental.proxy_tensor.make_fx(step)(torch.randn(D), torch.randn(5))
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        node.meta["mlo.role"] = "forward" if getattr(val, "shape", None) == (D, D) else "hypergrad"
    with pytest.raises(IRVerificationError, match=r"has shape \(20, 5\), the shape of a best-response Jacobian"):
        check_no_jacobians(gm, {"a": D, "b": 5})
    for node in gm.graph.nodes:  # only the user's matrix left outside the forward: caught too
        if getattr(node.meta.get("val"), "shape", None) == (D, D):
            node.meta["mlo.role"] = "hypergrad"
        elif node.meta.get("mlo.role") == "hypergrad" and getattr(node.meta.get("val"), "shape", None) == (D, 5):
            node.meta["mlo.role"] = "forward"
    with pytest.raises(IRVerificationError, match=r"has shape \(20, 20\)"):
        check_no_jacobians(gm, {"a": D, "b": 5})


# -- autograd inside a training_step: an adversarial attack ------------------------------------
EPS = 0.1


class AutogradAttack:
    """FGSM as Betty programs write it: requires_grad_ on a perturbation, torch.autograd.grad."""

    def training_step(self, batch: Any) -> Tensor:
        x, y = batch
        delta = torch.zeros_like(x).requires_grad_()
        (g,) = torch.autograd.grad(F.cross_entropy(self.module(x + delta), y), delta)
        return self.robust_loss(x, y, g)

    def robust_loss(self, x: Tensor, y: Tensor, g: Tensor) -> Tensor:
        x_adv = (x + EPS * g.sign()).detach()
        per = F.cross_entropy(self.module(x_adv), y, reduction="none").reshape(-1, 1)
        return (torch.sigmoid(self.outer(per.detach())) * per).mean()


class FuncAttack(AutogradAttack):
    """The same attack as the error message writes it, with torch.func.grad."""

    def training_step(self, batch: Any) -> Tensor:
        x, y = batch

        def attack_loss(delta: Tensor) -> Tensor:
            return F.cross_entropy(self.module(x + delta), y)

        return self.robust_loss(x, y, torch.func.grad(attack_loss)(torch.zeros_like(x)))


class SetterAttack(AutogradAttack):
    def training_step(self, batch: Any) -> Tensor:
        x, y = batch
        x = x.clone()
        x.requires_grad = True
        return self.robust_loss(x, y, torch.zeros_like(x))


class CleanOuter:
    def training_step(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.inner(x), y)


def attack_program(lib: Any, inner_loss: type, method: str = "darts", **engine: Any) -> tuple[Any, nn.Module]:
    torch.manual_seed(0)
    net, wnet = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)), mlp(1, 8, 1)
    g = torch.Generator().manual_seed(1)
    train = [(torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    meta = [(torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
    inner = problem_class(lib, inner_loss)(
        name="inner",
        module=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        train_data_loader=train,
        config=lib.Config(type=method),
    )
    outer = problem_class(lib, CleanOuter)(
        name="outer",
        module=wnet,
        optimizer=torch.optim.Adam(wnet.parameters(), lr=1e-2),
        train_data_loader=meta,
        config=lib.Config(),
    )
    extra = {"strategy": "cpu"} if lib is BETTY else {"progress": False, **engine}
    config = lib.EngineConfig(train_iters=10, valid_step=10**9, **extra)
    return lib.Engine(
        problems=[outer, inner], dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}, config=config
    ), net


@pytest.mark.parametrize("backend", ["eager", "fx"])
@pytest.mark.parametrize("loss,call", [(AutogradAttack, r"requires_grad_\(\)"), (SetterAttack, "requires_grad = True")])
def test_autograd_in_a_training_step_is_refused_with_the_torch_func_rewrite(
    loss: type, call: str, backend: str
) -> None:
    engine, net = attack_program(OURS, loss, compile=backend)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(mlo.ProgramError, match=rf"(?s)problem 'inner' calls {call}.*torch\.func\.grad\(attack_loss\)"):
        engine.train_step()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("backend", ["eager", "fx"])
def test_the_torch_func_rewrite_equals_betty_running_the_autograd_version(backend: str) -> None:
    ref, ref_net = attack_program(BETTY, AutogradAttack)
    ref.run()
    engine, net = attack_program(OURS, FuncAttack, compile=backend)
    engine.run()
    init = dict(attack_program(OURS, FuncAttack)[1].named_parameters())
    for key, value in ref_net.named_parameters():
        assert not torch.equal(value, init[key]), key
        torch.testing.assert_close(dict(net.named_parameters())[key], value, rtol=0, atol=1e-10, msg=key)
