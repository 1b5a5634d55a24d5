"""Hand-written ``torch.autograd`` hypergradients for the corpus programs (tests/corpus.py).

Independent of mlocompile's code: each method's formula is written out with
``torch.autograd.grad`` (``create_graph`` for second order), the model evaluated
with ``functional_call``. Random ops draw in the order the formulas evaluate the
losses, which is the order the library evaluates them; the caller seeds both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel


def lower_loss(net, w, lam, batch):
    x, t, idx = batch
    per = F.cross_entropy(functional_call(net, w, (x,)), t, reduction="none")
    return (torch.sigmoid(lam[idx]) * per).mean()


def upper_loss(net, w, batch):
    x, t = batch
    return F.cross_entropy(functional_call(net, w, (x,)), t)


def _grad(out, inputs, **kw):
    return list(torch.autograd.grad(out, inputs, **kw))


def second_order(fn):
    """Run ``fn`` with attention as its math decomposition (flash kernels have no double backward)."""

    def run(*args, **kwargs):
        with sdpa_kernel(SDPBackend.MATH):
            return fn(*args, **kwargs)

    return run


@second_order
def implicit(net, w: dict, lam, lower_batch, upper_batch, method: str, cfg) -> torch.Tensor:
    """darts / neumann / cg hypergradient of the upper loss with respect to ``lam``."""
    names = list(w)
    ws = [w[k].detach().requires_grad_() for k in names]
    lam = lam.detach().requires_grad_()
    v = _grad(upper_loss(net, dict(zip(names, ws)), upper_batch), ws)
    if method == "darts":
        eps = cfg.darts_alpha / (torch.sqrt(sum((t * t).sum() for t in v)) + 1e-15)
        plus = [a + eps * b for a, b in zip(ws, v)]
        minus = [a - eps * b for a, b in zip(ws, v)]
        g_plus = _grad(lower_loss(net, dict(zip(names, plus)), lam, lower_batch), lam)[0]
        g_minus = _grad(lower_loss(net, dict(zip(names, minus)), lam, lower_batch), lam)[0]
        return (g_minus - g_plus) / (2 * eps)
    gw = _grad(lower_loss(net, dict(zip(names, ws)), lam, lower_batch), ws, create_graph=True)

    def hvp(u):
        return _grad(gw, ws, grad_outputs=u, retain_graph=True)

    if method == "neumann":
        a = cfg.neumann_alpha
        term, acc = v, list(v)
        for _ in range(cfg.neumann_iterations):
            term = [p - a * h for p, h in zip(term, hvp(term))]
            acc = [s + p for s, p in zip(acc, term)]
        x = [a * s for s in acc]
    else:  # cg on H x = v (cg_alpha = 1)
        x = [torch.zeros_like(t) for t in v]
        r, p = list(v), list(v)
        rs = sum((t * t).sum() for t in r)
        for _ in range(cfg.cg_iterations):
            ap = hvp(p)
            step = rs / sum((a * b).sum() for a, b in zip(p, ap))
            x = [xi + step * pi for xi, pi in zip(x, p)]
            r = [ri - step * ai for ri, ai in zip(r, ap)]
            rs_new = sum((t * t).sum() for t in r)
            p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
            rs = rs_new
    return -_grad(gw, lam, grad_outputs=x, retain_graph=True)[0]


def unroll(net, w0: dict, opt_state, lam, batches, rng_states, optimizer: str, lr, wd=None):
    """Differentiable replay of the lower's optimizer steps (SGD momentum 0.9, or Adam amsgrad).

    ``lr`` and ``wd`` (weight decay) are numbers or dicts by parameter name (parameter groups).
    """
    lr_of = lr if isinstance(lr, dict) else dict.fromkeys(w0, lr)
    wd_of = wd if isinstance(wd, dict) else dict.fromkeys(w0, wd or 0.0)
    w = {k: t.detach().requires_grad_() for k, t in w0.items()}
    state = {k: list(s) for k, s in opt_state.items()}
    for batch, rng in zip(batches, rng_states):
        torch.set_rng_state(rng)
        g = dict(zip(w, _grad(lower_loss(net, w, lam, batch), list(w.values()), create_graph=True)))
        for k in w:
            if optimizer == "sgd":
                (buf,) = state[k]
                d = g[k] + wd_of[k] * w[k] if wd_of[k] else g[k]
                buf = d if buf is None else 0.9 * buf + d
                state[k] = [buf]
                w[k] = w[k] - lr_of[k] * buf
            else:  # Adam(amsgrad=True), torch.optim's defaults otherwise
                m, s, vmax, n = state[k]
                n = n + 1
                m = 0.9 * m + 0.1 * g[k]
                s = 0.999 * s + 0.001 * g[k] * g[k]
                vmax = torch.maximum(vmax, s)
                denom = (vmax.sqrt() / (1 - 0.999**n) ** 0.5) + 1e-8
                w[k] = w[k] - (lr_of[k] / (1 - 0.9**n)) * m / denom
                state[k] = [m, s, vmax, n]
    return w


@second_order
def itd(net, w0: dict, opt_state, lam, batches, rng_states, upper_batch, upper_rng, optimizer: str, lr, wd=None):
    """itd hypergradient: the upper loss after the replayed unroll, differentiated through it.

    Returns ``(hypergradient, replayed final parameters)``.
    """
    lam = lam.detach().requires_grad_()
    w = unroll(net, w0, opt_state, lam, batches, rng_states, optimizer, lr, wd)
    # the library differentiates the upper loss at the current (= replayed) weights: v first, then the chain
    ws = {k: t.detach().requires_grad_() for k, t in w.items()}
    torch.set_rng_state(upper_rng)
    v = _grad(upper_loss(net, ws, upper_batch), list(ws.values()))
    hyper = _grad(list(w.values()), lam, grad_outputs=v)[0]
    return hyper, {k: t.detach() for k, t in w.items()}
