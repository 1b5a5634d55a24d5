"""Every Betty 0.2.1 setting and hook either means here what it means in Betty, or is refused.

Honoured ones run the identical program in Betty 0.2.1 and here (float64, 20 steps, the
programs of ``test_betty_parity``) and compare every parameter (max |diff| <= 1e-10).
Refused ones must raise an ``MLOError`` when the Engine is built (or, for what needs a
loss evaluated, before the first step) whose message names the setting and the fix.
"""

from __future__ import annotations

import dataclasses
import sys
import types
from typing import Any

import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("betty")

import betty.configs  # noqa: E402
import betty.engine  # noqa: E402
from betty.problems import ImplicitProblem as BettyProblem  # noqa: E402
from betty.problems import Problem as BettyBaseProblem  # noqa: E402
from test_betty_parity import (  # noqa: E402
    BETTY,
    OURS,
    HPOOuterLoss,
    MWNInnerLoss,
    MWNOuterLoss,
    Program,
    hpo_program,
    mwn_program,
    run_program,
)

import mlocompile as mlo  # noqa: E402
from mlocompile import compat  # noqa: E402
from programs import mwn_engine  # noqa: E402

pytestmark = pytest.mark.betty
EXACT = 1e-10  # max |mlocompile - Betty| over every parameter


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def max_diff(a: dict[str, dict[str, Tensor]], b: dict[str, dict[str, Tensor]]) -> float:
    assert a.keys() == b.keys() and all(a[n].keys() == b[n].keys() for n in a)
    return max((a[n][k] - b[n][k]).abs().max().item() for n in a for k in a[n])


def moved(program: Program, params: dict[str, dict[str, Tensor]]) -> bool:
    """Whether every problem's parameters changed (so a comparison is not between initial weights)."""
    return all(
        any(not torch.equal(params[n][k], v.detach()) for k, v in spec.module.named_parameters())
        for n, spec in program.specs.items()
    )


def parity(program: Program, ours_engine: dict[str, Any] | None = None, betty_engine: dict[str, Any] | None = None):
    ref = run_program(BETTY, program, {"strategy": "cpu", **(betty_engine or {})})
    ours = run_program(OURS, program, {"compile": "fx", "progress": False, **(ours_engine or {})})
    assert moved(program, ref)
    return ours, ref


# -- the fields themselves ------------------------------------------------------------------------
NOT_HERE = {"sama_adam_alpha", "sama_multitask"}  # SAMA is another change's
DEFAULTS_DIFFER = {"backend": ("nccl", "auto")}  # auto = nccl with CUDA, else gloo (documented)


@pytest.mark.parametrize(
    ("ours", "theirs"), [(mlo.Config, betty.configs.Config), (mlo.EngineConfig, betty.configs.EngineConfig)]
)
def test_every_betty_field_is_here_with_its_default_and_documented(ours, theirs):
    mine = {f.name: f.default for f in dataclasses.fields(ours)}
    for field in dataclasses.fields(theirs):
        if field.name in NOT_HERE:
            continue
        assert field.name in mine, f"Betty's {theirs.__name__}.{field.name} is missing"
        expected = DEFAULTS_DIFFER.get(field.name, (field.default, field.default))
        assert (field.default, mine[field.name]) == expected, field.name
        assert f"        {field.name}: " in ours.__doc__, f"{field.name} has no Attributes entry"


