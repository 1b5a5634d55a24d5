"""Random-number state as explicit step data, so an ``itd`` replay draws what the live steps drew.

A lower problem with dropout (or any random op) draws fresh numbers at each live
step. Its ``itd`` hypergradient replays those steps inside the upper's step; to
differentiate the trajectory that actually happened, each replayed step must draw
the same numbers. The Engine records the generator state before every live step of
an ``itd`` problem (``record_rng_states``), and the replay sets it with
``swap_rng_state``, an operator that make_fx records like any other, so the eager,
fx and inductor backends run the same thing.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("mlocompile::swap_rng_state", mutates_args=())
def swap_rng_state(state: Tensor, device: str) -> Tensor:
    """Set the default generator of ``device`` to ``state``; return the state it had."""
    dev = torch.device(device)
    if dev.type == "cpu":
        old = torch.get_rng_state()
        torch.set_rng_state(state)
    else:
        old = torch.cuda.get_rng_state(dev)
        torch.cuda.set_rng_state(state, dev)
    return old


@swap_rng_state.register_fake
def _(state: Tensor, device: str) -> Tensor:
    return torch.empty_like(state)


# NOTE: the result is often unused; the call must survive DCE, never be merged by CSE, never be
# recomputed by checkpointing, and keep its place among the random ops around it
SWAP_RNG_STATE = torch.ops.mlocompile.swap_rng_state.default
torch.fx.node._side_effectful_functions.add(SWAP_RNG_STATE)


def rng_devices(tensors: list[Tensor]) -> list[str]:
    """The generators a step on ``tensors`` may draw from: the CPU one, plus each CUDA device used."""
    cuda = sorted({str(t.device) for t in tensors if t.device.type == "cuda"})
    return ["cpu", *cuda]


def record_rng_states(devices: list[str]) -> dict[str, Tensor]:
    """Return the current state of each device's default generator."""
    return {d: torch.get_rng_state() if d == "cpu" else torch.cuda.get_rng_state(torch.device(d)) for d in devices}


def set_rng_states(states: dict[str, Tensor]) -> dict[str, Tensor]:
    """Set each device's generator (traceably); return the states they had."""
    return {d: swap_rng_state(s, d) for d, s in states.items()}


@torch.library.custom_op("mlocompile::after", mutates_args=())
def after(x: Tensor, token: Tensor) -> Tensor:
    """Return a copy of ``x`` that cannot be computed before ``token``: an ordering edge as data."""
    return x.clone()


@after.register_fake
def _(x: Tensor, token: Tensor) -> Tensor:
    return torch.empty_like(x)


AFTER = torch.ops.mlocompile.after.default


@torch.library.custom_op("mlocompile::bernoulli", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def bernoulli(like: Tensor, p: float) -> Tensor:
    """``aten.bernoulli.p`` (a new tensor shaped like ``like``, each element 1 with probability ``p``)
    as an operator inductor cannot see into: see ``passes/opaque_bernoulli.py``."""
    return torch.ops.aten.bernoulli.p(like, p)


@bernoulli.register_fake
def _(like: Tensor, p: float) -> Tensor:
    return torch.empty_like(like, memory_format=torch.contiguous_format)


BERNOULLI = torch.ops.mlocompile.bernoulli.default
