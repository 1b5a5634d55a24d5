"""The Betty-compatible ``Problem`` class: one optimization problem of an MLO program."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mlocompile.checkpoint import rng_state, set_rng_state
from mlocompile.config import Config
from mlocompile.data import Cursor, loader_generators
from mlocompile.errors import CheckpointError, ProgramError

_HOOKS = ("on_inner_loop_start", "grad_callback", "param_callback", "validation_step")


class Problem:
    """One optimization problem: a module, its optimizer, its data and its loss.

    Subclass it and write ``training_step(batch)``; it returns a scalar loss tensor
    or a dict with a ``"loss"`` entry (other entries are logged). Inside it, other
    problems are attributes by name (``self.outer(x)`` calls ``outer.forward``).

    Args:
        name: unique name; other problems reach this one as ``self.<name>``.
        config: how this problem trains and how its solution is differentiated.
        module: the ``nn.Module`` whose parameters this problem optimizes.
        optimizer: a ``torch.optim`` optimizer over ``module``'s parameters.
        scheduler: an optional ``torch.optim.lr_scheduler`` scheduler; stepped after every
            optimizer step, except ``ReduceLROnPlateau``, which the engine steps after each
            ``Engine.validation()`` with the value it returns under
            ``EngineConfig.early_stopping_metric`` (default ``"loss"``); without a
            ``validation()`` the engine refuses it (ProgramError).
        train_data_loader: any re-iterable of batches (a DataLoader, a list), or a
            tuple of them (the batch is then a tuple); restarts when exhausted.
        extra_config: free-form user configuration, kept as ``self.cfg`` (Betty).

    Hooks (optional methods): ``on_inner_loop_start(self)`` runs eagerly when an
    unroll window starts; ``grad_callback(self, grads) -> grads`` and
    ``param_callback(self, params) -> params`` are traced into the step and take and
    return dicts of tensors keyed by parameter name.
    """

    def __init__(
        self,
        name: str,
        config: Config | None = None,
        module: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        train_data_loader: Any = None,
        extra_config: Any = None,
    ) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise ProgramError(f"problem name {name!r} must be a Python identifier (it becomes an attribute)")
        self._name = name
        self._config = config if config is not None else Config()
        self.cfg = extra_config
        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self._train_data_loader = train_data_loader
        self.cur_batch: Any = None
        self.epoch_counter: list[int] = []
        self._iterators: list[Cursor] | None = None  # started by the Engine (Betty: at build)
        self.fetches = 0  # get_batch calls begun (a call cut short may have advanced an iterator)
        self._init_source: Problem | None = None
        self._peers: tuple[str, ...] = ()
        self.device: torch.device | None = None
        self.env: Any = None  # Betty's Env, set by the Engine (``Engine(env=...)``)
        self._engine: Any = None  # the Engine this problem is attached to (set by attach_problems)
        self._training = True  # Betty's flag: Problem.train()/eval()
        self._manual: dict[str, list[Problem]] = {"parents": [], "children": []}  # add_parent/add_child

    # -- identity -------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The problem's unique name."""
        return self._name

    @property
    def config(self) -> Config:
        """The problem's ``Config``."""
        return self._config

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self._name!r})"

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: other problems are attached by the
        # Engine under their names, so a typo gets a message listing the real ones.
        if name.startswith("_"):
            raise AttributeError(name)
        peers = sorted(self.__dict__.get("_peers", ()))
        raise AttributeError(
            f"problem {self.__dict__.get('_name')!r} has no attribute {name!r}; "
            f"other problems reachable as self.<name>: {peers or 'none (not attached to an Engine yet)'}"
        )

    # -- user surface ---------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the problem's module; override to call it differently."""
        if self.module is None:
            raise ProgramError(f"problem {self._name!r} has no module to call")
        return self.module(*args, **kwargs)

    def training_step(self, batch: Any) -> Any:
        """Return this problem's loss on ``batch`` (a scalar tensor or a dict with "loss")."""
        raise NotImplementedError(f"problem {self._name!r} must define training_step(self, batch)")

    def load_parameters_from(self, problem: Problem) -> None:
        """Start this problem's unroll window from ``problem``'s parameters (MAML).

        Call it in ``on_inner_loop_start``. The parameters are copied by name; under
        ``type="itd"`` the hypergradient differentiates through this copy, so the
        dependency appears in the IR as an upper-to-lower ``init`` edge.
        """
        if self.module is None or problem.module is None:
            raise ProgramError(f"load_parameters_from: {self._name!r} and {problem.name!r} both need modules")
        mine = dict(self.module.named_parameters())
        theirs = dict(problem.module.named_parameters())
        if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
            raise ProgramError(
                f"load_parameters_from: {self._name!r} and {problem.name!r} have different parameter "
                "names or shapes; their modules must have the same architecture"
            )
        with torch.no_grad():
            for key, param in mine.items():
                param.copy_(theirs[key])
        self._init_source = problem

    # -- introspection used by the engine ---------------------------------------------
    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Return the parameters this problem optimizes, by name."""
        if self.module is None:
            return {}
        return {k: p for k, p in self.module.named_parameters() if p.requires_grad}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Return the parameters this problem optimizes (Betty name)."""
        return list(self.named_trainable_parameters().values())

    def parameters(self) -> list[nn.Parameter]:
        """Return all of the module's parameters (Betty name)."""
        return [] if self.module is None else list(self.module.parameters())

    def is_implemented(self, hook: str) -> bool:
        """Return whether this problem defines the method ``hook``."""
        return callable(getattr(self, hook, None))

    # -- Betty's surface: the program graph, schedule and mode as Betty's Problem exposes them --
    @property
    def count(self) -> int:
        """This problem's local step: how many times it has stepped (Betty's ``count``).

        The schedule's counter: it advances on every local step (also while gradients
        accumulate) and is what ``Config.unroll_steps`` and ``log_step`` count.
        """
        return 0 if self._engine is None else self._engine.schedule.counters[self._name].count

    @property
    def leaf(self) -> bool:
        """Whether no problem is below this one (it steps on every ``train_step``)."""
        return self._engine is not None and self._name in self._engine.program.leaves

    @leaf.setter
    def leaf(self, value: bool) -> None:
        raise ProgramError(
            f"problem {self._name!r}: leaf is derived from the dependencies here; change them with "
            "engine.set_dependency(...) instead of setting leaf"
        )

    @property
    def parents(self) -> list[Problem]:
        """The problems directly above this one (its l2u targets), in declaration order."""
        if self._engine is None:
            return list(self._manual["parents"])
        program = self._engine.program
        return [program.problems[n] for n in program.parents(self._name)]

    @property
    def children(self) -> list[Problem]:
        """The problems directly below this one (l2u sources into it), in declaration order."""
        if self._engine is None:
            return list(self._manual["children"])
        program = self._engine.program
        return [program.problems[n] for n in program.children(self._name)]

    @property
    def paths(self) -> list[list[Problem]]:
        """This problem's hypergradient paths as Betty lists them: ``[self, ..., self]``.

        A path ``self -u2l-> a -l2u-> b -l2u-> self`` is ``[self, b, a, self]``: from the
        problem whose parameters this problem's loss uses back down to the u2l target,
        then this problem again (Betty's ``find_paths``), e.g. ``[[outer, inner, outer]]``.
        """
        if self._engine is None:
            return []
        program = self._engine.program
        return [
            [self, *(program.problems[n] for n in reversed(path.chain)), self]
            for path in program.paths.get(self._name, [])
        ]

    def add_child(self, problem: Problem) -> None:
        """Record ``problem`` as directly below this one, before an Engine is built (Betty).

        The Engine's ``dependencies`` must contain the edge (``"l2u": {problem: [self]}``).
        """
        self._add_relation("children", problem)

    def add_parent(self, problem: Problem) -> None:
        """Record ``problem`` as directly above this one, before an Engine is built (Betty).

        The Engine's ``dependencies`` must contain the edge (``"l2u": {self: [problem]}``).
        """
        self._add_relation("parents", problem)

    def _add_relation(self, kind: str, problem: Problem) -> None:
        if self._engine is not None:
            raise ProgramError(
                f"problem {self._name!r} belongs to an Engine, which owns the dependency graph; change it "
                "with engine.set_dependency({'u2l': ..., 'l2u': ...})"
            )
        if problem in self._manual[kind]:
            raise ProgramError(f"problem {problem.name!r} is already one of the {kind} of {self._name!r}")
        self._manual[kind].append(problem)

    def is_rank_zero(self) -> bool:
        """Whether this process is rank 0 (always, without ``strategy="distributed"``)."""
        return self._engine is None or self._engine.rank == 0

    def train(self) -> None:
        """Put this problem in training mode: Betty's flag and ``module.train()``.

        The mode is part of what a traced step read, so a change traces the step again.
        """
        self._training = True
        if self.module is not None:
            self.module.train()

    def eval(self) -> None:
        """Put this problem in evaluation mode: Betty's flag and ``module.eval()``.

        An Engine refuses to step a problem in evaluation mode (Betty would run its
        update without counting it); call ``train()`` (or ``engine.train()``) first.
        """
        self._training = False
        if self.module is not None:
            self.module.eval()

    def step(self, global_step: int | None = None) -> None:
        """Step this problem in Betty's schedule, as ``Engine.train_step`` does for each leaf.

        For an overridden ``Engine.train_step`` (``for leaf in self.leaves:
        leaf.step(global_step=self.global_step)``): the problem steps if its lower
        problems are ready, and triggers its uppers after its unroll window, all as
        one all-or-nothing step. ``global_step``, if given, must be the engine's.
        """
        if self._engine is None:
            raise ProgramError(f"problem {self._name!r} is not attached to an Engine; build Engine(problems=...) first")
        self._engine._step_problem(self._name, global_step)

    def log(self, stats: Mapping[str, Any], global_step: int | None = None) -> None:
        """Record ``stats`` for this problem in the engine's history and metric files (Betty's ``log``).

        The record is tagged with the problem's name, at ``global_step`` (the engine's
        global step when None) and this problem's local step.
        """
        if self._engine is None:
            raise ProgramError(f"problem {self._name!r}: log() needs an Engine to record into")
        self._engine._log_problem(self._name, stats, global_step)

    def _overrides_get_batch(self) -> bool:
        return type(self).get_batch is not Problem.get_batch

    def _peek_user_batch(self) -> Any:
        """Call the user's ``get_batch()`` twice (torch's RNG restored) and return the batch; it must not consume data."""
        rng = torch.get_rng_state()
        try:
            first, second = self.get_batch(), self.get_batch()
        finally:
            torch.set_rng_state(rng)
        if not _same_batch(first, second):
            raise ProgramError(
                f"problem {self._name!r} has no train_data_loader and its get_batch() returned different batches "
                "on two calls. Before its first step the engine looks at a batch (to check which problems each "
                "loss uses) by calling get_batch(), so without a loader it must return the current batch without "
                "consuming data (as Betty's Env pattern does: return self.env.batch[...]); give a "
                "train_data_loader for data that a call should consume"
            )
        return first

    # -- data -------------------------------------------------------------------------
    @property
    def train_data_loader(self) -> Any:
        """The training data: a re-iterable of batches (or a tuple of them), or None.

        Assigning a new loader once the data has started (the Engine starts it when it
        is built) starts over on the new loader: fresh iterators, created at the
        assignment, as the Engine would have created them (Betty would keep drawing from
        the old loader's iterator until it ran out).
        """
        return self._train_data_loader

    @train_data_loader.setter
    def train_data_loader(self, loader: Any) -> None:
        self._train_data_loader = loader
        if getattr(self, "_iterators", None) is not None:
            self._iterators = None
            if loader is not None:
                self._start_data()

    def peek_batch(self) -> Any:
        """Return the last batch, or the one ``get_batch`` would return now, changing nothing.

        Nothing means: no iterator moves and no random stream (global or a loader's own
        ``torch.Generator``) draws; a twin iterator replays the live one's position.
        """
        if self.cur_batch is not None:
            return self.cur_batch
        if self.train_data_loader is None and self._overrides_get_batch():
            return self._peek_user_batch()
        cursors = self._iterators if self._iterators is not None else [Cursor(ld) for ld in self._loaders()]
        try:
            batches = [cursor.peek() for cursor in cursors]
        except StopIteration:
            # NOTE: an exhausted live iterator restarts in get_batch: its first batch is the next one
            batches = [_peek_or_restart(cursor, self._name) for cursor in cursors]
        return batches[0] if len(batches) == 1 else tuple(batches)

    def _loaders(self) -> tuple[Iterable[Any], ...]:
        loader = self.train_data_loader
        if loader is None and self.is_implemented("configure_train_data_loader"):
            loader = self.train_data_loader = self.configure_train_data_loader()  # type: ignore[attr-defined]
        if loader is None:
            raise ProgramError(f"problem {self._name!r} has no train_data_loader and no get_batch()")
        return loader if isinstance(loader, tuple) else (loader,)

    def _start_data(self) -> None:
        """Create the data iterators now; the Engine does when it is built, where Betty does."""
        self.epoch_counter = [0] * len(self._loaders())
        self._iterators = [Cursor(loader) for loader in self._loaders()]
        for cursor in self._iterators:
            cursor.begin()

    def get_batch(self) -> Any:
        """Return the next training batch, restarting exhausted loaders (Betty semantics)."""
        self.fetches += 1
        if self._iterators is None:
            self._start_data()
        assert self._iterators is not None
        batches = []
        for i, cursor in enumerate(self._iterators):
            try:
                batch = cursor.next()
            except StopIteration:
                if i == 0 and self.is_implemented("epoch_callback"):
                    self.epoch_callback()  # type: ignore[attr-defined]  # Betty: before the counter moves
                self.epoch_counter[i] += 1
                cursor.epoch = self.epoch_counter[i]
                cursor.begin()
                try:
                    batch = cursor.next()
                except StopIteration:
                    raise ProgramError(f"train_data_loader of problem {self._name!r} yields no batches") from None
            batches.append(batch)
        return batches[0] if len(batches) == 1 else tuple(batches)

    def data_state(self) -> dict[str, Any]:
        """Return where this problem is in its data, enough to resume at the same batch."""
        if self._iterators is None:
            return {"started": False}
        return {
            "started": True,
            "epoch_counter": list(self.epoch_counter),
            "cursors": [cursor.state() for cursor in self._iterators],
        }

    def state_dict(self) -> dict[str, Any]:
        """This problem's resumable state: module, optimizer, scheduler, data position, last batch."""
        if self.module is None or self.optimizer is None:
            raise ProgramError(f"problem {self._name!r}: state_dict needs a module and an optimizer")
        return {
            "module": self.module.state_dict(),
            "optimizer_kind": type(self.optimizer).__name__,
            "optimizer": self.optimizer.state_dict(),
            "scheduler_kind": None if self.scheduler is None else type(self.scheduler).__name__,
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "data": self.data_state(),
            "cur_batch": self.cur_batch,
            "init_source": None if self._init_source is None else self._init_source.name,
        }

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise CheckpointError naming the first way ``state`` does not fit this problem; change nothing."""
        where = f"checkpoint problem {self._name!r}"
        if self.module is None or self.optimizer is None:
            raise CheckpointError(f"{where}: the problem has no module or optimizer to load into")
        _check_tensors(f"{where}: module", state["module"], self.module.state_dict())
        kind = type(self.optimizer).__name__
        if state["optimizer_kind"] != kind:
            raise CheckpointError(f"{where}: optimizer is {state['optimizer_kind']}, this engine's is {kind}")
        saved_groups = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
        groups = [len(g["params"]) for g in self.optimizer.param_groups]
        if saved_groups != groups:
            raise CheckpointError(f"{where}: optimizer parameter groups hold {saved_groups} parameters, here {groups}")
        sched = None if self.scheduler is None else type(self.scheduler).__name__
        if state["scheduler_kind"] != sched:
            raise CheckpointError(f"{where}: scheduler is {state['scheduler_kind']}, this engine's is {sched}")
        data = state["data"]
        if data["started"]:
            saved_gens = [len(c["gens"]) for c in data["cursors"] if c["start_rng"] is not None]
            gens = [
                len(loader_generators(ld))
                for ld, c in zip(self._loaders(), data["cursors"])
                if c["start_rng"] is not None
            ]
            if len(data["cursors"]) != len(self._loaders()) or saved_gens != gens:
                raise CheckpointError(
                    f"{where}: its data position is for {len(data['cursors'])} loader(s) with {saved_gens} "
                    f"torch.Generator(s), here {len(self._loaders())} with {gens}; build the loaders the same way"
                )
        source = state["init_source"]
        if source is not None and source not in self._peers:
            raise CheckpointError(f"{where}: starts from problem {source!r}, which this engine does not have")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (the problem it started from is found by name)."""
        if self.module is None or self.optimizer is None:
            raise ProgramError(f"problem {self._name!r}: load_state_dict needs a module and an optimizer")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.load_data_state(state["data"])
        self.cur_batch = state["cur_batch"]
        self._init_source = None if state["init_source"] is None else getattr(self, state["init_source"])

    def load_data_state(self, state: dict[str, Any]) -> None:
        """Recreate the data iterators at the position ``data_state`` recorded."""
        if not state["started"]:
            self._iterators = None
            return
        rng = rng_state()
        try:
            self._iterators = [Cursor.restore(ld, cs) for ld, cs in zip(self._loaders(), state["cursors"])]
        finally:
            set_rng_state(rng)
        self.epoch_counter = list(state["epoch_counter"])