# where each Betty field is checked (here unless another file is named)
WHERE_TESTED = {
    "type": "test_betty_parity (darts, neumann, cg); 'reinforce' refused: REFUSED_VALUES",
    "unroll_steps": "test_betty_parity (darts_unroll2)",
    "first_order": "test_first_order_*",
    "retain_graph": "HONOURED, test_retain_graph_changes_nothing_here",
    "allow_unused": "HONOURED, test_allow_unused_*, test_an_unused_parameter_*",
    "gradient_accumulation": "test_betty_parity (darts_accumulate2)",
    "gradient_clipping": "test_betty_parity (darts_clip)",
    "precision": "test_amp (Betty's fp16 needs CUDA; its bf16 autocasts CUDA only)",
    "initial_dynamic_scale": "test_amp",
    "scale_factor": "test_amp",
    "warmup_steps": "test_betty_parity (darts_warmup3)",
    "log_step": "HONOURED (log_local_step case), test_engine",
    "log_local_step": "HONOURED, test_wandb_*, test_log_local_step_*",
    "darts_alpha": "test_betty_parity, test_hypergrad",
    "darts_multitask": "HONOURED (False), REFUSED_VALUES (True)",
    "neumann_iterations": "test_betty_parity (neumann)",
    "neumann_alpha": "test_betty_parity (neumann)",
    "cg_iterations": "test_betty_parity (cg)",
    "cg_alpha": "test_betty_parity (cg), test_hypergrad",
    "train_iters": "test_train_iters_and_valid_step_*",
    "valid_step": "test_train_iters_and_valid_step_*",
    "logger_type": "REFUSED_VALUES, test_wandb_*, test_monitor (tensorboard)",
    "roll_back": "HONOURED, test_betty_parity",
    "backend": "HONOURED (not read outside 'distributed'), test_distributed",
    "strategy": "HONOURED (cpu), REFUSED_VALUES, test_strategy_*, test_distributed",
    "early_stopping": "test_early_stopping_*",
    "early_stopping_mode": "test_early_stopping_*",
    "early_stopping_tolerance": "test_early_stopping_*",
    "early_stopping_metric": "test_early_stopping_* (its default 'loss'), test_engine",
}


def test_every_betty_field_has_a_test():
    betty_fields = {
        f.name for cls in (betty.configs.Config, betty.configs.EngineConfig) for f in dataclasses.fields(cls)
    }
    assert set(WHERE_TESTED) == betty_fields - NOT_HERE


# -- first_order ------------------------------------------------------------------------------------
class HPOOuterWithPrior:
    """The HPO upper loss plus a direct term in the upper's own parameters (so it has a direct gradient)."""

    def training_step(self, batch: Any) -> Tensor:
        return HPOOuterLoss.training_step(self, batch) + 0.1 * (self.module.log_l**2).sum()


def hpo_with_prior(outer_config: dict[str, Any]) -> Program:
    program = hpo_program({"type": "darts"}, "sgd")
    program.specs["outer"].loss = type("HPOOuterWithPriorLoss", (HPOOuterWithPrior,), {})
    program.specs["outer"].config = outer_config
    return program


def test_betty_first_order_false_drops_the_hypergradient_of_an_implicit_upper():
    # what the error message below says Betty does: with ImplicitProblem lowers, first_order=False
    # on the upper skips its best-response terms, which is the program without its u2l edge
    program = hpo_with_prior({"first_order": False})
    first_order_false = run_program(BETTY, program, {"strategy": "cpu"})
    no_u2l = run_program(BETTY, Program(program.specs, {}, program.l2u), {"strategy": "cpu"})
    program.specs["outer"].config = {"retain_graph": True}  # Betty needs it when the upper has both gradients
    default = run_program(BETTY, program, {"strategy": "cpu"})
    assert max_diff(first_order_false, no_u2l) <= EXACT
    assert max_diff(first_order_false, default) > 1e-3  # the hypergradient mattered


def test_first_order_false_on_an_upper_is_refused_naming_itd_on_the_lower():
    program = hpo_with_prior({"first_order": False})
    with pytest.raises(mlo.ProgramError) as err:
        run_program(OURS, program, {})
    msg = str(err.value)
    assert "problem 'outer': first_order=False is not supported" in msg
    assert "Config(type='itd', unroll_steps=K) on the lower problem(s) ['inner']" in msg
    assert "remove its u2l edges" in msg


