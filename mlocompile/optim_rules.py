"""Per-optimizer update rules: what each ``torch.optim`` class computes, as pure tensor code.

``OPTIMIZER_RULES`` maps a ``torch.optim`` class to its :class:`OptimizerRule`: the
structural flags of a param group (each one changes the traced graph), its numeric
hyperparameters (graph inputs, read at every step), its per-parameter state and one
update function mirroring torch 2.13's single-tensor (``foreach=False``) kernel for one
parameter. ``optim.FunctionalOptimizer`` applies them.

Exactness: every rule reproduces torch's arithmetic op for op, so results match
``torch.optim`` bit for bit (``tests/test_optim.py``, ``tests/test_optimizers.py``).
Scalars are 0-dim float64 tensors (torch's Python-float arithmetic) cast to the
parameter dtype where torch casts a Python scalar argument. Where torch writes
``x.add(y, alpha=a)`` or ``x.addcmul(y, z, value=a)`` (a fused multiply-add on CPU), the
rules write ``torch.addcmul(x, y, a)`` or ``torch.addcmul(x, a * y, z)``, which round the
same way while taking ``a`` as a tensor; ``x.addcdiv(y, z, value=a)`` is ``x + a * y / z``.
A Python float divided by a tensor is ``tensor.reciprocal() * float`` in torch, and a
Python ``x ** 0.5`` is libm ``pow`` (a scalar 0.5 exponent would dispatch to ``sqrt``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Flags = tuple[tuple[str, bool], ...]
Update = Callable[
    [Tensor, Tensor, dict[str, Tensor], dict[str, Tensor], dict[str, bool]], tuple[Tensor, dict[str, Tensor]]
]

# Options that change how torch computes a step (other kernels, other rounding): refused by
# the rules that list them, so a run never silently computes something else.
REFUSED_OPTIONS: dict[str, str] = {
    "capturable": "capturable=True selects torch's CUDA-graph arithmetic, which is not reproduced; "
    "construct the optimizer with capturable=False",
    "differentiable": "differentiable=True selects other arithmetic in torch; the lowered update is always "
    "differentiable (itd differentiates through it), so construct the optimizer with differentiable=False",
    "fused": "fused=True selects torch's fused kernel, which is not reproduced; construct the optimizer "
    "with fused=None (or False)",
}


@dataclass(frozen=True)
class OptimizerRule:
    """How one ``torch.optim`` class is lowered.

    Attributes:
        kind: Short name (``"rmsprop"``), shown in signatures and errors.
        options: One-line summary of what is honoured, for error messages and docs.
        flags: Param group -> the structural choices of its update, as sorted pairs.
        hyper: Param group -> its numeric hyperparameters by name (graph inputs).
        state: Flags -> the per-parameter tensor state torch keeps, besides ``step``.
        update: ``(param, grad, state, hyper, flags) -> (param, state)`` for one parameter.
        init: ``(param, group, key)`` -> the value of state ``key`` torch starts from.
        counters: 0-dim state besides ``step`` (NAdam's ``mu_product``) with its initial
            value; stored like ``step``, in torch's scalar dtype on the CPU.
        eager_state: torch creates the state in the constructor (Adagrad), so a
            never-stepped parameter keeps a step-0 state instead of none.
        refused: Options in ``REFUSED_OPTIONS`` this class has; a true value is an error.
    """

    kind: str
    options: str
    flags: Callable[[Mapping[str, Any]], Flags]
    hyper: Callable[[Mapping[str, Any]], dict[str, float]]
    state: Callable[[dict[str, bool]], tuple[str, ...]]
    update: Update
    init: Callable[[Tensor, Mapping[str, Any], str], Tensor] = lambda p, g, k: torch.zeros_like(p)
    counters: tuple[tuple[str, float], ...] = ()
    eager_state: bool = False
    refused: tuple[str, ...] = ()


OPTIMIZER_RULES: dict[type, OptimizerRule] = {}


def register_optimizer(cls: type, rule: OptimizerRule) -> None:
    """Register ``rule`` as the lowering of ``cls`` (one entry per ``torch.optim`` class)."""
    assert cls not in OPTIMIZER_RULES, cls
    OPTIMIZER_RULES[cls] = rule


def _flags(**values: Any) -> Flags:
    return tuple(sorted((k, bool(v)) for k, v in values.items()))


def _betas(g: Mapping[str, Any], *extra: str) -> dict[str, float]:
    beta1, beta2 = g["betas"]
    return {"lr": g["lr"], "beta1": beta1, "beta2": beta2, "eps": g["eps"], "weight_decay": g["weight_decay"]} | {
        k: g[k] for k in extra
    }


def _pick(*keys: str) -> Callable[[Mapping[str, Any]], dict[str, float]]:
    return lambda g: {k: g[k] for k in keys}


def _pow(base: Tensor, exponent: float | Tensor) -> Tensor:
    """libm ``pow`` as Python's ``float ** float`` computes it (never torch's sqrt/square shortcuts)."""
    if not isinstance(exponent, Tensor):
        exponent = torch.full_like(base, exponent)
    return base**exponent


def _lerp(start: Tensor, end: Tensor, weight: Tensor) -> Tensor:
    """``start.lerp_(end, weight)`` with a Python-float weight."""
    return torch.lerp(start, end, weight.to(dtype=start.dtype, device=start.device))


def _ema_sq(avg: Tensor, grad: Tensor, decay: Tensor) -> Tensor:
    """``avg.mul_(decay).addcmul_(grad, grad, value=1 - decay)``."""
    dt = avg.dtype
    return torch.addcmul(avg * decay.to(dt), (1 - decay).to(dt) * grad, grad)


def _addcdiv(x: Tensor, a: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """``x.addcdiv(y, z, value=a)`` with a Python-float ``a``."""
    return x + a.to(x.dtype) * y / z


def _decay(param: Tensor, grad: Tensor, h: dict[str, Tensor], f: dict[str, bool]) -> tuple[Tensor, Tensor]:
    """Weight decay, coupled (``grad.add(param, alpha=wd)``) or decoupled (``param.mul_(1 - lr * wd)``)."""
    if f.get("weight_decay"):
        if f.get("decoupled"):
            param = param * (1 - h["lr"] * h["weight_decay"]).to(param.dtype)
        else:
            grad = torch.addcmul(grad, param, h["weight_decay"].to(param.dtype))
    return param, grad


# -- SGD, Adam, AdamW ----------------------------------------------------------------------------
def _sgd_update(
    param: Tensor, grad: Tensor, st: dict[str, Tensor], h: dict[str, Tensor], f: dict[str, bool]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mirror ``torch.optim.sgd._single_tensor_sgd`` for one parameter."""
    out = {"step": st["step"] + 1}
    dt = param.dtype
    if f["maximize"]:
        grad = -grad
    param, grad = _decay(param, grad, h, f)
    if f["momentum"]:
        m = h["momentum"].to(dt)
        if f["dampening"]:
            running = torch.addcmul(st["momentum_buffer"] * m, grad, (1 - h["dampening"]).to(dt))
            first = (st["step"] == 0).to(param.device)
            buf = torch.where(first, grad, running)  # torch: buf = grad on the first step
        else:
            # torch's first step sets buf = grad; read_state starts buf at zeros, and
            # 0·m + grad == grad exactly, so no branch is needed without dampening
            buf = st["momentum_buffer"] * m + grad
        out["momentum_buffer"] = buf
        grad = torch.addcmul(grad, buf, m) if f["nesterov"] else buf
    return torch.addcmul(param, grad, (-h["lr"]).to(dt)), out


