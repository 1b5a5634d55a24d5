"""The Betty-compatible ``Problem`` class: one optimization problem of an MLO program."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mlocompile.config import Config
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
        self.train_data_loader = train_data_loader
        self.cur_batch: Any = None
        self.epoch_counter: list[int] = []
        self._iterators: list[Iterator[Any]] | None = None
        self._iter_rng: list[torch.Tensor] = []
        self._consumed: list[int] = []
        self.fetches = 0  # get_batch calls begun (a call cut short may have advanced an iterator)
        self._init_source: Problem | None = None
        self._peers: tuple[str, ...] = ()
        self.device: torch.device | None = None

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

    # -- data -------------------------------------------------------------------------
    def peek_batch(self) -> Any:
        """Return the last batch, or the next one without consuming data or torch's RNG."""
        if self.cur_batch is not None:
            return self.cur_batch
        rng = torch.get_rng_state()
        try:
            batches = [next(iter(loader)) for loader in self._loaders()]
        except StopIteration:
            raise ProgramError(f"train_data_loader of problem {self._name!r} yields no batches") from None
        finally:
            torch.set_rng_state(rng)
        return batches[0] if len(batches) == 1 else tuple(batches)

    def _loaders(self) -> tuple[Iterable[Any], ...]:
        loader = self.train_data_loader
        if loader is None and self.is_implemented("configure_train_data_loader"):
            loader = self.train_data_loader = self.configure_train_data_loader()  # type: ignore[attr-defined]
        if loader is None:
            raise ProgramError(f"problem {self._name!r} has no train_data_loader and no get_batch()")
        return loader if isinstance(loader, tuple) else (loader,)

    def get_batch(self) -> Any:
        """Return the next training batch, restarting exhausted loaders (Betty semantics)."""
        self.fetches += 1
        loaders = self._loaders()
        if self._iterators is None:
            self.epoch_counter = [0] * len(loaders)
            self._iter_rng = [torch.get_rng_state() for _ in loaders]
            self._consumed = [0] * len(loaders)
            self._iterators = [iter(ld) for ld in loaders]
        batches = []
        for i, loader in enumerate(loaders):
            try:
                batch = next(self._iterators[i])
            except StopIteration:
                if i == 0 and self.is_implemented("epoch_callback"):
                    self.epoch_callback()  # type: ignore[attr-defined]  # NOTE: before the count moves (Betty)
                self.epoch_counter[i] += 1
                # NOTE: the RNG state at iterator creation fixes a shuffled loader's order,
                # which is what lets a checkpoint restore the exact data position
                self._iter_rng[i], self._consumed[i] = torch.get_rng_state(), 0
                _set_epoch(loader, self.epoch_counter[i])
                self._iterators[i] = iter(loader)
                try:
                    batch = next(self._iterators[i])
                except StopIteration:
                    raise ProgramError(f"train_data_loader of problem {self._name!r} yields no batches") from None
            self._consumed[i] += 1
            batches.append(batch)
        return batches[0] if len(batches) == 1 else tuple(batches)

    def data_state(self) -> dict[str, Any]:
        """Return where this problem is in its data, enough to resume at the same batch."""
        if self._iterators is None:
            return {"started": False}
        return {
            "started": True,
            "epoch_counter": list(self.epoch_counter),
            "iter_rng": list(self._iter_rng),
            "consumed": list(self._consumed),
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
        loaders = self._loaders()
        rng = torch.get_rng_state()
        try:
            self._iterators = []
            for loader, start, consumed, epoch in zip(
                loaders, state["iter_rng"], state["consumed"], state["epoch_counter"]
            ):
                torch.set_rng_state(start)
                _set_epoch(loader, epoch)
                it = iter(loader)
                for _ in range(consumed):
                    next(it)
                self._iterators.append(it)
        finally:
            torch.set_rng_state(rng)
        self.epoch_counter = list(state["epoch_counter"])
        self._iter_rng = list(state["iter_rng"])
        self._consumed = list(state["consumed"])


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
        for other in problems:
            if other is not problem:
                if hasattr(type(other), name):
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
    name = problem.name
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


def _set_epoch(loader: Any, epoch: int) -> None:
    # a DistributedSampler reshuffles per epoch only when told the epoch
    set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)


ImplicitProblem = Problem
IterativeProblem = Problem