def test_first_order_false_without_lowers_is_read_nowhere_in_betty_and_accepted():
    program = mwn_program({"type": "darts", "first_order": False})
    ours, ref = parity(program)
    assert max_diff(ours, ref) <= EXACT


# -- fields honoured as Betty does: the same program in both libraries -----------------------------
HONOURED = {
    # retain_graph only decides whether Betty's autograd frees the loss graph
    "retain_graph": ({"type": "darts", "retain_graph": True}, {"retain_graph": True}, {}),
    # allow_unused=False with every parameter used: Betty checks and passes, so do we
    "allow_unused=False": ({"type": "darts", "allow_unused": False}, {}, {}),
    "log_local_step": ({"type": "darts", "log_local_step": True, "log_step": 3}, {"log_step": 2}, {}),
    "darts_multitask=False": ({"type": "darts", "darts_multitask": False}, {}, {}),
    "roll_back": ({"type": "darts"}, {}, {"roll_back": True}),
    "strategy=cpu": ({"type": "darts"}, {}, {"strategy": "cpu"}),
    "backend": ({"type": "darts"}, {}, {"backend": "gloo"}),  # read only under strategy='distributed'
}


@pytest.mark.parametrize("case", list(HONOURED))
def test_honoured_setting_trains_as_betty(case):
    inner, outer, engine = HONOURED[case]
    program = mwn_program(inner)
    program.specs["outer"].config = outer
    ours, ref = parity(program, engine, {k: v for k, v in engine.items() if k != "strategy"})
    assert max_diff(ours, ref) <= EXACT


def test_retain_graph_changes_nothing_here():
    program = mwn_program({"type": "darts", "retain_graph": True})
    with_retain = run_program(OURS, program, {"progress": False})
    program.specs["inner"].config = {"type": "darts"}
    assert max_diff(with_retain, run_program(OURS, program, {"progress": False})) == 0.0


# -- allow_unused ----------------------------------------------------------------------------------
def test_allow_unused_false_is_refused_where_betty_autograd_raises():
    program = mwn_program({"type": "darts"})
    program.specs["outer"].config = {"allow_unused": False}  # the weight net's own loss never reads it
    with pytest.raises(RuntimeError, match="appears to not have been used"):
        run_program(BETTY, program, {"strategy": "cpu"})
    with pytest.raises(mlo.ProgramError) as err:
        run_program(OURS, program, {"progress": False})
    msg = str(err.value)
    assert "problem 'outer': allow_unused=False" in msg and "'0.weight'" in msg and "allow_unused=True" in msg


