"""Problems made functional: parameters, buffers and batches become explicit inputs."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

import torch
from torch import Tensor, nn

from mlocompile.errors import MLOError, ProgramError, TraceError
from mlocompile.ir import annotate
from mlocompile.problem import Problem

Params = dict[str, Tensor]
ProgramParams = dict[str, Params]


class _ProgramModule(nn.Module):
    """Holds every problem's module so one ``functional_call`` swaps all their tensors."""

    def __init__(self, problems: dict[str, Problem]) -> None:
        super().__init__()
        self.problems = problems
        self.mods = nn.ModuleDict({n: p.module for n, p in problems.items() if p.module is not None})

    def forward(self, name: str, batch: Any) -> Any:
        return self.problems[name].training_step(batch)


# Bumped whenever any module registers (or replaces) a parameter, buffer or submodule: the
# cached views of the problems' modules below are rebuilt only then (walking modules is slow).
_REGISTRATIONS = [0]


def _count_registration(module: nn.Module, name: str, value: Any) -> None:
    _REGISTRATIONS[0] += 1


nn.modules.module.register_module_parameter_registration_hook(_count_registration)
nn.modules.module.register_module_buffer_registration_hook(_count_registration)
nn.modules.module.register_module_module_registration_hook(_count_registration)


class _LikePlainPyTorch(torch.overrides.TorchFunctionMode):
    """Run a loss under ``torch.func`` exactly as the same forward runs in plain PyTorch.

    Batch norm: see ``_batch_norm``; its running-statistics update is deferred (``defer``)
    until something reads the statistics or the loss returns, and dropped where nobody
    can read them. Dropout: under ``torch.func`` transforms ``F.dropout`` on CPU draws its
    mask another way than plain PyTorch does (the same seed gives other masks, e.g. after
    a batch-first attention block), so it runs here as ATen's CPU dropout is written
    (``empty_like(x).bernoulli_(1 − p)``, divided by ``1 − p``, times ``x``): the same
    draws, the same bits.
    """

    def __init__(self, problem: str, dropped: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self.problem = problem
        # id(tensor) -> (weak reference to it, the updates it still owes, in order)
        self.pending: dict[int, tuple[weakref.ref[Tensor], list[Callable[[Tensor], None]]]] = {}
        self._dropped = {id(t) for t in dropped}
        self._keep_alive = list(dropped)  # NOTE: their ids stay theirs while this mode lives

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if self.pending:
            self._flush_read(args, kwargs)
        if func in _AUTOGRAD_CALLS and _AUTOGRAD_CALLS[func](args, kwargs) and not _called_by_torch_func():
            raise ProgramError(_autograd_message(self.problem, func))
        if func is torch.nn.functional.batch_norm:
            return _batch_norm(func, args, kwargs, self)
        if func is torch.nn.functional.dropout:
            return _dropout(func, args, kwargs)
        return func(*args, **kwargs)

    def defer(self, target: Tensor, update: Callable[[Tensor], None]) -> None:
        """Run ``update(target)`` (an in-place write) when ``target`` is next read, or when the loss returns
        if ``target`` is still alive and its value is kept; never if it dies unread first (``update`` must
        not hold ``target``: only a weak reference does)."""
        key = id(target)
        entry = self.pending.get(key)
        if entry is not None and entry[0]() is target:
            entry[1].append(update)
            return

        def forget(ref: weakref.ref[Tensor], key: int = key) -> None:
            held = self.pending.get(key)
            if held is not None and held[0] is ref:
                del self.pending[key]

        self.pending[key] = (weakref.ref(target, forget), [update])

    def _flush_read(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Apply the deferred updates of every tensor among a call's arguments (before the call reads it)."""
        for a in (*args, *kwargs.values()):
            if isinstance(a, Tensor):
                self._flush(a)
            elif isinstance(a, (list, tuple, dict)):
                for leaf in torch.utils._pytree.tree_leaves(a):
                    if isinstance(leaf, Tensor):
                        self._flush(leaf)

    def _flush(self, t: Tensor) -> None:
        entry = self.pending.get(id(t))
        if entry is not None and entry[0]() is t:
            del self.pending[id(t)]
            for update in entry[1]:
                update(t)

    def finish(self) -> None:
        """The loss returned: apply what is still owed to live tensors whose values are kept."""
        owed = list(self.pending.items())
        self.pending.clear()
        for key, (ref, updates) in owed:
            target = ref()
            if key not in self._dropped and target is not None:
                for update in updates:
                    update(target)


# Calls that need plain autograd inside a loss, with when they do (requires_grad_(False) is harmless)
_AUTOGRAD_CALLS: dict[Any, Any] = {
    torch.Tensor.requires_grad_: lambda args, kwargs: kwargs.get("requires_grad", args[1] if len(args) > 1 else True),
    torch.Tensor.requires_grad.__set__: lambda args, kwargs: bool(args[1]),  # type: ignore[attr-defined]
    torch.autograd.grad: lambda args, kwargs: True,
    torch.autograd.backward: lambda args, kwargs: True,
    torch.Tensor.backward: lambda args, kwargs: True,
}


def _called_by_torch_func() -> bool:
    """Whether the autograd call being dispatched comes from torch.func itself (its grad makes its inputs
    require grad and calls torch.autograd.grad), not from the user's code."""
    frame: FrameType | None = sys._getframe(2)  # NOTE: past this helper and __torch_function__
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("torch.overrides", "torch.autograd")):
        frame = frame.f_back
    return frame is not None and frame.f_globals.get("__name__", "").startswith("torch._functorch")


def _autograd_message(problem: str, func: Any) -> str:
    call = {torch.Tensor.requires_grad.__set__: "requires_grad = True"}.get(  # type: ignore[attr-defined]
        func, getattr(func, "__name__", str(func)) + "()"
    )
    return (
        f"the training_step of problem {problem!r} calls {call}: a step's losses run inside torch.func "
        "transforms (traced by make_fx, under compile='eager' too), where torch.autograd.grad, backward() and "
        "requires_grad_() cannot differentiate. Write the inner gradient with torch.func.grad of a function of "
        "the input, e.g. for an adversarial (PGD/FGSM) perturbation:\n"
        "    def attack_loss(delta):\n"
        "        return F.cross_entropy(self.module(x + delta), y)\n"
        "    g = torch.func.grad(attack_loss)(torch.zeros_like(x))   # instead of delta.requires_grad_() and "
        "torch.autograd.grad(loss, delta)\n"
        "    x_adv = (x + eps * g.sign()).detach()\n"
        "If the network has BatchNorm in train mode (its running statistics update in place), run it on "
        "buffer copies made inside attack_loss: torch.func.functional_call(net, {k: b.clone() for k, b in "
        "net.named_buffers()}, (x + delta,), strict=False); the attack's forwards then do not advance them."
    )


def _dropout(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    bound = {**dict(zip(("input", "p", "training", "inplace"), args)), **kwargs}
    x, p = bound["input"], bound.get("p", 0.5)
    if not bound.get("training", True) or x.device.type != "cpu" or not 0 < p < 1 or x.numel() == 0:
        return func(*args, **kwargs)
    # NOTE: the mask is drawn into a contiguous tensor laid out as empty_like(x) would be, then
    # permuted to x's order: bernoulli_ fills memory in order, and functionalization turns it into
    # an out-of-place bernoulli that fills a contiguous result, which would reorder the draws
    strides = torch.empty_like(x).stride()
    order = sorted(range(x.dim()), key=lambda d: (-strides[d], d))
    noise = torch.empty([x.shape[d] for d in order], dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    noise = noise.permute([order.index(d) for d in range(x.dim())]).div(1 - p)
    return x.mul_(noise) if bound.get("inplace", False) else x * noise


def _batch_norm(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], mode: _LikePlainPyTorch) -> Any:
    """Run train-mode batch norm with its running-statistics update as visible tensor ops, deferred.

    ``aten.native_batch_norm`` updates ``running_mean``/``running_var`` in place although
    its schema does not say so: functionalization cannot see the write, and a pass that
    merges two copies of a buffer would have one buffer written twice. Here the op
    normalizes with batch statistics only (no running tensors passed: the same kernel,
    the same output bits) and the update is written as PyTorch defines it,
    ``r = (1 − m)·r + m·stat`` with the unbiased batch variance, through ``copy_``, which
    functionalization turns into a new value.

    Train-mode batch norm never reads its running statistics, and most of the updates a
    step traces are dropped: every re-evaluation of a loss inside a hypergradient discards
    its buffers, and so does a forward on buffer copies (an adversarial attack's). So the
    update is deferred (``_LikePlainPyTorch.defer``): it runs, the same ops on the same
    values, when the statistics are next read or the loss returns and keeps them, and is
    never traced where they are dropped (a 4-level SANAS step: 158,000 -> 110,000 nodes).
    """
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    bound = {**dict(zip(names, args)), **kwargs}
    mean, var = bound.get("running_mean"), bound.get("running_var")
    if not bound.get("training", False) or mean is None or var is None:
        return func(*args, **kwargs)
    x, momentum = bound["input"], bound.get("momentum", 0.1)
    weight, bias, eps = bound.get("weight"), bound.get("bias"), bound.get("eps", 1e-5)
    if x.device.type == "cpu" and x.layout == torch.strided and x.numel() > 0:
        # NOTE: the kernel F.batch_norm reaches on the CPU, without the empty reserve tensor its
        # dispatcher (_batch_norm_impl_index) also makes: one traced node per layer fewer
        out = torch.native_batch_norm(x, weight, bias, None, None, True, momentum, eps)[0]
    else:
        out = func(x, None, None, weight, bias, True, momentum, eps)
    dims = [d for d in range(x.dim()) if d != 1]

    def update(stat: Callable[[Tensor], Tensor]) -> Callable[[Tensor], None]:
        def apply(running: Tensor) -> None:
            with torch.no_grad():
                running.copy_(running * (1 - momentum) + stat(x.detach()) * momentum)

        return apply

    mode.defer(mean, update(lambda v: v.mean(dims)))
    mode.defer(var, update(lambda v: v.var(dims, correction=1)))
    return out


class FunctionalProgram:
    """Evaluates any problem's loss as a pure function of all problems' tensors."""

    def __init__(self, problems: dict[str, Problem]) -> None:
        self.problems = problems
        self.root = _ProgramModule(problems)
        self._params: dict[str, dict[str, nn.Parameter]] | None = None
        self._buffers: ProgramParams | None = None
        self._modules: list[nn.Module] = []
        self._seen = -1

    def _sync(self) -> None:
        """Rebuild the cached parameter, buffer and module views if any module changed its registrations.

        A trainable parameter replaced by a new ``nn.Parameter`` cannot be honoured: the
        user's optimizer (and every traced step) holds the old object.
        """
        if self._seen == _REGISTRATIONS[0]:
            return
        params = {n: prob.named_trainable_parameters() for n, prob in self.problems.items()}
        if self._params is not None:
            for prob, named in params.items():
                old = self._params[prob]
                changed = sorted(k for k in {*named, *old} if named.get(k) is not old.get(k))
                if changed:
                    raise ProgramError(
                        f"problem {prob!r}: trainable parameter(s) {changed} were replaced, added or removed "
                        "after the Engine was built; its optimizer holds the old ones. Change values in place "
                        "(with torch.no_grad(): p.copy_(new)), or build a new optimizer and Engine"
                    )
        self._params = params
        self._buffers = None
        self._modules = list(self.root.mods.modules())
        self._seen = _REGISTRATIONS[0]

    def named_params(self) -> dict[str, dict[str, nn.Parameter]]:
        """Every problem's trainable parameters by name (looked up again only after a registration)."""
        self._sync()
        assert self._params is not None
        return self._params

    def training_flags(self) -> tuple[bool, ...]:
        """``module.training`` of every submodule of every problem: a traced step is valid for one setting."""
        self._sync()
        return tuple([m.training for m in self._modules])

    def read_params(self) -> ProgramParams:
        """Return every problem's trainable parameters (detached aliases, no copies)."""
        return {n: {k: p.detach() for k, p in named.items()} for n, named in self.named_params().items()}

    def read_buffers(self) -> ProgramParams:
        """Return every problem's buffers (aliases, no copies; updated in place by the Engine)."""
        self._sync()
        if self._buffers is None:
            self._buffers = {
                n: {} if prob.module is None else dict(prob.module.named_buffers()) for n, prob in self.problems.items()
            }
        return {n: dict(b) for n, b in self._buffers.items()}

    def find_uses(self, name: str, params: ProgramParams, buffers: ProgramParams, batch: Any) -> set[tuple[str, str]]:
        """Run problem ``name``'s loss eagerly (no grad, randomness restored); return the (problem,
        parameter name) pairs whose tensors reached a torch function. Checks the loss is a scalar,
        as tracing does."""
        owner = {id(t): (prob, key) for prob, tensors in params.items() for key, t in tensors.items()}
        seen: set[tuple[str, str]] = set()

        class Record(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                for t in torch.utils._pytree.tree_leaves((args, kwargs or {})):
                    if id(t) in owner:
                        seen.add(owner[id(t)])
                return func(*args, **(kwargs or {}))

        rng = torch.get_rng_state()
        try:
            with torch.no_grad(), Record():
                self.loss(name, params, buffers, batch)
        finally:
            torch.set_rng_state(rng)
        return seen

    def loss(
        self, name: str, params: ProgramParams, buffers: ProgramParams, batch: Any
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return problem ``name``'s scalar loss and its extra logged tensors (buffers read, not advanced)."""
        loss, logs, _ = self.loss_and_buffers(name, params, buffers, batch, keep=False)
        return loss, logs

    def loss_and_buffers(
        self, name: str, params: ProgramParams, buffers: ProgramParams, batch: Any, keep: bool = True
    ) -> tuple[Tensor, dict[str, Tensor], ProgramParams]:
        """Return problem ``name``'s loss, its logged tensors and every buffer after the forward.

        The forward runs on copies of the buffers, so what it updates in place
        (BatchNorm's running statistics in train mode, a user's counters) becomes a
        new value, returned, and the inputs are left as they were: the step stays a
        pure function, and the caller decides whether the update happened. Without ``keep``
        the caller drops the buffers: updates nothing else reads are then not computed.
        """
        flat: dict[str, Tensor] = {}
        for prob, tensors in params.items():
            for key, t in tensors.items():
                flat[f"mods.{prob}.{key}"] = t
        with annotate(problem=name, role="forward"):
            after = {prob: {key: t.clone() for key, t in tensors.items()} for prob, tensors in buffers.items()}
            for prob, tensors in after.items():
                for key, t in tensors.items():
                    flat[f"mods.{prob}.{key}"] = t
            dropped = () if keep else [t for tensors in after.values() for t in tensors.values()]
            plain = _LikePlainPyTorch(name, dropped)
            with plain:
                try:
                    out = torch.func.functional_call(self.root, flat, (name, batch), strict=False)
                except MLOError:
                    raise
                except Exception as exc:
                    if reads_a_value(str(exc)):
                        raise  # tracing explains it (the line that read a value, and the fix)
                    first = str(exc).splitlines()[0] if str(exc) else ""
                    raise ProgramError(
                        f"the training_step of problem {name!r} raised {type(exc).__name__}: {first} (its traceback "
                        "is above)"
                    ) from exc
            plain._flush_read((out,), {})  # what the loss returns is read: a statistic it logs is current
            plain.finish()
        loss, logs = split_loss(name, out)
        return loss, logs, after


def reads_a_value(msg: str) -> bool:
    """Whether an error message says traced code read a tensor's value (``.item()``, ``if t:``)."""
    return "_local_scalar_dense" in msg or "data-dependent" in msg


def split_loss(name: str, out: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """Split a training_step result into (scalar loss, logged extras); reject bad shapes."""
    logs: dict[str, Tensor] = {}
    if isinstance(out, dict):
        if "loss" not in out:
            raise TraceError(f"training_step of problem {name!r} returned a dict without a 'loss' entry; add one")
        loss = out["loss"]
        for key, value in out.items():
            if key != "loss" and isinstance(value, Tensor) and value.numel() == 1:
                logs[key] = value.detach().reshape(())
    else:
        loss = out
    if not isinstance(loss, Tensor):
        raise TraceError(
            f"training_step of problem {name!r} returned {type(loss).__name__}, expected a scalar loss tensor "
            "(or a dict with 'loss')"
        )
    if loss.numel() != 1:
        raise TraceError(
            f"training_step of problem {name!r} returned a loss of shape {tuple(loss.shape)}; it must be a "
            "scalar: reduce it, e.g. with .mean()"
        )
    if not loss.is_floating_point():
        raise TraceError(f"training_step of problem {name!r} returned a {loss.dtype} loss; it must be floating point")
    return loss.reshape(()), logs


def with_params(params: ProgramParams, name: str, new: Params) -> ProgramParams:
    """Return ``params`` with problem ``name``'s entry replaced (shallow, no copies)."""
    out = dict(params)
    out[name] = new
    return out


def tree_dot(a: Params, b: Params) -> Tensor:
    """Return the inner product of two parameter dicts.

    Leaves of one dtype use ``torch.dot`` on flattened views: one pass, no
    elementwise product the size of the parameters (at 200k parameters, allocating
    that product costs as much as the arithmetic).
    """

    def dot(x: Tensor, y: Tensor) -> Tensor:
        if x.dtype != y.dtype or x.shape != y.shape:
            return (x * y).sum()
        return torch.dot(x.reshape(-1), y.reshape(-1))

    return sum(dot(a[k], b[k]) for k in a)  # type: ignore[return-value]


def tree_norm(v: Params) -> Tensor:
    """Return the Euclidean norm of a parameter dict (0 for an empty one).

    One ``_foreach_norm`` over the leaves (a reduction each, no squared copies)
    and the norm of those norms.
    """
    leaves = list(v.values())
    if not leaves:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(leaves)))


def tree_axpy(alpha: Tensor | float, x: Params, y: Params) -> Params:
    """Return ``alpha * x + y`` leaf-wise (``addcmul`` for a tensor ``alpha``: one op, no temporary)."""
    if isinstance(alpha, Tensor):
        return {k: torch.addcmul(y[k], alpha, x[k]) for k in y}
    return {k: alpha * x[k] + y[k] for k in y}