def _adam_moments(
    param: Tensor, grad: Tensor, st: dict[str, Tensor], h: dict[str, Tensor], f: dict[str, bool]
) -> tuple[Tensor, dict[str, Tensor]]:
    """What Adam and RAdam do first, as torch does it: count the step, apply ``maximize`` and
    weight decay, update both moment averages; return the (decayed) parameter and the new
    ``step``/``exp_avg``/``exp_avg_sq`` state."""
    step = st["step"] + 1
    if f["maximize"]:
        grad = -grad
    param, grad = _decay(param, grad, h, f)
    exp_avg = _lerp(st["exp_avg"], grad, 1 - h["beta1"])
    exp_avg_sq = _ema_sq(st["exp_avg_sq"], grad, h["beta2"])
    return param, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def _adam_update(
    param: Tensor, grad: Tensor, st: dict[str, Tensor], h: dict[str, Tensor], f: dict[str, bool]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mirror ``torch.optim.adam._single_tensor_adam`` (non-capturable) for one parameter."""
    param, out = _adam_moments(param, grad, st, h, f)
    step, exp_avg, exp_avg_sq = out["step"], out["exp_avg"], out["exp_avg_sq"]
    lr, beta1, beta2 = h["lr"], h["beta1"], h["beta2"]
    dt = param.dtype
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = _pow(1 - beta2**step, 0.5)
    second = exp_avg_sq
    if f["amsgrad"]:
        second = out["max_exp_avg_sq"] = torch.maximum(st["max_exp_avg_sq"], exp_avg_sq)
    denom = second.sqrt() / bias_correction2_sqrt.to(dt) + h["eps"].to(dt)
    return _addcdiv(param, -step_size, exp_avg, denom), out


def _sgd_flags(g: Mapping[str, Any]) -> Flags:
    return _flags(
        maximize=g["maximize"],
        weight_decay=float(g["weight_decay"]) != 0,
        momentum=float(g["momentum"]) != 0,
        dampening=float(g["dampening"]) != 0,
        nesterov=g["nesterov"],
    )


def _adam_flags(decoupled_default: bool) -> Callable[[Mapping[str, Any]], Flags]:
    return lambda g: _flags(
        maximize=g["maximize"],
        weight_decay=float(g["weight_decay"]) != 0,
        amsgrad=g["amsgrad"],
        decoupled=g.get("decoupled_weight_decay", decoupled_default),
    )


def _adam_state(f: dict[str, bool]) -> tuple[str, ...]:
    return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if f["amsgrad"] else ("exp_avg", "exp_avg_sq")


register_optimizer(
    torch.optim.SGD,
    OptimizerRule(
        "sgd",
        "SGD (momentum, dampening, nesterov, weight_decay, maximize)",
        _sgd_flags,
        _pick("lr", "momentum", "dampening", "weight_decay"),
        lambda f: ("momentum_buffer",) if f["momentum"] else (),
        _sgd_update,
    ),
)
for _cls, _kind in ((torch.optim.Adam, "adam"), (torch.optim.AdamW, "adamw")):
    register_optimizer(
        _cls,
        OptimizerRule(
            _kind,
            f"{_cls.__name__} (weight_decay, amsgrad, maximize)",
            _adam_flags(_kind == "adamw"),
            _betas,
            _adam_state,
            _adam_update,
        ),
    )


# -- RMSprop, Adagrad, Adadelta, Adamax ----------------------------------------------------------
def _rmsprop_update(
    param: Tensor, grad: Tensor, st: dict[str, Tensor], h: dict[str, Tensor], f: dict[str, bool]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mirror ``torch.optim.rmsprop._single_tensor_rmsprop`` for one parameter."""
    dt = param.dtype
    if f["maximize"]:
        grad = -grad
    param, grad = _decay(param, grad, h, f)
    square_avg = _ema_sq(st["square_avg"], grad, h["alpha"])
    out = {"step": st["step"] + 1, "square_avg": square_avg}
    if f["centered"]:
        grad_avg = out["grad_avg"] = _lerp(st["grad_avg"], grad, 1 - h["alpha"])
        avg = torch.addcmul(square_avg, -grad_avg, grad_avg).sqrt()  # addcmul(.., value=-1): -1·x is exact
    else:
        avg = square_avg.sqrt()
    avg = avg + h["eps"].to(dt)
    if f["momentum"]:
        buf = out["momentum_buffer"] = torch.addcdiv(st["momentum_buffer"] * h["momentum"].to(dt), grad, avg)
        return torch.addcmul(param, buf, (-h["lr"]).to(dt)), out
    return _addcdiv(param, -h["lr"], grad, avg), out


def _adagrad_update(
    param: Tensor, grad: Tensor, st: dict[str, Tensor], h: dict[str, Tensor], f: dict[str, bool]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mirror ``torch.optim.adagrad._single_tensor_adagrad`` (dense gradients) for one parameter."""
    step = st["step"] + 1
    if f["maximize"]:
        grad = -grad
    param, grad = _decay(param, grad, h, f)
    clr = h["lr"] / (1 + (step - 1) * h["lr_decay"])
    state_sum = torch.addcmul(st["sum"], grad, grad)
    std = state_sum.sqrt() + h["eps"].to(param.dtype)
    return _addcdiv(param, -clr, grad, std), {"step": step, "sum": state_sum}


def _adadelta_update(
    param: Tensor, grad: Tensor, st: dict[str, Tensor], h: dict[str, Tensor], f: dict[str, bool]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mirror ``torch.optim.adadelta._single_tensor_adadelta`` for one parameter."""
    dt, rho, eps = param.dtype, h["rho"], h["eps"].to(param.dtype)
    if f["maximize"]:
        grad = -grad
    param, grad = _decay(param, grad, h, f)
    square_avg = _ema_sq(st["square_avg"], grad, rho)
    std = (square_avg + eps).sqrt()
    delta = (st["acc_delta"] + eps).sqrt() / std * grad
    acc_delta = _ema_sq(st["acc_delta"], delta, rho)
    new = torch.addcmul(param, delta, (-h["lr"]).to(dt))
    return new, {"step": st["step"] + 1, "square_avg": square_avg, "acc_delta": acc_delta}


def _adamax_update(
    param: Tensor, grad: Tensor, st: dict[str, Tensor], h: dict[str, Tensor], f: dict[str, bool]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mirror ``torch.optim.adamax._single_tensor_adamax`` (non-capturable) for one parameter."""
    step = st["step"] + 1
    if f["maximize"]:
        grad = -grad
    param, grad = _decay(param, grad, h, f)
    exp_avg = _lerp(st["exp_avg"], grad, 1 - h["beta1"])
    exp_inf = torch.maximum(st["exp_inf"] * h["beta2"].to(param.dtype), grad.abs() + h["eps"].to(param.dtype))
    clr = h["lr"] / (1 - h["beta1"] ** step)
    return _addcdiv(param, -clr, exp_avg, exp_inf), {"step": step, "exp_avg": exp_avg, "exp_inf": exp_inf}


def _plain_flags(g: Mapping[str, Any], **extra: Any) -> Flags:
    return _flags(maximize=g["maximize"], weight_decay=float(g["weight_decay"]) != 0, **extra)


register_optimizer(
    torch.optim.RMSprop,
    OptimizerRule(
        "rmsprop",
        "RMSprop (centered, momentum, weight_decay, maximize)",
        lambda g: _plain_flags(g, centered=g["centered"], momentum=float(g["momentum"]) > 0),
        _pick("lr", "alpha", "eps", "weight_decay", "momentum"),
        lambda f: (
            ("square_avg",) + (("momentum_buffer",) if f["momentum"] else ()) + (("grad_avg",) if f["centered"] else ())
        ),
        _rmsprop_update,
        refused=("capturable", "differentiable"),
    ),
)
register_optimizer(
    torch.optim.Adagrad,
    OptimizerRule(
        "adagrad",
        "Adagrad (lr_decay, weight_decay, initial_accumulator_value, maximize)",
        _plain_flags,
        _pick("lr", "lr_decay", "eps", "weight_decay"),
        lambda f: ("sum",),
        _adagrad_update,
        init=lambda p, g, k: torch.full_like(p, g["initial_accumulator_value"]),
        eager_state=True,
        refused=("differentiable", "fused"),
    ),
)
register_optimizer(
    torch.optim.Adadelta,
    OptimizerRule(
        "adadelta",
        "Adadelta (rho, weight_decay, maximize)",
        _plain_flags,
        _pick("lr", "rho", "eps", "weight_decay"),
        lambda f: ("square_avg", "acc_delta"),
        _adadelta_update,
        refused=("capturable", "differentiable"),
    ),
)
register_optimizer(
    torch.optim.Adamax,
    OptimizerRule(
        "adamax",
        "Adamax (weight_decay, maximize)",
        _plain_flags,
        _betas,
        lambda f: ("exp_avg", "exp_inf"),
        _adamax_update,
        refused=("capturable", "differentiable"),
    ),
)


# -- NAdam, RAdam ----------------------------------------------------------------------------------
def _nadam_update(
    param: Tensor, grad: Tensor, st: dict[str, Tensor], h: dict[str, Tensor], f: dict[str, bool]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mirror ``torch.optim.nadam._single_tensor_nadam`` (non-capturable) for one parameter."""
    step = st["step"] + 1
    lr, beta1, beta2, decay = h["lr"], h["beta1"], h["beta2"], h["momentum_decay"]
    if f["maximize"]:
        grad = -grad
    bias_correction2 = 1 - beta2**step
    param, grad = _decay(param, grad, h, f)
    mu = beta1 * (1.0 - 0.5 * _pow(torch.full_like(step, 0.96), step * decay))
    mu_next = beta1 * (1.0 - 0.5 * _pow(torch.full_like(step, 0.96), (step + 1) * decay))
    # torch multiplies its counter in its own dtype (float32 unless the default dtype is float64)
    mu_product = st["mu_product"] * mu.to(st["mu_product"].dtype)
    exp_avg = _lerp(st["exp_avg"], grad, 1 - beta1)
    exp_avg_sq = _ema_sq(st["exp_avg_sq"], grad, beta2)
    denom = (exp_avg_sq / bias_correction2.to(param.dtype)).sqrt() + h["eps"].to(param.dtype)
    product = mu_product.to(torch.float64)
    param = _addcdiv(param, -lr * (1.0 - mu) / (1.0 - product), grad, denom)
    param = _addcdiv(param, (-lr * mu_next) / (1.0 - product * mu_next), exp_avg, denom)
    return param, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "mu_product": mu_product}


def _radam_update(
    param: Tensor, grad: Tensor, st: dict[str, Tensor], h: dict[str, Tensor], f: dict[str, bool]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mirror ``torch.optim.radam._single_tensor_radam`` (non-capturable) for one parameter.

    torch branches on ``rho_t > 5`` (a function of the step count only); here both sides
    are computed and selected, with the rectification's square root taken of a clamped
    argument, so the unselected side never puts a NaN into the derivative.
    """
    param, out = _adam_moments(param, grad, st, h, f)
    step, exp_avg, exp_avg_sq = out["step"], out["exp_avg"], out["exp_avg_sq"]
    lr, beta1, beta2 = h["lr"], h["beta1"], h["beta2"]
    dt = param.dtype
    bias_correction2 = 1 - beta2**step
    corrected = exp_avg / (1 - beta1**step).to(dt)
    rho_inf = torch.full_like(beta2, 2.0) / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
    rectify = rho_t > 5.0
    ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
    rect = _pow(torch.where(rectify, ratio, torch.ones_like(ratio)), 0.5)
    adaptive = (exp_avg_sq.sqrt() + h["eps"].to(dt)).reciprocal() * _pow(bias_correction2, 0.5).to(dt)
    plain = corrected * lr.to(dt)
    rectified = plain * adaptive * rect.to(dt)
    return param - torch.where(rectify.to(param.device), rectified, plain), out


register_optimizer(
    torch.optim.NAdam,
    OptimizerRule(
        "nadam",
        "NAdam (momentum_decay, weight_decay, decoupled_weight_decay, maximize)",
        lambda g: _plain_flags(g, decoupled=g["decoupled_weight_decay"]),
        lambda g: _betas(g, "momentum_decay"),
        lambda f: ("exp_avg", "exp_avg_sq"),
        _nadam_update,
        counters=(("mu_product", 1.0),),
        refused=("capturable", "differentiable"),
    ),
)
register_optimizer(
    torch.optim.RAdam,
    OptimizerRule(
        "radam",
        "RAdam (weight_decay, decoupled_weight_decay, maximize)",
        lambda g: _plain_flags(g, decoupled=g["decoupled_weight_decay"]),
        _betas,
        lambda f: ("exp_avg", "exp_avg_sq"),
        _radam_update,
        refused=("capturable", "differentiable"),
    ),
)

SUPPORTED = ", ".join(rule.options for rule in OPTIMIZER_RULES.values())