class WithUnusedHead(nn.Module):
    """An MLP classifier with a head its forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
        self.unused = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_an_unused_parameter_stays_untouched_as_in_betty_or_is_refused_under_weight_decay(weight_decay):
    program = mwn_program({"type": "darts"})
    torch.manual_seed(0)
    program.specs["inner"].module = WithUnusedHead()
    program.specs["inner"].optimizer = lambda m: torch.optim.SGD(
        m.parameters(), lr=0.1, momentum=0.9, weight_decay=weight_decay
    )
    ref = run_program(BETTY, program, {"strategy": "cpu"})
    init = dict(program.specs["inner"].module.named_parameters())
    assert torch.equal(ref["inner"]["unused.weight"], init["unused.weight"].detach())  # Betty: no gradient
    if weight_decay == 0:
        assert max_diff(run_program(OURS, program, {"progress": False}), ref) <= EXACT
    else:
        with pytest.raises(mlo.ProgramError) as err:
            run_program(OURS, program, {"progress": False})
        msg = str(err.value)
        assert "'unused.weight'" in msg and "weight_decay" in msg and "requires_grad_(False)" in msg


# -- refused values --------------------------------------------------------------------------------
REFUSED_VALUES = [
    ("config", "darts_multitask", True, "darts_multitask=True is not implemented", "leave darts_multitask=False"),
    ("engine", "strategy", "zero", "strategy='zero'", "use strategy='distributed'"),
    ("engine", "strategy", "fsdp", "strategy='fsdp'", "use strategy='distributed'"),
    ("engine", "strategy", "accelerate", "strategy='accelerate'", "use strategy='distributed'"),
    ("engine", "logger_type", "tensorboard", "logger_type='tensorboard' needs output_dir", "output_dir="),
    ("engine", "logger_type", "wandb", "logger_type='wandb' needs output_dir", "output_dir="),
    ("config", "type", "reinforce", "type='reinforce' is not a hypergradient method", "use one of ['darts'"),
]


@pytest.mark.parametrize(("where", "field", "value", "names", "fix"), REFUSED_VALUES)
def test_refused_value_names_the_field_and_the_fix(where, field, value, names, fix, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", types.ModuleType("wandb"))  # installed or not
    kw: dict[str, Any] = {}
    if where == "config":
        kw["lower_config"] = mlo.Config(**{field: value})
    else:
        kw[field] = value
    with pytest.raises(mlo.ProgramError) as err:
        mwn_engine("darts", "eager", **kw)
    assert names in str(err.value) and fix in str(err.value)


def test_strategy_gpu_needs_the_modules_on_cuda():
    with pytest.raises(mlo.ProgramError) as err:
        mwn_engine("darts", "eager", strategy="gpu")
    msg = str(err.value)
    if torch.cuda.is_available():
        assert "strategy='gpu', but problem" in msg and "is on cpu" in msg and "module.to('cuda'" in msg
    else:
        assert "strategy='gpu' but CUDA is not available" in msg


def test_strategy_cpu_needs_the_modules_on_the_cpu(monkeypatch):
    engine = mwn_engine("darts", "eager", strategy="cpu")  # on the CPU: accepted (and trains as Betty, above)
    fake = torch.empty(1, device="meta")
    monkeypatch.setattr(engine.inner.module[0], "weight", nn.Parameter(fake))
    with pytest.raises(mlo.ProgramError, match=r"strategy='cpu', but problem 'inner''s 0.weight is on meta"):
        compat.check_devices(engine.problems, "cpu")


# -- logger_type="wandb" and log_local_step ------------------------------------------------------------
class FakeRun:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, data: dict[str, Any]) -> None:
        self.logged.append(dict(data))

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**kwargs: Any) -> FakeRun:
        run = FakeRun(**kwargs)
        module.runs.append(run)
        return run

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_wandb_run_is_started_and_gets_every_record(fake_wandb, tmp_path):
    engine = mwn_engine(
        "darts", "eager", unroll=2, train_iters=6, log_every=1, progress=False, output_dir=str(tmp_path),
        logger_type="wandb",
    )  # fmt: skip
    engine.outer.config.log_local_step = True  # Betty: the upper's records at its local step
    engine.run()
    (run,) = fake_wandb.runs
    assert run.kwargs == {"dir": str(tmp_path), "config": {"mlocompile_run_id": engine.run_id}}
    assert len(run.logged) == len(engine.history) and len(engine.history) == 6 + 3
    for record, logged in zip(engine.history, run.logged):
        x = record["local_step"] if record["tag"] == "outer" else record["step"]
        scalars = {f"{record['tag']}/{k}": v for k, v in record.items() if k not in ("tag", "step")}
        assert logged == {**scalars, "global_step": x} and f"{record['tag']}/loss" in logged
    assert [r["global_step"] for r in run.logged if "outer/loss" in r] == [1, 2, 3]  # global steps 2, 4, 6
    engine.metrics.close()
    assert run.finished


def test_wandb_missing_is_an_error_with_the_install_command(monkeypatch):
    import importlib.util

    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(mlo.ProgramError, match=r"logger_type='wandb' needs wandb .*pip install wandb"):
        mwn_engine("darts", "eager", logger_type="wandb", output_dir="unused")


def test_log_local_step_sets_the_tensorboard_step(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    engine = mwn_engine(
        "darts", "eager", unroll=2, train_iters=6, log_every=1, progress=False, output_dir=str(tmp_path),
        logger_type="tensorboard",
    )  # fmt: skip
    engine.outer.config.log_local_step = True
    engine.run()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("outer/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("inner/loss")] == [1, 2, 3, 4, 5, 6]


# -- hooks -----------------------------------------------------------------------------------------
def _program_with(method: str, body: Any, target: str = "inner"):
    """The MWN program with ``method`` defined on ``target``'s class."""
    program = mwn_program({"type": "darts"})
    base = program.specs[target].loss
    program.specs[target].loss = type(f"{base.__name__}With_{method}", (base,), {method: body})
    return program


