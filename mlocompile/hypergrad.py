"""Best-response vector-Jacobian products, one rule per method (darts, sama, neumann, cg, itd).

Each rule computes ``(∂θ*_curr/∂θ_prev)ᵀ v`` for a vector ``v`` over ``curr``'s
parameters, evaluating ``curr``'s loss on its last batch at the current weights.
Rules are pure functions of explicit tensors: the eager backend runs them as they
are and make_fx traces them into the step graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import Tensor

from mlocompile import symbols as S
from mlocompile.errors import ProgramError
from mlocompile.functional import FunctionalProgram, Params, ProgramParams, tree_axpy, tree_dot, tree_norm, with_params
from mlocompile.ir import annotate
from mlocompile.optim import FunctionalOptimizer, StateDict
from mlocompile.regions import call_twice
from mlocompile.rng import set_rng_states


@dataclass
class Window:
    """What ``itd`` replays: ``curr``'s state at the unroll start; per step: hyperparameters, batch,
    all parameters, and the random-generator states the live step began with (``rng.record_rng_states``)."""

    params: Params
    buffers: Params
    opt_state: StateDict
    hypers: list[dict[str, Tensor]]
    batches: list[Any]
    others: list[ProgramParams]
    rng: list[dict[str, Tensor]]


@dataclass
class LowerOptimizer:
    """A lower problem's optimizer state and hyperparameters, for a method that reads them (sama).

    ``state`` holds, per parameter, the entries of ``optimizer.state`` the method names
    (zeros where torch has none yet); ``hyper`` is ``FunctionalOptimizer.hyperparameters()``.
    """

    state: StateDict
    hyper: dict[str, Tensor]


@dataclass
class StepEnv:
    """Everything a best-response rule may read, as explicit tensors."""

    fp: FunctionalProgram
    params: ProgramParams
    buffers: ProgramParams
    batches: dict[str, Any]
    optimizers: dict[str, FunctionalOptimizer]
    windows: dict[str, Window] = field(default_factory=dict)
    init_sources: dict[str, str] = field(default_factory=dict)
    memory_budget: float | None = None  # EngineConfig.memory_budget
    # optimizer state and hyperparameters of the problems whose method reads them (sama), by problem
    lower_opt: dict[str, LowerOptimizer] = field(default_factory=dict)

    def itd_segments(self, curr: str) -> int:
        """How many segments ``curr``'s itd replay is cut into (1: not checkpointed).

        ``Config.itd_segments`` when set; otherwise, under a memory budget, ⌈1/b⌉ + 1 for
        a fraction b (one replayed segment holds ~1/S of the unsegmented step's values,
        and the S stored segment starts need room too) or ⌈√K⌉ for a budget in bytes
        (the classic choice); without a budget, 1.
        """
        cfg = self.fp.problems[curr].config
        if cfg.itd_segments > 0:
            return cfg.itd_segments
        budget = self.memory_budget
        if budget is None:
            return 1
        return math.ceil(1 / budget) + 1 if budget <= 1 else math.ceil(math.sqrt(cfg.unroll_steps))

    def loss_of(self, curr: str, prev: str) -> Callable[[Params, Params], Tensor]:
        """Return ``(w_curr, w_prev) -> C_curr`` on curr's last batch, all else fixed."""

        def fn(w: Params, lam: Params) -> Tensor:
            params = with_params(with_params(self.params, prev, lam), curr, w)
            return self.fp.loss(curr, params, self.buffers, self.batches[curr])[0]

        return fn


VjpRule = Callable[[StepEnv, str, str, Params], Params]
OptimizerCheck = Callable[[str, FunctionalOptimizer], None]  # (problem name, its optimizer) -> raise or not