def _check_tensors(where: str, saved: Mapping[str, Any], live: Mapping[str, Any]) -> None:
    """Raise CheckpointError for the first name, shape or dtype in which ``saved`` and ``live`` differ."""
    if saved.keys() != live.keys():
        extra, lacking = sorted(saved.keys() - live.keys()), sorted(live.keys() - saved.keys())
        raise CheckpointError(f"{where} does not match: unexpected {extra}, missing {lacking}")
    for key, value in saved.items():
        mine = live[key]
        if isinstance(mine, torch.Tensor) and (
            not isinstance(value, torch.Tensor) or value.shape != mine.shape or value.dtype != mine.dtype
        ):
            got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(
                f"{where} does not match at {key!r}: saved {got}, here {tuple(mine.shape)} {mine.dtype}"
            )


def _same_batch(a: Any, b: Any) -> bool:
    """Whether two batches hold the same structure and values."""
    leaves_a, spec_a = torch.utils._pytree.tree_flatten(a)
    leaves_b, spec_b = torch.utils._pytree.tree_flatten(b)
    if spec_a != spec_b:
        return False
    for x, y in zip(leaves_a, leaves_b):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            same = isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)
        else:
            try:
                same = x is y or bool(x == y)
            except (TypeError, ValueError, RuntimeError):  # e.g. a numpy array: compared by identity only
                same = False
        if not same:
            return False
    return True


