"""Functional optimizers lowered from the user's ``torch.optim`` objects.

A :class:`FunctionalOptimizer` turns one ``torch.optim`` optimizer into a pure update
rule ``(params, grads, state, hyper) -> (params, state)`` that traces with ``make_fx``,
is differentiable w.r.t. params and grads (iterative differentiation), and matches the
single-tensor ``torch.optim`` kernels to fp64 round-off. Hyperparameters are read from
``param_groups`` at every call, so LR schedulers work without retracing; state is read
from and written back to ``optimizer.state`` so checkpoints and a later eager
``optimizer.step()`` continue seamlessly.

What each class computes is its rule in ``optim_rules.OPTIMIZER_RULES`` (SGD, Adam,
AdamW, RMSprop, Adagrad, Adadelta, Adamax, NAdam, RAdam); this module reads and writes
the user's optimizer around those rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from mlocompile.errors import ProgramError
from mlocompile.optim_rules import OPTIMIZER_RULES, REFUSED_OPTIONS, SUPPORTED, OptimizerRule

StateDict = dict[str, dict[str, Tensor]]


class FunctionalOptimizer:
    """Pure, differentiable, traceable update rule mirroring one torch.optim optimizer.

    Attributes:
        kind: The rule's short name (``"sgd"``, ``"adam"``, ``"rmsprop"``, ...; see
            ``optim_rules.OPTIMIZER_RULES``).
        optimizer: The user's optimizer; hyperparameters and state live there.
        named_params: Parameter name -> the parameter the optimizer holds.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, named_params: dict[str, torch.nn.Parameter]) -> None:
        """Check the optimizer is supported and map every parameter to its group.

        Raises:
            ProgramError: The optimizer class is unsupported, an option it has is not
                reproduced (``capturable``, ``differentiable``, ``fused``), a parameter is
                complex, or the optimizer's parameters and ``named_params`` differ.
        """
        name = type(optimizer).__name__
        rule = OPTIMIZER_RULES.get(type(optimizer))
        if rule is None:
            raise ProgramError(
                f"optimizer {name} cannot be lowered to a functional update; supported: "
                f"{SUPPORTED}; use one of these for this problem"
            )
        self.rule: OptimizerRule = rule
        self.kind = rule.kind
        self.optimizer = optimizer
        self.named_params = dict(named_params)
        self._group_of = _match_params(optimizer, self.named_params)
        for pname, p in self.named_params.items():
            if p.is_complex():
                raise ProgramError(
                    f"optimizer {name}: parameter {pname!r} is complex ({p.dtype}); "
                    "only real floating-point parameters are supported"
                )
        for i in range(len(optimizer.param_groups)):
            self._flags(i)  # refused options raise now, not at the first step
        # torch's SGD keeps no step counter; remember ours so read/write round-trips.
        self._sgd_steps: dict[str, float] = {}

    def _flags(self, i: int) -> dict[str, bool]:
        g = self.optimizer.param_groups[i]
        for option in self.rule.refused:
            if g.get(option):
                raise ProgramError(
                    f"optimizer {type(self.optimizer).__name__}: param_groups[{i}] has {option}="
                    f"{g[option]!r}: {REFUSED_OPTIONS[option]}"
                )
        return dict(self.rule.flags(g))

    def state_dict(self) -> dict[str, Any]:
        """What ``optimizer.state_dict()`` lacks: SGD step counts (plain SGD keeps no state)."""
        return {"sgd_steps": dict(self._sgd_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` wrote."""
        self._sgd_steps = dict(state["sgd_steps"])

    def signature(self) -> tuple[Any, ...]:
        """Return the hashable structure of the update; a change means a retrace."""
        groups = tuple(tuple(self._flags(i).items()) for i in range(len(self.optimizer.param_groups)))
        return (self.kind, groups, tuple(self._group_of.items()))

    def hyperparameters(self) -> dict[str, Tensor]:
        """Read the numeric hyperparameters now, as 0-dim float64 tensors keyed ``"i.name"``."""
        out: dict[str, Tensor] = {}
        for i, g in enumerate(self.optimizer.param_groups):
            for k, v in self.rule.hyper(g).items():
                out[f"{i}.{k}"] = self._scalar(float(v))
        return out

    def _scalar(self, value: float) -> Tensor:
        # NOTE: hyperparameters rarely change; reuse one 0-dim tensor per value (never mutated)
        cache = self.__dict__.setdefault("_scalars", {})
        if value not in cache:
            if len(cache) > 4096:  # a schedule that never repeats: keep the cache bounded
                cache.clear()
            cache[value] = torch.tensor(value, dtype=torch.float64)
        return cache[value]  # type: ignore[no-any-return]

    def read_state(self) -> StateDict:
        """Return each parameter's state, initialised as torch would where it has none yet.

        The returned tensors may alias ``optimizer.state``; treat them as read-only.
        Every entry has ``"step"``, a 0-dim float64 tensor (0 = never stepped), shared
        by all parameters with the same count; other 0-dim counters (NAdam's
        ``mu_product``) are fresh tensors in torch's scalar dtype.
        """
        out: StateDict = {}
        groups = self.optimizer.param_groups
        flags = [self._flags(i) for i in range(len(groups))]
        for name, p in self.named_params.items():
            st = self.optimizer.state.get(p, {})  # .get: never create empty entries
            i = self._group_of[name]
            if self.kind == "sgd":
                s: dict[str, Tensor] = {}
                step = self._sgd_steps.get(name, 0.0)
                if flags[i]["momentum"]:
                    buf = st.get("momentum_buffer")
                    # step == 0 selects torch's "buf = grad" first-step branch.
                    step = 0.0 if buf is None else max(step, 1.0)
                    s["momentum_buffer"] = torch.zeros_like(p) if buf is None else buf
            else:
                step = float(st["step"]) if "step" in st else 0.0
                s = {k: st[k] if k in st else self.rule.init(p, groups[i], k) for k in self.rule.state(flags[i])}
                for key, initial in self.rule.counters:
                    value = float(st[key]) if key in st else initial
                    s[key] = torch.tensor(value, dtype=_scalar_dtype(False))
            s["step"] = self._shared_step(step)
            out[name] = s
        return out

    def read_entries(self, keys: tuple[str, ...]) -> StateDict:
        """Return ``keys`` of each parameter's ``optimizer.state``, zeros where torch has none.

        For methods that read another problem's optimizer (sama); the tensors may alias
        ``optimizer.state``: treat them as read-only.
        """
        out: StateDict = {}
        for name, p in self.named_params.items():
            st = self.optimizer.state.get(p, {})  # .get: never create empty entries
            out[name] = {k: st[k] if k in st else torch.zeros_like(p) for k in keys}
        return out

    def group_hyperparameters(self, name: str, hyper: dict[str, Tensor]) -> dict[str, Tensor]:
        """Pick parameter ``name``'s group out of ``hyper`` (``hyperparameters()``): ``{"lr": ..., ...}``."""
        prefix = f"{self._group_of[name]}."
        return {k[len(prefix) :]: v for k, v in hyper.items() if k.startswith(prefix)}

    def _shared_step(self, value: float) -> Tensor:
        # NOTE: parameters stepped together hold equal counters; handing out one tensor
        # per value makes them one graph input (flatten_inputs dedups tensors marked
        # _mlo_shared), so CSE computes e.g. Adam's bias corrections once, not per param.
        cache = self.__dict__.setdefault("_steps", {})
        if value not in cache:
            if len(cache) > 64:
                cache.clear()
            t = torch.tensor(value, dtype=torch.float64)
            t._mlo_shared = True  # type: ignore[attr-defined]
            cache[value] = t
        return cache[value]  # type: ignore[no-any-return]

    def write_state(self, state: StateDict) -> None:
        """Store ``state`` into ``optimizer.state`` exactly as torch.optim would hold it.

        Tensors are stored detached but not copied, so a later eager
        ``optimizer.step()`` updates them in place.
        """
        counts: dict[int, float] = {}  # parameters stepped together share one counter tensor: read it once
        for name, s in state.items():
            p = self.named_params[name]
            group = self.optimizer.param_groups[self._group_of[name]]
            step = counts.get(id(s["step"]))
            if step is None:
                step = counts[id(s["step"])] = float(s["step"])
            if step == 0 and not self.rule.eager_state:
                # never stepped (e.g. a restored snapshot): torch holds no state for it
                self.optimizer.state.pop(p, None)
                self._sgd_steps.pop(name, None)
                continue
            if self.kind == "sgd":
                self._sgd_steps[name] = step
                if float(group["momentum"]) != 0:
                    self.optimizer.state[p]["momentum_buffer"] = _detached(s["momentum_buffer"])
                continue
            st = self.optimizer.state[p]
            fused, capturable = bool(group.get("fused")), bool(group.get("capturable"))
            dtype, device = _scalar_dtype(fused), p.device if fused or capturable else torch.device("cpu")
            old = st.get("step")
            if isinstance(old, Tensor) and old.dim() == 0 and old.dtype == dtype and old.device == device:
                old.fill_(step)  # as torch.optim does (it increments its counter in place)
            else:
                st["step"] = torch.tensor(step, dtype=dtype, device=device)
            for k, v in s.items():
                if k != "step":
                    st[k] = _detached(v)

    def update(
        self,
        params: dict[str, Tensor],
        grads: dict[str, Tensor],
        state: StateDict,
        hyper: dict[str, Tensor],
    ) -> tuple[dict[str, Tensor], StateDict]:
        """Apply one optimizer step purely: no in-place ops, no branches on tensor values.

        A parameter missing from ``grads`` is skipped (param and state unchanged), as
        torch.optim skips parameters whose ``.grad`` is None.

        Args:
            params: Parameter name -> current value (any subset of ``named_params``).
            grads: Parameter name -> gradient of the loss.
            state: As returned by :meth:`read_state` or a previous :meth:`update`.
            hyper: As returned by :meth:`hyperparameters`.

        Returns:
            The new parameters and the new state, keyed like the inputs.
        """
        new_params: dict[str, Tensor] = {}
        new_state: StateDict = {}
        for name, param in params.items():
            grad = grads.get(name)
            if grad is None:
                new_params[name], new_state[name] = param, state[name]
                continue
            i = self._group_of[name]
            new_params[name], new_state[name] = self.rule.update(
                param, grad, state[name], self.group_hyperparameters(name, hyper), self._flags(i)
            )
        return new_params, new_state


def lower_optimizer(
    optimizer: torch.optim.Optimizer, named_params: dict[str, torch.nn.Parameter]
) -> FunctionalOptimizer:
    """Lower a user's torch.optim optimizer to a :class:`FunctionalOptimizer`.

    The update follows torch's single-tensor kernels (``foreach=False``); ``foreach``
    is ignored (torch's foreach kernels compute the same formulas, possibly rounding
    differently). For SGD, Adam and AdamW ``fused``, ``capturable`` and
    ``differentiable`` are ignored too; the other classes refuse them (an error).

    Raises:
        ProgramError: Unsupported optimizer class (the message lists the supported set),
            a refused option (named, with the fix), or parameters that differ between
            ``optimizer`` and ``named_params``.
    """
    return FunctionalOptimizer(optimizer, named_params)


def lower_optimizers(problems: Mapping[str, Any]) -> dict[str, FunctionalOptimizer]:
    """Lower every problem's optimizer over its trainable parameters, by problem name.

    Raises:
        ProgramError: naming the problem, for an optimizer over another problem's
            parameters or any mismatch ``lower_optimizer`` reports.
    """
    owner = {id(t): (n, k) for n, p in problems.items() for k, t in p.named_trainable_parameters().items()}
    out = {}
    for name, problem in problems.items():
        for group in problem.optimizer.param_groups:
            for t in group["params"]:
                other, key = owner.get(id(t), (name, ""))
                if other != name:
                    raise ProgramError(
                        f"problem {name!r}: its optimizer holds {other}.{key}, a parameter of problem {other!r}; "
                        "an optimizer updates only its own problem's parameters: build it from the module of "
                        f"problem {name!r} (module.parameters())"
                    )
        try:
            out[name] = lower_optimizer(problem.optimizer, problem.named_trainable_parameters())
        except ProgramError as exc:
            raise ProgramError(f"problem {name!r}: {exc}") from None
    return out


def _detached(t: Tensor) -> Tensor:
    return t.detach() if t.requires_grad else t


def _scalar_dtype(fused: bool) -> torch.dtype:
    """Return the dtype torch.optim stores ``step`` in (``optimizer._get_scalar_dtype``)."""
    if fused or torch.get_default_dtype() != torch.float64:
        return torch.float32
    return torch.float64


def _match_params(optimizer: torch.optim.Optimizer, named_params: dict[str, torch.nn.Parameter]) -> dict[str, int]:
    """Map each parameter name to the index of the param group holding it."""
    cls = type(optimizer).__name__
    name_of: dict[int, str] = {}
    for name, p in named_params.items():
        if id(p) in name_of:
            raise ProgramError(
                f"optimizer {cls}: named_params {name_of[id(p)]!r} and {name!r} are the "
                "same tensor; pass each parameter once (e.g. module.named_parameters())"
            )
        name_of[id(p)] = name
    group_of: dict[str, int] = {}
    unknown: list[str] = []
    for i, group in enumerate(optimizer.param_groups):
        for j, p in enumerate(group["params"]):
            if id(p) in name_of:
                group_of[name_of[id(p)]] = i
            elif not p.requires_grad:
                continue  # frozen: torch.optim skips it (its .grad stays None), and so does the update
            else:
                unknown.append(f"param_groups[{i}]['params'][{j}] (shape {tuple(p.shape)})")
    missing = [n for n in named_params if n not in group_of]
    if unknown or missing:
        raise ProgramError(
            f"optimizer {cls} and the problem's parameters differ: in the optimizer but "
            f"not named: {', '.join(unknown) or 'none'}; named but not in the optimizer: "
            f"{', '.join(map(repr, missing)) or 'none'}; build the optimizer from exactly "
            "the parameters the problem trains"
        )
    # Report in named_params order so signature() does not depend on group layout order.
    return {n: group_of[n] for n in named_params}