@dataclass(frozen=True)
class MethodRule:
    """Everything mlocompile knows about one best-response method: a new method is one rule.

    ``vjp`` computes the product; ``fields`` are the ``Config`` fields it reads;
    ``window`` means it replays the unroll window (the engine then records every live
    step's inputs, and updates may not donate the parameters the window holds);
    ``second_order`` means it differentiates the lower problem's gradient (attention
    then runs as its math kernel, which has a double backward); ``optimizer_state`` names,
    per optimizer kind (``FunctionalOptimizer.kind``), the entries of the lower problem's
    ``optimizer.state`` it reads (the step then gets them and the lower's hyperparameters
    as ``StepEnv.lower_opt``; a problem whose entries include ``"last_grad"`` keeps the
    gradient its update applied there, as Betty's sama does) and ``check_optimizer``
    raises ProgramError for a lower optimizer setting it cannot use, each time they are
    read; ``flops`` and ``memory`` state one product's cost in the symbols of
    ``mlocompile.symbols``.
    """

    name: str
    vjp: VjpRule
    fields: tuple[str, ...]
    window: bool
    second_order: bool
    flops: sympy.Expr
    memory: sympy.Expr
    optimizer_state: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    check_optimizer: OptimizerCheck | None = None


METHOD_RULES: dict[str, MethodRule] = {}


def register_method(
    name: str,
    *,
    fields: tuple[str, ...],
    window: bool = False,
    second_order: bool,
    flops: sympy.Expr,
    memory: sympy.Expr,
    optimizer_state: Mapping[str, tuple[str, ...]] | None = None,
    check_optimizer: OptimizerCheck | None = None,
) -> Callable[[VjpRule], VjpRule]:
    """Register ``name``'s best-response VJP with its facts (see ``MethodRule``)."""

    def deco(vjp: VjpRule) -> VjpRule:
        METHOD_RULES[name] = MethodRule(
            name, vjp, fields, window, second_order, flops, memory, dict(optimizer_state or {}), check_optimizer
        )
        return vjp

    return deco


@register_method(
    "darts",
    fields=("darts_alpha",),
    second_order=False,
    # 2 gradients w.r.t. λ at w ± eps·v; ‖v‖ (2d), two axpys (4d), the difference quotient (3p)
    flops=2 * S.G + 6 * S.d + 3 * S.p,
    # w, v, one perturbed copy; λ and two λ-gradients; activations of one forward/backward
    memory=3 * S.d + 3 * S.p + S.B * S.a,
)
def darts_vjp(env: StepEnv, curr: str, prev: str, v: Params) -> Params:
    """Finite-difference ``−∇²_{λw}L·v`` with ``eps = darts_alpha / ‖v‖`` (Hessian⁻¹ ≈ I)."""
    return _finite_difference(env, curr, prev, v, env.fp.problems[curr].config.darts_alpha)


def _finite_difference(env: StepEnv, curr: str, prev: str, v: Params, alpha: float) -> Params:
    """``(∇_λL(w − εv) − ∇_λL(w + εv)) / 2ε`` with ``ε = alpha / (‖v‖ + 1e-15)``, as Betty's darts."""
    eps = alpha / (tree_norm(v) + 1e-15)
    loss = env.loss_of(curr, prev)
    w = env.params[curr]
    grad_prev = torch.func.grad(lambda lam, w_: loss(w_, lam), argnums=0)
    # NOTE: the two evaluations are one function of inputs of one shape: traced once, the second copied
    g_plus, g_minus = call_twice(
        grad_prev, (env.params[prev], tree_axpy(eps, v, w)), lambda: (env.params[prev], tree_axpy(-eps, v, w))
    )
    return {k: (g_minus[k] - g_plus[k]) / (2 * eps) for k in g_plus}


# SAMA's preconditioner reads these entries of an Adam/AdamW state; ``last_grad`` is the gradient
# the lower problem's last update applied, which its step keeps in the state (``step._update``).
# Under SGD the preconditioner is the identity and reads nothing.
SAMA_STATE = ("exp_avg", "exp_avg_sq", "last_grad")
SAMA_PRECONDITIONED = ("adam", "adamw")  # FunctionalOptimizer.kind


def check_sama_optimizer(problem: str, opt: FunctionalOptimizer) -> None:
    """Raise ProgramError when ``problem``'s optimizer has a setting SAMA's preconditioner cannot use.

    Its Adam preconditioner divides by β₂ (Betty's gives NaN for β₂ = 0).
    """
    if opt.kind not in SAMA_PRECONDITIONED:
        return
    for i, group in enumerate(opt.optimizer.param_groups):
        beta2 = float(group["betas"][1])
        if beta2 == 0:
            raise ProgramError(
                f"problem {problem!r}: type='sama' preconditions with the Adam state of its optimizer, which "
                f"divides by beta2, and param_groups[{i}] has betas[1]={beta2!r}; use beta2 > 0 or type='darts'"
            )


