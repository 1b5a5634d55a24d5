"""Problems made functional: parameters, buffers and batches become explicit inputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mlocompile.errors import TraceError
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


class FunctionalProgram:
    """Evaluates any problem's loss as a pure function of all problems' tensors."""

    def __init__(self, problems: dict[str, Problem]) -> None:
        self.problems = problems
        self.root = _ProgramModule(problems)
        self._params: dict[str, dict[str, nn.Parameter]] | None = None
        self._buffers: ProgramParams | None = None

    def named_params(self) -> dict[str, dict[str, nn.Parameter]]:
        """Every problem's trainable parameters by name (looked up once: walking modules is slow)."""
        if self._params is None:
            self._params = {n: prob.named_trainable_parameters() for n, prob in self.problems.items()}
        return self._params

    def read_params(self) -> ProgramParams:
        """Return every problem's trainable parameters (detached aliases, no copies)."""
        return {n: {k: p.detach() for k, p in named.items()} for n, named in self.named_params().items()}

    def read_buffers(self) -> ProgramParams:
        """Return every problem's buffers (aliases, no copies; updated in place by modules)."""
        if self._buffers is None:
            self._buffers = {
                n: {} if prob.module is None else dict(prob.module.named_buffers()) for n, prob in self.problems.items()
            }
        return {n: dict(b) for n, b in self._buffers.items()}

    def loss(
        self, name: str, params: ProgramParams, buffers: ProgramParams, batch: Any
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return problem ``name``'s scalar loss and its extra logged tensors."""
        flat: dict[str, Tensor] = {}
        for prob, tensors in params.items():
            for key, t in tensors.items():
                flat[f"mods.{prob}.{key}"] = t
        for prob, tensors in buffers.items():
            for key, t in tensors.items():
                flat[f"mods.{prob}.{key}"] = t
        with annotate(problem=name, role="forward"):
            out = torch.func.functional_call(self.root, flat, (name, batch), strict=False)
        return split_loss(name, out)


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