@pytest.mark.parametrize("hook", sorted(compat.REFUSED_PROBLEM_HOOKS))
def test_refused_problem_hook_is_an_error_at_build(hook):
    program = _program_with(hook, lambda self, *a, **k: None)
    with pytest.raises(mlo.ProgramError) as err:
        run_program(OURS, program, {"progress": False})
    assert "problem 'inner' " in str(err.value) and f"defines {hook}(), which is not supported" in str(err.value)
    assert compat.REFUSED_PROBLEM_HOOKS[hook] in str(err.value)


def test_overridden_problem_train_is_called_by_the_engine():
    calls = []

    def train(self):
        calls.append(self.name)
        mlo.Problem.train(self)

    run_program(OURS, _program_with("train", train), {"progress": False})
    assert "inner" in calls  # Engine.run() -> Engine.train() -> every Problem.train()


def test_every_overridable_betty_problem_method_is_honoured_or_refused():
    honoured = {
        "training_step", "forward", "configure_train_data_loader", "configure_module", "configure_optimizer",
        "param_groups",  # where Betty's rebuilt optimizer is the one given, else refused (test_betty_ports_b.py)
        "configure_scheduler", "on_inner_loop_start", "grad_callback", "param_callback", "epoch_callback",
        "state_dict", "load_state_dict", "is_implemented", "train", "eval", "get_batch",
    }  # fmt: skip
    # Betty's own methods that are a library surface (called by users, not overridden for behaviour)
    surface = {
        "set_module", "set_optimizer", "set_scheduler", "set_train_data_loader", "get_opt_param_group_for_param",
        "get_opt_state_for_param", "add_child", "add_parent", "add_paths", "add_logger", "add_env",
        "clear_dependencies",
    }  # fmt: skip
    betty_methods = {
        n
        for cls in (BettyBaseProblem, BettyProblem)
        for n, v in vars(cls).items()
        if callable(v) and not n.startswith("_")
    }
    hooks = {"custom_optimizer_step", "param_groups", "validation_step", "epoch_callback", "grad_callback",
             "param_callback", "on_inner_loop_start", "configure_train_data_loader", "configure_module",
             "configure_optimizer", "configure_scheduler"}  # fmt: skip  # called via is_implemented
    missing = (betty_methods | hooks) - honoured - surface - set(compat.REFUSED_PROBLEM_HOOKS)
    assert not missing, f"Betty methods neither honoured nor refused: {sorted(missing)}"


@pytest.mark.parametrize("hook", compat.REFUSED_ENGINE_HOOKS)
def test_refused_engine_hook_is_an_error_at_build(hook):
    engine_cls = type("MyEngine", (mlo.Engine,), {hook: lambda self, *a, **k: None})
    torch.manual_seed(0)
    src = mwn_engine("darts", "eager")
    with pytest.raises(mlo.ProgramError) as err:
        engine_cls(src.problems, mlo.EngineConfig(compile="eager"), src.dependencies)
    assert f"MyEngine.{hook} overrides a method Betty's Engine calls" in str(err.value)
    assert "Overridable here: validation()" in str(err.value)