@register_method(
    "sama",
    fields=("sama_adam_alpha", "sama_multitask"),
    second_order=False,
    optimizer_state={kind: SAMA_STATE for kind in SAMA_PRECONDITIONED},
    check_optimizer=check_sama_optimizer,
    # darts' 2G + 6d + 3p, plus the Adam preconditioner: 18 elementwise ops per parameter
    flops=2 * S.G + 24 * S.d + 3 * S.p,
    # darts' 3d + 3p + Ba, plus the state read (exp_avg, exp_avg_sq, last_grad) and the scaled vector
    memory=7 * S.d + 3 * S.p + S.B * S.a,
)
def sama_vjp(env: StepEnv, curr: str, prev: str, v: Params) -> Params:
    """darts' finite difference on ``v`` preconditioned by ``curr``'s optimizer (Betty's ``sama``).

    ``u = precondition(v)`` (``sama_preconditioner``; the identity under SGD), then
    ``(∇_λL(w − εu) − ∇_λL(w + εu)) / 2ε`` with ``ε = sama_adam_alpha / ‖u‖``.
    """
    opt = env.optimizers[curr]
    if opt.kind in SAMA_PRECONDITIONED:
        lower = env.lower_opt[curr]
        v = sama_preconditioner(opt, lower.state, lower.hyper, v)
    return _finite_difference(env, curr, prev, v, env.fp.problems[curr].config.sama_adam_alpha)


def sama_preconditioner(opt: FunctionalOptimizer, state: StateDict, hyper: dict[str, Tensor], v: Params) -> Params:
    """Scale ``v`` by Betty's diagonal Adam preconditioner of ``curr``'s last update, per parameter.

    With ``g`` the gradient of that update (``last_grad``), ``m``/``s`` the moments after it
    and the moments before it recovered as ``m₀ = (m − (1−β₁)g)/β₁`` (0 for β₁ = 0) and
    ``s₀ = (s − (1−β₂)g²)/β₂``: ``v · lr · ((1−β₁)β₂ s₀ − β₁(1−β₂) g m₀) / (√s + eps)³``.
    As Betty's, it reads only these (not weight decay, amsgrad, maximize or bias correction),
    and the group's ``lr``, ``betas`` and ``eps`` now; β₂ = 0 is refused (``check_sama_optimizer``).
    """
    out: Params = {}
    for k, vec in v.items():
        h = opt.group_hyperparameters(k, hyper)
        st = state[k]
        g, m, s = st["last_grad"].detach(), st["exp_avg"].detach(), st["exp_avg_sq"].detach()
        b1, b2, eps, lr = h["beta1"], h["beta2"], h["eps"], h["lr"]
        dt = vec.dtype
        # NOTE: scalars in float64 and cast where used, as torch casts Betty's Python floats;
        # the order of operations is Betty's (utils.precondition_adam)
        b1_safe = torch.where(b1 == 0, torch.ones_like(b1), b1)
        m_old = (m - (1 - b1).to(dt) * g) / b1_safe.to(dt) * (b1 != 0).to(dt)
        s_old = (s - (1 - b2).to(dt) * g * g) / b2.to(dt)
        scale = ((1 - b1) * b2).to(dt) * s_old - (b1 * (1 - b2)).to(dt) * g * m_old
        scale = scale / (torch.sqrt(s) + eps.to(dt)) ** 3
        out[k] = vec * scale * lr.to(dt)
    return out


def _linearized_grad(env: StepEnv, curr: str, prev: str) -> Callable[[Params], tuple[Params, Params]]:
    """Return ``u -> (H u, ∇²_{λw}L u)`` from one linearization of ``∇_w L``."""
    loss = env.loss_of(curr, prev)
    grad_w = torch.func.grad(loss, argnums=0)
    vjp_fn = torch.func.vjp(grad_w, env.params[curr], env.params[prev])[1]
    return vjp_fn  # type: ignore[no-any-return]


