"""Data cursors: one loader's iterator and where it stands, so data order is Betty's and resumes exactly.

Betty 0.2.1 creates every data iterator when the Engine is built, and a new one each time
a loader is exhausted. A shuffled ``DataLoader`` draws from a random stream twice per
iterator: at ``iter()`` (its base seed) and at the first ``next()`` (the sampler's
permutation), from the loader's own ``torch.Generator`` where it has one, else from the
global one. Other draws (dropout) come in between, so both moments matter. A ``Cursor``
records the random state before each of the two and the batches taken since, which is
enough to rebuild the iterator at the same batch (``Cursor.restore``) and to show the next
batch without drawing from any stream or touching the live iterator (``Cursor.peek``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from mlocompile.checkpoint import rng_state, set_rng_state
from mlocompile.errors import CheckpointError


def loader_generators(loader: Iterable[Any]) -> list[torch.Generator]:
    """Return the ``torch.Generator`` objects a loader draws from besides the global one (its own, its sampler's)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    owners = (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None))
    found: list[torch.Generator] = []
    for owner in owners:
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


def _persistent(loader: Any) -> bool:
    return bool(getattr(loader, "persistent_workers", False)) and getattr(loader, "num_workers", 0) > 0


@contextmanager
def untouched_streams(loader: Iterable[Any]) -> Iterator[None]:
    """Run the block, then put back every random stream it could have drawn from.

    The global streams (torch, Python, numpy) and the loader's generators; a loader with
    persistent workers keeps its live iterator (the block gets a fresh one of its own).
    """
    rng, gens = rng_state(), [(g, g.get_state()) for g in loader_generators(loader)]
    persistent = _persistent(loader)
    live = getattr(loader, "_iterator", None) if persistent else None
    if persistent:
        loader._iterator = None  # type: ignore[attr-defined]  # NOTE: else iter() resets the live iterator
    try:
        yield
    finally:
        if persistent:
            mine = loader._iterator  # type: ignore[attr-defined]
            loader._iterator = live  # type: ignore[attr-defined]
            if mine is not None and mine is not live:
                mine._shutdown_workers()
        set_rng_state(rng)
        for gen, state in gens:
            gen.set_state(state)


def _set_epoch(loader: Any, epoch: int) -> None:
    # a DistributedSampler reshuffles per epoch only when told the epoch
    set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)


class Cursor:
    """One loader's live iterator, with the random states that fix its order and the batches taken."""

    def __init__(self, loader: Iterable[Any], epoch: int = 0) -> None:
        self.loader = loader
        self.epoch = epoch
        self.consumed = 0
        self.start_rng: dict[str, Any] | None = None  # global streams before iter()
        self.gens: list[Tensor] = []  # the loader's generators before iter()
        self.first_rng: dict[str, Any] | None = None  # global streams before the first next()
        self.iterator: Iterator[Any] | None = None

    def begin(self) -> None:
        """Create the iterator now (the loader draws its base seed); Betty does at build and each epoch."""
        self.start_rng, self.gens = rng_state(), [g.get_state() for g in loader_generators(self.loader)]
        self.first_rng, self.consumed = None, 0
        _set_epoch(self.loader, self.epoch)
        self.iterator = iter(self.loader)

    def next(self) -> Any:
        """Return the next batch; raise StopIteration at the end of the epoch."""
        if self.iterator is None:
            self.begin()
        if self.consumed == 0:
            self.first_rng = rng_state()  # NOTE: a shuffling sampler draws its permutation here
        batch = next(self.iterator)  # type: ignore[arg-type]  # begin() set it
        self.consumed += 1
        return batch

    def state(self) -> dict[str, Any]:
        """Where the cursor stands, as plain data (checkpoints load it with ``weights_only``)."""
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "start_rng": self.start_rng,
            "gens": list(self.gens),
            "first_rng": self.first_rng,
        }

    @classmethod
    def restore(cls, loader: Iterable[Any], state: dict[str, Any]) -> Cursor:
        """Rebuild the iterator ``state`` describes, at the same batch; leaves the global streams moved.

        The loader's generators end where the live ones were (nothing else draws from them).
        """
        cursor = cls(loader, state["epoch"])
        if state["start_rng"] is None:  # never begun
            return cursor
        gens = loader_generators(loader)
        if len(gens) != len(state["gens"]):
            raise CheckpointError(
                f"a data position was saved for a loader with {len(state['gens'])} torch.Generator(s), this loader "
                f"has {len(gens)}; build the DataLoader the same way (generator=...)"
            )
        set_rng_state(state["start_rng"])
        for gen, saved in zip(gens, state["gens"]):
            gen.set_state(saved)
        cursor.begin()
        if state["consumed"]:
            set_rng_state(state["first_rng"])
            for _ in range(state["consumed"]):
                cursor.next()
        return cursor

    def peek(self) -> Any:
        """Return the batch ``next()`` would return now, changing nothing (a replay on a twin iterator).

        Raises StopIteration if the epoch is over (``next()`` would start a new one).
        """
        with untouched_streams(self.loader):
            now, gens = rng_state(), [(g, g.get_state()) for g in loader_generators(self.loader)]
            twin = Cursor.restore(self.loader, self.state())
            set_rng_state(now)  # the next draws are the ones next() would make now
            for gen, state in gens:
                gen.set_state(state)
            return twin.next()