def test_every_overridable_betty_engine_method_is_honoured_or_refused():
    honoured = {"train_step", "run", "validation", "train", "eval", "is_implemented"}
    betty_methods = {n for n, v in vars(betty.engine.Engine).items() if callable(v) and not n.startswith("_")}
    missing = (betty_methods | {"validation"}) - honoured - set(compat.REFUSED_ENGINE_HOOKS)
    assert not missing, f"Betty Engine methods neither honoured nor refused: {sorted(missing)}"


def test_engine_train_step_override_is_called_by_run():
    calls = []

    class Counting(mlo.Engine):
        def train_step(self) -> None:
            calls.append(self.global_step)
            super().train_step()

    src = mwn_engine("darts", "eager")
    engine = Counting(src.problems, mlo.EngineConfig(compile="eager", train_iters=3, progress=False), src.dependencies)
    engine.run()
    assert calls == [1, 2, 3] and engine.global_step == 3


@pytest.mark.parametrize("hook", ["grad_callback", "param_callback"])
def test_betty_style_in_place_callback_is_refused_with_the_functional_signature(hook):
    program = _program_with(hook, lambda self: None)
    with pytest.raises(mlo.ProgramError) as err:
        run_program(OURS, program, {"progress": False})
    msg = str(err.value)
    assert f"defines {hook}() without an argument, Betty's in-place form" in msg
    assert f"def {hook}(self, {'grads' if hook == 'grad_callback' else 'params'}):" in msg


def _betty_halve_grads(self) -> None:
    for p in self.trainable_parameters():
        if p.grad is not None:
            p.grad = p.grad * 0.5


def _betty_clamp(self) -> None:
    for p in self.trainable_parameters():
        p.data.clamp_(min=-0.05)


FUNCTIONAL = {
    "grad_callback": (_betty_halve_grads, lambda self, grads: {k: g * 0.5 for k, g in grads.items()}, "inner"),
    "param_callback": (_betty_clamp, lambda self, params: {k: p.clamp(min=-0.05) for k, p in params.items()}, "outer"),
}


@pytest.mark.parametrize("hook", list(FUNCTIONAL))
def test_functional_callback_trains_as_the_betty_in_place_one(hook):
    betty_fn, ours_fn, target = FUNCTIONAL[hook]
    program = hpo_program({"type": "darts"}, "sgd")
    base = program.specs[target].loss
    program.specs[target].loss = type("B", (base,), {hook: betty_fn})
    ref = run_program(BETTY, program, {"strategy": "cpu"})
    program.specs[target].loss = type("O", (base,), {hook: ours_fn})
    ours = run_program(OURS, program, {"progress": False})
    assert max_diff(ours, ref) <= EXACT
    program.specs[target].loss = base
    assert max_diff(run_program(OURS, program, {"progress": False}), ref) > 1e-6  # the callback mattered


class EpochLog:
    def epoch_callback(self) -> None:
        type(self).seen.append(list(self.epoch_counter))


def test_epoch_callback_runs_when_the_first_loader_restarts_as_in_betty():
    program = mwn_program({"type": "darts"})  # inner: 5 batches, outer: 3, 20 steps
    seen = {}
    for lib in (BETTY, OURS):
        for name in program.specs:
            base = MWNInnerLoss if name == "inner" else MWNOuterLoss
            program.specs[name].loss = type(f"{lib.name}{name}", (EpochLog, base), {"seen": []})
        run_program(lib, program, {"strategy": "cpu"} if lib is BETTY else {"progress": False})
        seen[lib.name] = {n: s.loss.seen for n, s in program.specs.items()}
    assert seen["mlocompile"] == seen["betty"]
    assert seen["betty"]["inner"] == [[0], [1], [2]] and len(seen["betty"]["outer"]) == 6