@register_method(
    "neumann",
    fields=("neumann_iterations", "neumann_alpha"),
    second_order=True,
    # linearize ∇_w L once, I Hessian VJPs + 1 mixed VJP; per iteration term/acc updates (3d)
    flops=S.G + S.HVP_FACTOR * S.G * (S.iters + 1) + 3 * S.iters * S.d + S.d + S.p,
    # w, λ; residuals of the linearized gradient (2Ba); v, term, acc, Hv; the result
    memory=5 * S.d + 2 * S.p + 2 * S.B * S.a,
)
def neumann_vjp(env: StepEnv, curr: str, prev: str, v: Params) -> Params:
    """``−∇²_{λw}L · α Σ_{j=0..K} (I − αH)^j v`` (Lorraine et al.)."""
    cfg = env.fp.problems[curr].config
    alpha = cfg.neumann_alpha
    lin = _linearized_grad(env, curr, prev)
    term, acc = v, v
    for _ in range(cfg.neumann_iterations):
        hv = lin(term)[0]
        term = {k: term[k] - alpha * hv[k] for k in term}
        acc = {k: acc[k] + term[k] for k in acc}
    mixed = lin({k: alpha * a for k, a in acc.items()})[1]
    return {k: -m for k, m in mixed.items()}


@register_method(
    "cg",
    fields=("cg_iterations", "cg_alpha"),
    second_order=True,
    # as neumann, plus per iteration 2 dots and 3 axpys and a scale (11d)
    flops=S.G + S.HVP_FACTOR * S.G * (S.iters + 1) + 11 * S.iters * S.d + 3 * S.d + S.p,
    # w, λ; residuals (2Ba); v, x, r, p, Ap; the result
    memory=6 * S.d + 2 * S.p + 2 * S.B * S.a,
)
def cg_vjp(env: StepEnv, curr: str, prev: str, v: Params) -> Params:
    """``−∇²_{λw}L · x`` with ``x ≈ H⁻¹ v`` from conjugate gradient on ``(cg_alpha·H) x' = v``."""
    cfg = env.fp.problems[curr].config
    scale = cfg.cg_alpha
    lin = _linearized_grad(env, curr, prev)
    x = {k: torch.zeros_like(t) for k, t in v.items()}
    r, p = v, v
    rs = tree_dot(r, r)
    for _ in range(cfg.cg_iterations):
        ap = {k: scale * t for k, t in lin(p)[0].items()}
        denom = tree_dot(p, ap)
        step = rs / torch.where(denom == 0, torch.ones_like(denom), denom)
        x = tree_axpy(step, p, x)
        r = tree_axpy(-step, ap, r)
        rs_new = tree_dot(r, r)
        beta = rs_new / torch.where(rs == 0, torch.ones_like(rs), rs)
        p = tree_axpy(beta, p, r)
        rs = rs_new
    mixed = lin({k: scale * t for k, t in x.items()})[1]
    return {k: -m for k, m in mixed.items()}