def attach_problems(problems: Sequence[Problem], owner: object) -> None:
    """Wire a program's problems: build modules/optimizers/schedulers from their ``configure_*``
    hooks, and make every problem an attribute of ``owner`` (the Engine) and of each other.

    Raises:
        ProgramError: a non-Problem, a duplicate or clashing name, a missing module or
            optimizer, or an ``nn.SyncBatchNorm`` (its all-reduce is not traced).
    """
    for p in problems:
        if not isinstance(p, Problem):
            raise ProgramError(f"problems must be Problem instances, got {type(p).__name__}")
    names = [p.name for p in problems]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ProgramError(f"two problems are named {dupes[0]!r}; problem names must be unique")
    for problem in problems:
        _configure(problem)
        name = problem.name
        if hasattr(type(owner), name) or name in vars(owner):
            raise ProgramError(f"problem name {name!r} clashes with an Engine attribute; rename the problem")
        setattr(owner, name, problem)
        problem._peers = tuple(n for n in names if n != name)
        problem._engine = owner
        if problem.device is None:
            problem.device = _module_device(problem.module)
        for other in problems:
            if other is not problem:
                if hasattr(type(other), name) or not isinstance(vars(other).get(name, problem), Problem):
                    raise ProgramError(f"problem name {name!r} clashes with an attribute of {other.name!r}; rename it")
                setattr(other, name, problem)
    _check_own_parameters(problems)