class Configured:
    """Builds its module, optimizer, scheduler and data from Betty's configure_* hooks."""

    spec: Any = None

    def configure_module(self) -> nn.Module:
        return type(self).spec["module"]()

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.module.parameters(), lr=0.1, momentum=0.9)

    def configure_scheduler(self) -> Any:
        return torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=5, gamma=0.5)

    def configure_train_data_loader(self) -> Any:
        return type(self).spec["data"]


def test_configure_hooks_build_the_problem_as_in_betty():
    import copy

    program = hpo_program({"type": "darts"}, "sgd")
    out: dict[str, Any] = {}
    for lib in (BETTY, OURS):
        problems = {}
        for name, spec in program.specs.items():
            module = spec.module
            cls = type(f"{lib.name}_{name}", (Configured, spec.loss, lib.ImplicitProblem), {})
            cls.spec = {"module": lambda m=module: copy.deepcopy(m), "data": list(spec.data)}
            problems[name] = cls(name=name, config=lib.Config(**spec.config))
        deps = {"u2l": {problems["outer"]: [problems["inner"]]}, "l2u": {problems["inner"]: [problems["outer"]]}}
        extra = {"strategy": "cpu"} if lib is BETTY else {"progress": False}
        engine = lib.Engine(
            problems=list(problems.values()),
            dependencies=deps,
            config=lib.EngineConfig(train_iters=20, valid_step=10**9, **extra),
        )
        engine.run()
        out[lib.name] = {
            n: {k: v.detach().clone() for k, v in p.module.named_parameters()} for n, p in problems.items()
        }
        assert problems["inner"].scheduler.get_last_lr() == [0.1 * 0.5**4]  # 20 steps, halved every 5
    assert moved(program, out["betty"])
    assert max_diff(out["mlocompile"], out["betty"]) <= EXACT


# -- the engine's schedule fields: train_iters, valid_step, early_stopping* ----------------------------
def _validating(lib: Any, program: Program, engine_config: dict[str, Any], scores: list[float]) -> list[int]:
    """Run ``program`` with an Engine whose validation() returns ``scores`` in turn; return its steps."""
    steps: list[int] = []

    def validation(self: Any) -> dict[str, float]:
        steps.append(self.global_step)
        return {"loss": scores[len(steps) - 1]}

    # NOTE: run_program fixes valid_step (no validation); these settings override its own
    config_cls = lib.EngineConfig
    validating = types.SimpleNamespace(
        **{
            **vars(lib),
            "Engine": type("Validating", (lib.Engine,), {"validation": validation}),
            "EngineConfig": lambda **kw: config_cls(**{**kw, **engine_config}),
        }
    )
    run_program(validating, program, {})
    return steps


def test_train_iters_and_valid_step_validate_at_betty_steps():
    program = mwn_program({"type": "darts", "unroll_steps": 2})
    config = {"valid_step": 3}  # run_program: train_iters=20
    ref = _validating(BETTY, program, {"strategy": "cpu", **config}, [1.0] * 10)
    ours = _validating(OURS, program, {"progress": False, **config}, [1.0] * 10)
    assert ours == ref == [3, 6, 9, 12, 15, 18]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_early_stopping_stops_after_tolerance_validations_without_improvement(mode):
    # Betty 0.2.1's EarlyStopping reads an undefined self.patience at its first call, so the
    # reference is the rule itself: the best score is 3rd of 7, tolerance 2 -> stop at the 5th
    program = mwn_program({"type": "darts"})
    config = {"valid_step": 2, "early_stopping": True, "early_stopping_tolerance": 2, "early_stopping_mode": mode}
    scores = [3.0, 2.0, 1.0, 1.5, 1.0, 0.5, 0.1]
    scores = scores if mode == "min" else [-s for s in scores]
    with pytest.raises(AttributeError, match="patience"):
        _validating(BETTY, program, {"strategy": "cpu", **config}, scores)
    assert _validating(OURS, program, {"progress": False, **config}, scores) == [2, 4, 6, 8, 10]
