"""The step function of one problem: loss, gradients, hypergradients, optimizer update.

This is the one implementation of the math. ``build_step`` returns a pure function
of a pytree of tensors; the eager backend calls it directly and the fx/inductor
backends trace it with make_fx.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from mlocompile.distributed import average_gradients
from mlocompile.functional import FunctionalProgram, Params, tree_norm, with_params
from mlocompile.hypergrad import METHOD_RULES, LowerOptimizer, StepEnv, Window, run_plan
from mlocompile.ir import annotate
from mlocompile.optim import FunctionalOptimizer
from mlocompile.program import ProgramGraph

StepFn = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class StepVariant:
    """The static choices that select a step graph for one problem."""

    problem: str
    update: bool = True

    @property
    def title(self) -> str:
        """Name of the emitted graph, e.g. ``step_inner`` or ``step_inner_accumulate``."""
        return f"step_{self.problem}" + ("" if self.update else "_accumulate")


def needed_batches(program: ProgramGraph, name: str) -> list[str]:
    """Problems whose last batch the step of ``name`` reads (curr of its VJP ops)."""
    return sorted({op.curr for op in program.plans.get(name, [])})


def needed_windows(program: ProgramGraph, name: str) -> list[str]:
    """Problems whose unroll window the step of ``name`` replays (currs whose method has a window: itd)."""
    return [c for c in needed_batches(program, name) if METHOD_RULES[program.problems[c].config.type].window]


def needed_optimizers(program: ProgramGraph, name: str) -> list[str]:
    """Problems whose optimizer state the step of ``name`` reads (currs whose method names some: sama)."""
    return [c for c in needed_batches(program, name) if METHOD_RULES[program.problems[c].config.type].optimizer_state]


def _clip(grads: Params, max_norm: float) -> Params:
    norm = tree_norm({k: g.detach() for k, g in grads.items()})
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return {k: g * coef for k, g in grads.items()}


def _gradients(
    fp: FunctionalProgram, name: str, wrt_names: list[str], inputs: dict[str, Any], scale: Tensor | None
) -> tuple[dict[str, Params], Tensor, dict[str, Tensor], Any]:
    """The training step's forward and backward: gradients of ``name``'s loss w.r.t. ``wrt_names``."""
    params, buffers = inputs["params"], inputs["buffers"]
    accumulation = fp.problems[name].config.gradient_accumulation

    def objective(wrt: dict[str, Params]) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor], Any]]:
        merged = params
        for key, value in wrt.items():
            merged = with_params(merged, key, value)
        loss, logs, state = fp.loss_and_buffers(name, merged, buffers, inputs["batch"])
        scaled = loss / accumulation
        return (scaled if scale is None else scaled * scale), (loss, logs, state)

    with annotate(problem=name, role="grad"):
        # NOTE: this forward is the training step's; it alone advances buffers (BatchNorm running
        # statistics). Re-evaluations inside hypergradients read them and drop their updates.
        grads, (loss, logs, new_buffers) = torch.func.grad(objective, has_aux=True)({k: params[k] for k in wrt_names})
        if scale is not None:  # unscale at once: hypergradients and updates see true values
            grads = {p: {k: g / scale for k, g in gs.items()} for p, gs in grads.items()}
    return grads, loss, logs, new_buffers


def _update(
    problem: Any, opt: FunctionalOptimizer, params: Params, total: Params, inputs: dict[str, Any], found_inf: Any
) -> tuple[Params, Any]:
    """The update of a step: callbacks, clipping, the optimizer, and (fp16) skipping on overflow."""
    name, cfg = problem.name, problem.config
    with annotate(problem=name, role="callback"):
        if problem.is_implemented("grad_callback"):
            total = problem.grad_callback(total) or total
    with annotate(problem=name, role="update"):
        if cfg.gradient_clipping > 0:
            total = _clip(total, cfg.gradient_clipping)
        new_params, new_state = opt.update(params, total, inputs["opt"], inputs["hyper"])
    with annotate(problem=name, role="callback"):
        if problem.is_implemented("param_callback"):
            new_params = problem.param_callback(new_params) or new_params
    if found_inf is not None:
        with annotate(problem=name, role="update"):  # skip the step on overflow (GradScaler)
            new_params = {k: torch.where(found_inf, params[k], t) for k, t in new_params.items()}
            new_state = {
                k: {s: torch.where(found_inf, inputs["opt"][k][s], t) for s, t in st.items()}
                for k, st in new_state.items()
            }
    if "last_grad" in METHOD_RULES[cfg.type].optimizer_state.get(opt.kind, ()):
        # NOTE: as Betty's ImplicitProblem, a sama problem keeps the gradient it applied (after
        # callbacks and clipping) in its optimizer state: its uppers' preconditioner reads it.
        # A skipped or non-finite step is not written back at all, this entry included.
        new_state = {k: {**st, "last_grad": total[k]} if k in total else st for k, st in new_state.items()}
    return new_params, new_state


def build_step(
    fp: FunctionalProgram,
    program: ProgramGraph,
    optimizers: dict[str, FunctionalOptimizer],
    init_sources: dict[str, str],
    variant: StepVariant,
    world_size: int = 1,
    memory_budget: float | None = None,
    guard_non_finite: bool = False,
) -> StepFn:
    """Return the pure step function of ``variant.problem``.

    Inputs (a dict): ``params``/``buffers`` of every problem, ``batch`` (this step's),
    ``last`` (last batches of the problems on this problem's paths), ``opt`` and
    ``hyper`` (optimizer state and hyperparameters), ``acc`` (accumulated gradient,
    possibly empty), ``windows`` (itd replays) and ``lower_opt`` (the optimizer state and
    hyperparameters of the problems whose method reads them: sama); ``memory_budget`` (EngineConfig's)
    cuts itd replays into segments; with ``guard_non_finite`` an update whose loss or gradient
    is not finite returns the old parameters and state (an update that overwrites its inputs
    then leaves them intact). Outputs: ``params``, ``opt``,
    ``acc``, ``loss``, ``grad_norm``, ``logs`` and ``buffers`` (every problem's buffers after
    this step's forward: BatchNorm running statistics advanced once per step).
    """
    name = variant.problem
    problem = program.problems[name]
    plan = program.plans.get(name, [])
    ends = program.path_ends.get(name, [])
    firsts = sorted({op.curr for op in plan if op.source is None})
    opt = optimizers[name]
    # NOTE: CPU/GPU flash attention kernels have no double backward; neumann, cg and itd
    # differentiate the lower's gradient, so attention runs as its math decomposition there
    second_order = any(METHOD_RULES[program.problems[op.curr].config.type].second_order for op in plan)

    def step(inputs: dict[str, Any]) -> dict[str, Any]:
        # NOTE: the outer annotation tags glue ops (detaches, sums) nothing more specific claims
        kernels = sdpa_kernel(SDPBackend.MATH) if second_order else contextlib.nullcontext()
        with annotate(problem=name, role="update"), kernels:
            return body(inputs)

    def body(inputs: dict[str, Any]) -> dict[str, Any]:
        params, buffers = inputs["params"], inputs["buffers"]
        scale = inputs.get("scale")  # fp16 only: dynamic loss scale, as GradScaler keeps it
        grads, loss, logs, new_buffers = _gradients(fp, name, [name, *firsts], inputs, scale)
        total = dict(grads[name])
        if plan:
            windows = {k: Window(**w) for k, w in inputs["windows"].items()}
            lower_opt = {k: LowerOptimizer(**o) for k, o in inputs["lower_opt"].items()}
            env = StepEnv(
                fp, params, buffers, inputs["last"], optimizers, windows, init_sources, memory_budget, lower_opt
            )
            hyper = run_plan(env, name, plan, ends, {c: grads[c] for c in firsts})
            with annotate(problem=name, role="hypergrad"):
                total = {k: g + hyper[k] for k, g in total.items()}
        with annotate(problem=name, role="update"):
            if inputs["acc"]:
                total = {k: g + inputs["acc"][k] for k, g in total.items()}
        if world_size > 1 and variant.update:
            with annotate(problem=name, role="comm"):  # DDP: the averaged gradient is what every rank applies
                total = average_gradients(total, world_size)
        with annotate(problem=name, role="update"):
            grad_norm = tree_norm(total)
        out: dict[str, Any] = {
            "loss": loss.detach(),
            "grad_norm": grad_norm.detach(),
            "logs": logs,
            "buffers": {p: bs for p, bs in new_buffers.items() if bs},
        }
        found_inf = ~torch.isfinite(grad_norm) if scale is not None else None
        if found_inf is not None:
            out["found_inf"] = found_inf
        elif guard_non_finite and variant.update:
            with annotate(problem=name, role="update"):
                found_inf = ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
        if not variant.update:
            out.update(params={}, opt={}, acc=total)
            return out
        new_params, new_state = _update(problem, opt, params[name], total, inputs, found_inf)
        out.update(params=new_params, opt=new_state, acc={})
        return out

    return step