@register_method(
    "itd",
    fields=("unroll_steps", "itd_segments"),
    window=True,
    second_order=True,
    # K replayed (gradient + update + shifted λ), then the reverse of each (HVP-class + update VJP)
    flops=S.K * (S.G + S.UPDATE_FLOPS * S.d + S.p) + S.K * (S.HVP_FACTOR * S.G + S.UPDATE_FLOPS * S.d + S.p),
    # per replayed step: weights, optimizer state, shifted λ and the gradient's residuals; plus w, v, λ
    memory=S.K * (2 * S.d + S.p + 2 * S.B * S.a) + 2 * S.d + S.p,
)
def itd_vjp(env: StepEnv, curr: str, prev: str, v: Params) -> Params:
    """Reverse mode through ``curr``'s replayed optimizer updates since its unroll start.

    The replay uses each step's recorded parameters of every other problem and
    starts each step from the generator state its live step began with (the same
    dropout masks), so it reproduces the actual trajectory exactly; the generators
    are put back afterwards, as if the replay drew nothing. ``prev``'s recorded values enter as
    ``recorded + (λ − stop_grad(λ))``, which keeps the values and lets the
    derivative with respect to the current ``λ`` flow through every step.

    With ``S = itd_segments(...) > 1`` the K steps are cut into S segments
    (checkpointing): a forward sweep keeps only each segment's starting parameters
    and optimizer state, and the reverse sweep replays one segment at a time, so
    one segment's intermediates are alive instead of all K steps' (one extra forward
    of the first S−1 segments).
    """
    window = env.windows[curr]
    opt = env.optimizers[curr]
    problem = env.fp.problems[curr]
    init_from = env.init_sources.get(curr)
    buffers = with_params(env.buffers, curr, window.buffers)
    steps = list(zip(window.hypers, window.batches, window.others, window.rng))

    def replay(w: Params, state: StateDict, lam: Params | None, first: int, last: int) -> tuple[Params, StateDict]:
        # lam None: values only (the forward sweep), recorded parameters used as they are
        delta = None if lam is None else {k: t - t.detach() for k, t in lam.items()}
        if first == 0 and init_from == prev and delta is not None:
            w = {k: t + delta[k] for k, t in w.items()}
        outside: dict[str, Tensor] | None = None
        for hyper, batch, recorded, rng in steps[first:last]:
            before = set_rng_states(rng)
            outside = before if outside is None else outside
            params = recorded
            if delta is not None:
                params = with_params(recorded, prev, {k: t + delta[k] for k, t in recorded[prev].items()})

            def loss(w_: Params, batch: Any = batch, params: ProgramParams = params) -> Tensor:
                return env.fp.loss(curr, with_params(params, curr, w_), buffers, batch)[0]

            grads = torch.func.grad(loss)(w)
            if problem.is_implemented("grad_callback"):
                grads = problem.grad_callback(grads) or grads  # type: ignore[attr-defined]
            w, state = opt.update(w, grads, state, hyper)
            if problem.is_implemented("param_callback"):
                w = problem.param_callback(w) or w  # type: ignore[attr-defined]
        if outside is not None:
            set_rng_states(outside)
        return w, state

    lam0 = env.params[prev]
    bounds = segment_bounds(len(steps), env.itd_segments(curr))
    if len(bounds) == 2:
        vjp_fn = torch.func.vjp(lambda lam: replay(window.params, window.opt_state, lam, 0, len(steps))[0], lam0)[1]
        return vjp_fn(v)[0]  # type: ignore[no-any-return]
    # forward sweep: only the segment starts stay alive (values need no derivative here)
    starts = [(window.params, window.opt_state)]
    for first, last in zip(bounds[:-2], bounds[1:-1]):
        with annotate(segment=f"sweep {first}-{last}"):
            starts.append(replay(*starts[-1], None, first, last))
    # reverse sweep, one segment at a time, carrying cotangents of (w, optimizer state)
    ct_w: Params = v
    ct_state: StateDict | None = None
    ct_lam: Params | None = None
    for (w, state), first, last in reversed(list(zip(starts, bounds[:-1], bounds[1:]))):
        with annotate(segment=f"replay {first}-{last}"):
            res = torch.func.vjp(lambda w_, st_, lam_, a=first, b=last: replay(w_, st_, lam_, a, b), w, state, lam0)
            state_out, vjp_fn = res[0][1], res[1]
            if ct_state is None:  # the final optimizer state does not reach the upper loss
                ct_state = torch.utils._pytree.tree_map(torch.zeros_like, state_out)
            ct_w, ct_state, part = vjp_fn((ct_w, ct_state))
        ct_lam = part if ct_lam is None else {k: ct_lam[k] + part[k] for k in part}
    assert ct_lam is not None
    return ct_lam


def segment_bounds(steps: int, segments: int) -> list[int]:
    """Split ``steps`` replayed steps into ``segments`` near-equal runs; return the boundaries.

    ``segment_bounds(20, 5) == [0, 4, 8, 12, 16, 20]``; ``segments <= 1`` gives ``[0, steps]``.
    """
    segments = max(1, min(segments, steps))
    return [round(i * steps / segments) for i in range(segments + 1)]


def run_plan(env: StepEnv, upper: str, plan: list, ends: list[int], first: dict[str, Params]) -> Params:
    """Evaluate an upper problem's VJP plan; return the summed hypergradient for ``upper``.

    ``first[curr]`` is ``∂C_upper/∂θ_curr`` for every chain end ``curr``.
    """
    outs: dict[int, Params] = {}
    for op in plan:
        vec = first[op.curr] if op.source is None else outs[op.source]
        method = env.fp.problems[op.curr].config.type
        with annotate(
            problem=upper, role="hypergrad", method=method, edge=f"{op.curr}->{op.prev}", path=f"{upper}.v{op.id}"
        ):
            outs[op.id] = METHOD_RULES[method].vjp(env, op.curr, op.prev, vec)
    total: Params = {}
    for end in ends:
        for k, t in outs[end].items():
            total[k] = total[k] + t if k in total else t
    return total
