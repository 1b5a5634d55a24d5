"""Betty 0.2.1's settings and hooks that need the program to check: honoured, or refused by name.

A Betty program ports by changing imports, so whatever it sets or overrides must either
mean here what it means in Betty or fail before the first step, saying what to use
instead. ``Config``/``EngineConfig`` check their own values; this module checks what
needs the problems and the program graph: overridden methods (detected on the classes,
as Betty's ``is_implemented`` would see them), the signatures of the traced callbacks,
``first_order``, ``allow_unused`` and the devices ``strategy="cpu"/"gpu"`` promise.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from mlocompile.errors import ProgramError
from mlocompile.problem import Problem
from mlocompile.program import ProgramGraph

# Betty's Problem methods a user may define that the engine here never calls, with what
# to do instead (Betty calls each from its eager step)
_NOT_CALLED = "Betty calls it from its eager step; here the step is traced and never calls it"
REFUSED_PROBLEM_HOOKS: dict[str, str] = {
    "custom_optimizer_step": (
        "the update is your torch.optim optimizer's, lowered into the traced step; transform gradients in "
        "grad_callback(self, grads) -> grads, parameters in param_callback(self, params) -> params, "
        "or use a supported optimizer"
    ),
    "get_batch_single_loader": "pass train_data_loader= (any re-iterable of batches); the engine iterates it",
    "validation_step": (
        "Betty 0.2.1 never calls it either; validation runs in your Engine subclass's validation(), every "
        "EngineConfig.valid_step steps: call it from there and rename it"
    ),
    "trainable_parameters": (
        "the problem trains its module's parameters with requires_grad=True; freeze the others "
        "(p.requires_grad_(False)) or give the problem a module holding only what it trains"
    ),
    "meta_trainable_parameters": (
        "hypergradients reach all trainable parameters of the upper problem; freeze the others "
        "(p.requires_grad_(False))"
    ),
    "parameters": "the problem's parameters are its module's; give it a module holding exactly those",
    "epoch_callback_exec": "define epoch_callback(self), which the engine calls when the first loader restarts",
}
for _name in (
    "training_step_exec",
    "get_loss",
    "backward",
    "one_step_descent",
    "step",
    "step_normal",
    "step_after_roll_back",
    "optimizer_step",
    "set_grads",
    "zero_grad",
    "clip_grad",
    "synchronize_params",
    "cache_states",
    "recover_states",
    "initialize",
    "patch_everything",
    "patch_module",
    "patch_optimizer",
    "patch_scheduler",
    "patch_data_loader",
    "log",
    "check_ready",
    "gradient_accumulation_boundary",
    "is_rank_zero",
    "configure_distributed_training",
    "configure_roll_back",
    "configure_device",
):
    REFUSED_PROBLEM_HOOKS[_name] = (
        "it is part of Betty's eager step, which the traced step replaces; write the loss in training_step, "
        "gradient and parameter changes in grad_callback(self, grads) / param_callback(self, params), settings "
        "in Config"
    )

# Betty's Engine methods that Betty calls from its own initialization and loop; the engine
# here has its own and never calls these (``validation``, ``train_step``, ``run``, ``train``
# and ``eval`` are called, so overriding them works as in Betty)
REFUSED_ENGINE_HOOKS: tuple[str, ...] = (
    "initialize",
    "parse_config",
    "configure_systems",
    "check_leaf",
    "find_paths",
    "dfs",
    "parse_dependency",
    "set_dependency",
    "set_problem_attr",
    "do_validation",
    "is_rank_zero",
    "cleanup",
)

# the functional callbacks: name -> what the traced step passes and expects back
CALLBACKS = {
    "grad_callback": "def grad_callback(self, grads):  # dict: parameter name -> gradient tensor\n"
    "        return {k: g.clamp(-1, 1) for k, g in grads.items()}",
    "param_callback": "def param_callback(self, params):  # dict: parameter name -> updated tensor\n"
    "        return {k: p.clamp(min=1e-8) for k, p in params.items()}",
}


def check_betty_settings(engine: object, base: type, program: ProgramGraph, strategy: str) -> None:
    """Check, at Engine construction, every Betty hook and setting that needs the program.

    ``engine`` is the Engine (``base`` its library class, whose overrides are checked).

    Raises:
        ProgramError: the first hook or setting that would not mean here what it means in
            Betty, naming it and what to use instead.
    """
    check_engine_class(engine, base)
    check_problem_hooks(program.problems.values())
    check_first_order(program)
    check_devices(program.problems.values(), strategy)


def user_defined(obj: object, name: str, base: type) -> bool:
    """Whether ``name`` is defined on ``obj``'s class below ``base`` in its MRO (a user's override)."""
    for cls in type(obj).__mro__:
        if cls is base or cls is object:
            return False
        if name in vars(cls):
            return True
    return False


def check_engine_class(engine: object, base: type) -> None:
    """Refuse overrides of Betty Engine methods that this engine never calls.

    Raises:
        ProgramError: naming the method, and the Engine methods that are honoured.
    """
    for name in REFUSED_ENGINE_HOOKS:
        if user_defined(engine, name, base):
            raise ProgramError(
                f"{type(engine).__name__}.{name} overrides a method Betty's Engine calls from its own "
                "initialization or loop; this Engine never calls it. Overridable here: validation(), "
                "train_step() (call super().train_step() from it), run(), train() and eval()"
            )


def check_problem_hooks(problems: Iterable[Problem]) -> None:
    """Refuse Betty hooks that are never called here, and callbacks with Betty's in-place signature.

    Raises:
        ProgramError: naming the problem, the method and what to use instead.
    """
    for problem in problems:
        where = f"problem {problem.name!r} ({type(problem).__name__})"
        for name, fix in REFUSED_PROBLEM_HOOKS.items():
            if user_defined(problem, name, Problem):
                raise ProgramError(f"{where} defines {name}(), which is not supported: {fix}")
        if user_defined(problem, "param_groups", Problem):
            check_param_groups(problem, where)
        for name, example in CALLBACKS.items():
            if problem.is_implemented(name) and not _takes_one_argument(getattr(problem, name)):
                raise ProgramError(
                    f"{where} defines {name}() without an argument, Betty's in-place form (mutating .grad or "
                    f".data). Here {name} is traced into the step and is functional: it takes a dict of tensors "
                    f"keyed by parameter name and returns the new dict:\n    {example}"
                )


def check_param_groups(problem: Problem, where: str) -> None:
    """Honour Betty's ``param_groups()`` hook where Betty's rebuilt optimizer is the one given.

    Betty replaces the optimizer by ``type(opt)(problem.param_groups(), **opt.defaults)`` (and
    rebuilds the scheduler over it from step 0); here the optimizer is used as given, which
    is the same optimizer when every group holds the same parameters, in the same order, with
    the same hyperparameters (a group's own value, else ``opt.defaults``'). Betty's
    learning-by-ignoring example is such a program: its hook returns the groups its
    ``configure_optimizer`` built.

    Raises:
        ProgramError: the hook's groups differ from the optimizer's, saying where.
    """
    opt = problem.optimizer
    groups: list[Any] = list(problem.param_groups())  # type: ignore[attr-defined]
    if groups and isinstance(groups[0], torch.Tensor):  # a plain parameter list: one group of defaults
        groups = [{"params": groups}]
    given = [] if opt is None else opt.param_groups
    diff = None
    if opt is None:
        diff = "the problem has no optimizer"
    elif len(groups) != len(given):
        diff = f"param_groups() returns {len(groups)} groups, the optimizer has {len(given)}"
    for i, (group, have) in enumerate(zip(groups, given)):
        if diff is not None:
            break
        group = dict(group) if isinstance(group, Mapping) else {"params": group}
        params = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
        if [id(p) for p in params] != [id(p) for p in have["params"]]:
            diff = f"group {i} of param_groups() holds other parameters (or another order) than the optimizer's"
            break
        for key, default in opt.defaults.items():  # type: ignore[union-attr]
            want = group.get(key, default)
            # a scheduler built over the optimizer may have moved lr already (a warm-up from 0);
            # Betty rebuilds it over the new optimizer from step 0, from the same initial lr
            value = have.get("initial_lr", have.get(key)) if key == "lr" else have.get(key)
            if key in have and not _same_value(want, value):
                diff = f"group {i}: {key}={want!r} in Betty's rebuilt optimizer, {value!r} in the one given"
                break
    if diff is not None:
        raise ProgramError(
            f"{where} defines param_groups(), and Betty would replace its optimizer by "
            f"type(optimizer)(param_groups(), **optimizer.defaults), which differs from the optimizer given "
            f"({diff}); here the optimizer you give is used as it is: build it over the groups you mean "
            "(e.g. return torch.optim.SGD(groups, lr=...) from configure_optimizer) and remove param_groups()"
        )


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and bool(torch.equal(a, b))
    return bool(a == b)


def _takes_one_argument(fn: Any) -> bool:
    try:
        inspect.signature(fn).bind(object())
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): let the call decide
        return True
    return True


def check_first_order(program: ProgramGraph) -> None:
    """Refuse ``first_order=False`` on a problem that has a lower problem (where Betty reads it).

    Accepted when every lower is ``type="itd"`` (an ``IterativeProblem``): there Betty's
    ``first_order=False`` means differentiating through the lowers' unrolls, which is what
    ``itd`` does (Betty's own ``logistic_regression.py`` example sets it on its parent).

    Raises:
        ProgramError: naming the problem, what Betty does with the setting, and the two ways
            to get either meaning here.
    """
    for name, problem in program.problems.items():
        lowers = sorted({p.chain[0] for p in program.paths.get(name, [])} | set(program.children(name)))
        if all(program.problems[lower].config.type == "itd" for lower in lowers):
            continue  # Betty's meaning (through the unrolls) is itd's
        if problem.config.first_order is False:
            raise ProgramError(
                f"Config of problem {name!r}: first_order=False is not supported. In Betty 0.2.1 it drops "
                f"{name!r}'s hypergradient when its lowers {lowers} are ImplicitProblems (only its direct "
                "gradient is applied) and differentiates through their unroll when they are IterativeProblems. "
                f"To differentiate through the unroll, set Config(type='itd', unroll_steps=K) on the lower "
                f"problem(s) {lowers}; to train {name!r} on its direct gradient only, remove its u2l edges. "
                "Then leave first_order=True (the default)"
            )


def check_devices(problems: Iterable[Problem], strategy: str) -> None:
    """For ``strategy="cpu"``/``"gpu"``, check every module already is on that device (nothing is moved).

    Raises:
        ProgramError: naming the problem, the tensor and its device, and what to do.
    """
    if strategy not in ("cpu", "gpu"):
        return
    want = "cuda" if strategy == "gpu" else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ProgramError(
            "EngineConfig: strategy='gpu' but CUDA is not available; use strategy='default' or 'cpu' on this machine"
        )
    for problem in problems:
        assert problem.module is not None  # attach_problems checked it
        for key, t in [*problem.module.named_parameters(), *problem.module.named_buffers()]:
            if t.device.type != want:
                raise ProgramError(
                    f"EngineConfig: strategy={strategy!r}, but problem {problem.name!r}'s {key} is on {t.device}. "
                    f"Betty moves modules and batches to the device; this engine runs where they are: move "
                    f"the modules (module.to({want!r}), before building the optimizer) and the batches there, or "
                    "use strategy='default'"
                )


def check_unused_parameters(program: ProgramGraph, used: Mapping[str, set[tuple[str, str]]]) -> None:
    """Honour ``allow_unused`` where a trainable parameter never reaches its own problem's loss.

    ``used[name]`` holds the (problem, parameter) pairs that problem ``name``'s loss reads.
    ``allow_unused=False`` raises where Betty's ``autograd.grad`` would (the problem has
    hypergradient paths or accumulates gradients). ``allow_unused=True`` gives such a
    parameter a zero gradient where Betty gives none; the update then moves it only
    through weight decay, and only in a problem without paths (whose hypergradient Betty
    zero-fills), so that case raises.

    Raises:
        ProgramError: naming the problem, the parameters and the fixes.
    """
    for name, problem in program.problems.items():
        unused = [k for k in problem.named_trainable_parameters() if (name, k) not in used.get(name, set())]
        if not unused:
            continue
        cfg = problem.config
        has_paths = bool(program.paths.get(name))
        if cfg.allow_unused is False and (has_paths or cfg.gradient_accumulation > 1):
            raise ProgramError(
                f"Config of problem {name!r}: allow_unused=False, but its training_step never uses its parameters "
                f"{unused} (Betty's autograd.grad raises here at the first step); use them, freeze them "
                "(p.requires_grad_(False)), or set allow_unused=True"
            )
        if has_paths:
            continue
        decayed = [k for k in unused if _weight_decay(problem, k) != 0]
        if decayed:
            raise ProgramError(
                f"problem {name!r}: its training_step never uses its parameters {decayed}, which its optimizer "
                "decays (weight_decay != 0). Betty gives them no gradient and leaves them untouched; here they "
                "would get a zero gradient and weight decay would still shrink them. Freeze them "
                "(p.requires_grad_(False)), use them, or put them in a parameter group with weight_decay=0"
            )


def _weight_decay(problem: Problem, key: str) -> float:
    assert problem.module is not None and problem.optimizer is not None
    param = dict(problem.module.named_parameters())[key]
    for group in problem.optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return float(group.get("weight_decay", 0.0) or 0.0)
    return 0.0