def _check_own_parameters(problems: Sequence[Problem]) -> None:
    """Raise ProgramError if two problems' modules hold the same parameter tensor."""
    owner: dict[int, tuple[str, str]] = {}
    for problem in problems:
        if problem.module is None:
            continue
        for key, param in problem.module.named_parameters():
            first = owner.setdefault(id(param), (problem.name, key))
            if first[0] != problem.name:
                raise ProgramError(
                    f"problems {first[0]!r} and {problem.name!r} share a parameter ({first[0]}.{first[1]} is "
                    f"{problem.name}.{key}); each problem trains its own parameters. Give each problem its own "
                    "module (copy.deepcopy), or keep a shared part in one problem and call it from the other's "
                    "training_step (self.<problem>(x))"
                )


def _configure(problem: Problem) -> None:
    """Build what the ``configure_*`` hooks make and start the data iterators, in Betty's order."""
    name = problem.name
    if problem.train_data_loader is None and problem.is_implemented("configure_train_data_loader"):
        problem.train_data_loader = problem.configure_train_data_loader()  # type: ignore[attr-defined]
    if problem.module is None and problem.is_implemented("configure_module"):
        problem.module = problem.configure_module()  # type: ignore[attr-defined]
    if problem.module is None:
        raise ProgramError(f"problem {name!r} has no module; pass module=... or define configure_module()")
    if any(isinstance(m, nn.SyncBatchNorm) for m in problem.module.modules()):
        raise ProgramError(
            f"problem {name!r}: nn.SyncBatchNorm is not supported (its statistics all-reduce is not "
            "traced into the step); use nn.BatchNorm1d/2d/3d: under strategy='distributed' each rank "
            "then normalizes with its own shard's batch statistics"
        )
    if problem.optimizer is None and problem.is_implemented("configure_optimizer"):
        problem.optimizer = problem.configure_optimizer()  # type: ignore[attr-defined]
    if problem.optimizer is None:
        raise ProgramError(f"problem {name!r} has no optimizer; pass optimizer=torch.optim.SGD(...) or similar")
    if problem.scheduler is None and problem.is_implemented("configure_scheduler"):
        problem.scheduler = problem.configure_scheduler()  # type: ignore[attr-defined]
    if problem.train_data_loader is not None:
        # NOTE: iter() of a shuffled DataLoader draws a random number: here, as in Betty's Engine
        problem._start_data()


