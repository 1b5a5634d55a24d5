"""The same math written by hand with ``torch.func``: what a careful user would write.

Gradients come from ``torch.func.grad`` / ``torch.func.vjp`` over ``functional_call``
with detached aliases of the modules' parameters (no autograd graph on the leaves);
updates that are not differentiated use the user's ``torch.optim`` optimizer (its
default CPU kernels), with ``p.grad`` assigned directly. Hypergradients are the same
formulas as mlocompile's and Betty's: darts finite differences, Neumann series and
conjugate gradient from one linearization of ``∇_w L`` (``torch.func.vjp``), and
MAML's reverse mode through the K inner SGD steps as one ``torch.func.grad``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp

from benchmarks import programs as P
from benchmarks.workloads import Program, Workload, build_program

Params = dict[str, Tensor]


def _detached(module: nn.Module) -> Params:
    return {k: p.detach() for k, p in module.named_parameters()}


def _set_grads(module: nn.Module, grads: Params) -> None:
    for k, p in module.named_parameters():
        p.grad = grads[k]


def _norm(v: Params) -> Tensor:
    return torch.sqrt(sum((t * t).sum() for t in v.values()))  # type: ignore[arg-type]


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def _axpy(alpha: Tensor | float, x: Params, y: Params) -> Params:
    return {k: alpha * x[k] + y[k] for k in y}


def darts(loss: Callable[..., Tensor], w: Params, lam: Params, batch: Any, v: Params, alpha: float = 0.01) -> Params:
    """``(∇_λL(w − εv) − ∇_λL(w + εv)) / 2ε`` with ``ε = alpha / ‖v‖``."""
    eps = alpha / (_norm(v) + 1e-15)
    g_lam = grad(loss, argnums=1)
    plus: Params = g_lam(_axpy(eps, v, w), lam, batch)
    minus: Params = g_lam(_axpy(-eps, v, w), lam, batch)
    return {k: (minus[k] - plus[k]) / (2 * eps) for k in plus}


def _linearize(loss: Callable[..., Tensor], w: Params, lam: Params, batch: Any) -> Callable[[Params], Any]:
    return vjp(lambda w_, lam_: grad(loss)(w_, lam_, batch), w, lam)[1]  # type: ignore[no-any-return]


def neumann(loss: Callable[..., Tensor], w: Params, lam: Params, batch: Any, v: Params, iters: int) -> Params:
    """``−∇²_{λw}L · α Σ_{j≤K} (I − αH)^j v`` with α = 0.1."""
    alpha, lin = 0.1, _linearize(loss, w, lam, batch)
    term, acc = v, v
    for _ in range(iters):
        hv = lin(term)[0]
        term = {k: term[k] - alpha * hv[k] for k in term}
        acc = {k: acc[k] + term[k] for k in acc}
    return {k: -m for k, m in lin({k: alpha * a for k, a in acc.items()})[1].items()}


def cg(loss: Callable[..., Tensor], w: Params, lam: Params, batch: Any, v: Params, iters: int) -> Params:
    """``−∇²_{λw}L · x`` with ``H x = v`` solved by ``iters`` steps of conjugate gradient."""
    lin = _linearize(loss, w, lam, batch)
    x = {k: torch.zeros_like(t) for k, t in v.items()}
    r, p = v, v
    rs = _dot(r, r)
    for _ in range(iters):
        ap = lin(p)[0]
        step = rs / _dot(p, ap)
        x, r = _axpy(step, p, x), _axpy(-step, ap, r)
        rs_new = _dot(r, r)
        p, rs = _axpy(rs_new / rs, p, r), rs_new
    return {k: -m for k, m in lin(x)[1].items()}


class Bilevel:
    """Meta-Weight-Net and L2 HPO: ``unroll`` inner SGD steps, then one outer Adam step."""

    def __init__(self, w: Workload, program: Program) -> None:
        self.workload = w
        inner, outer = program.problems["inner"], program.problems["outer"]
        self.net, self.hnet = inner.module, outer.module
        self.opt_in, self.opt_out = inner.optimizer(self.net), outer.optimizer(self.hnet)
        self.w, self.lam = _detached(self.net), _detached(self.hnet)
        self.data_in, self.data_out = itertools.cycle(inner.data), itertools.cycle(outer.data)
        self.last: Any = None

    def inner_loss(self, w: Params, lam: Params, batch: Any) -> Tensor:
        if self.workload.kind == "hpo":
            x, y = batch
            logits = functional_call(self.net, w, (x,)).squeeze(-1)
            return P.hpo_inner_loss(logits, w["weight"], lam["log_l"], y)
        net = lambda x: functional_call(self.net, w, (x,))  # noqa: E731
        return P.mwn_inner_loss(net, lambda z: functional_call(self.hnet, lam, (z,)), batch)

    def outer_loss(self, w: Params, lam: Params, batch: Any) -> Tensor:
        x, y = batch
        out = functional_call(self.net, w, (x,))
        if self.workload.kind == "hpo":
            return F.binary_cross_entropy_with_logits(out.squeeze(-1), y)
        return F.cross_entropy(out, y)

    def hypergradient(self, v: Params) -> Params:
        m, args = self.workload.method, (self.inner_loss, self.w, self.lam, self.last, v)
        if m == "darts":
            return darts(*args)
        return (neumann if m == "neumann" else cg)(*args, self.workload.iterations)

    def cycle(self) -> None:
        for _ in range(self.workload.unroll):
            self.last = next(self.data_in)
            _set_grads(self.net, grad(self.inner_loss)(self.w, self.lam, self.last))
            self.opt_in.step()
        v, direct = grad(self.outer_loss, argnums=(0, 1))(self.w, self.lam, next(self.data_out))
        hyper = self.hypergradient(v)
        _set_grads(self.hnet, {k: direct[k] + hyper[k] for k in direct})
        self.opt_out.step()


class Chain3:
    """Three levels (bottom ← middle ← top), darts at each hop, unroll 1 everywhere."""

    def __init__(self, w: Workload, program: Program) -> None:
        specs = program.problems
        self.mods = {n: specs[n].module for n in ("bottom", "middle", "top")}
        self.opts = {n: specs[n].optimizer(m) for n, m in self.mods.items()}
        self.p = {n: _detached(m) for n, m in self.mods.items()}
        self.data = {n: itertools.cycle(specs[n].data) for n in self.mods}
        self.last: dict[str, Any] = {}

    def _fc(self, name: str, params: Params) -> Callable[..., Tensor]:
        return lambda *args: functional_call(self.mods[name], params, args)

    def bottom_loss(self, b: Params, m: Params, batch: Any) -> Tensor:
        return P.mwn_inner_loss(self._fc("bottom", b), self._fc("middle", m), batch)

    def middle_loss(self, b: Params, m: Params, t: Params, batch: Any) -> Tensor:
        return P.chain_middle_loss(self._fc("bottom", b), list(m.values()), self._fc("top", t)(), batch)

    def top_loss(self, m: Params, batch: Any) -> Tensor:
        return P.chain_top_loss(self._fc("middle", m), batch)

    def _step(self, name: str, grads: Params) -> None:
        _set_grads(self.mods[name], grads)
        self.opts[name].step()

    def cycle(self) -> None:
        b, m, t = self.p["bottom"], self.p["middle"], self.p["top"]
        self.last["bottom"] = next(self.data["bottom"])
        self._step("bottom", grad(self.bottom_loss)(b, m, self.last["bottom"]))
        # middle: direct gradient + darts through bottom's best response
        self.last["middle"] = next(self.data["middle"])
        v, direct = grad(self.middle_loss, argnums=(0, 1))(b, m, t, self.last["middle"])
        hyper = darts(self.bottom_loss, b, m, self.last["bottom"], v)
        self._step("middle", {k: direct[k] + hyper[k] for k in direct})
        # top: its loss does not read its own parameter; darts through middle's best response
        v = grad(self.top_loss)(m, next(self.data["top"]))
        g_t = grad(self.middle_loss, argnums=2)
        eps = 0.01 / (_norm(v) + 1e-15)
        plus = g_t(b, _axpy(eps, v, m), t, self.last["middle"])
        minus = g_t(b, _axpy(-eps, v, m), t, self.last["middle"])
        self._step("top", {k: (minus[k] - plus[k]) / (2 * eps) for k in plus})


class MAML:
    """One task per cycle: K SGD steps from the meta-initialisation, reverse mode through them."""

    def __init__(self, w: Workload, program: Program) -> None:
        inner, outer = program.problems["inner"], program.problems["outer"]
        self.k, self.lr = w.unroll, inner.optimizer(inner.module).defaults["lr"]
        self.net = outer.module
        self.opt = outer.optimizer(self.net)
        self.theta = _detached(self.net)
        self.tasks = itertools.cycle(list(zip(inner.data[:: self.k], outer.data)))

    def _mse(self, w: Params, batch: Any) -> Tensor:
        x, y = batch
        return F.mse_loss(functional_call(self.net, w, (x,)), y)

    def query_loss(self, theta: Params, support: Any, query: Any) -> Tensor:
        w = theta
        for _ in range(self.k):
            g = grad(self._mse)(w, support)
            w = {k: w[k] - self.lr * g[k] for k in w}
        return self._mse(w, query)

    def cycle(self) -> None:
        support, query = next(self.tasks)
        _set_grads(self.net, grad(self.query_loss)(self.theta, support, query))
        self.opt.step()


def build(w: Workload) -> Any:
    """Return the hand-written torch.func runner of ``w`` (it has ``cycle()``)."""
    program = build_program(w)
    cls = {"mwn": Bilevel, "scale": Bilevel, "hpo": Bilevel, "chain": Chain3, "maml": MAML}[w.kind]
    return cls(w, program)