def _peek_or_restart(cursor: Cursor, name: str) -> Any:
    """Peek ``cursor``, or past its end the first batch of the epoch ``get_batch`` would start."""
    try:
        return cursor.peek()
    except StopIteration:
        try:
            return Cursor(cursor.loader, cursor.epoch + 1).peek()
        except StopIteration:
            raise ProgramError(f"train_data_loader of problem {name!r} yields no batches") from None


def _module_device(module: nn.Module | None) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for one with neither)."""
    tensors = [] if module is None else [*module.parameters(), *module.buffers()]
    return tensors[0].device if tensors else torch.device("cpu")


ImplicitProblem = Problem


class IterativeProblem(Problem):
    """Betty's ``IterativeProblem``: a problem differentiated through its unrolled steps (``type="itd"``).

    Here every problem is the same class and ``Config.type`` picks the method, so this
    is a ``Problem`` whose config says ``type="itd"``: ``config=None`` and Betty's default
    ``type="darts"`` become ``"itd"`` (on a copy: the given ``Config`` is not changed);
    ``"neumann"`` or ``"cg"`` contradict the class and raise ``ProgramError``.
    ``HigherIterativeProblem`` (Betty's ``higher``-based variant) is the same class.
    """

    def __init__(
        self,
        name: str,
        config: Config | None = None,
        module: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        train_data_loader: Any = None,
        extra_config: Any = None,
    ) -> None:
        config = Config() if config is None else config
        if config.type not in ("darts", "itd"):
            raise ProgramError(
                f"problem {name!r}: an IterativeProblem is differentiated through its unrolled steps "
                f"(type='itd'), but its Config says type={config.type!r}; use ImplicitProblem for "
                f"type={config.type!r}, or drop the type"
            )
        config = dataclasses.replace(config, type="itd")
        super().__init__(name, config, module, optimizer, scheduler, train_data_loader, extra_config)


HigherIterativeProblem = IterativeProblem
