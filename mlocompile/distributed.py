"""Data-parallel training on torch.distributed (DDP semantics), launched by torchrun.

Each rank reads its own shard of every problem's data, computes its gradients
(direct + hypergradients) on that shard, and the step graph averages the final
gradient of the stepping problem across ranks with a traceable all-reduce right
before the optimizer update, so parameters and optimizer state stay identical.
Best-response products (e.g. the darts perturbation norm ‖v‖) are computed from
the rank's own shard: each rank computes the hypergradient of its shard exactly as
one process would, and the average of those is what every rank applies.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from mlocompile.errors import DistributedError


def init_process_group(backend: str | None, timeout_s: float) -> tuple[int, int]:
    """Join the torchrun process group (env:// from RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise DistributedError(
                f"strategy='distributed' needs torchrun's environment ({', '.join(missing)} unset); launch with "
                "`torchrun --nproc_per_node N script.py` or `mlocompile run EXAMPLE --nproc N`"
            )
        chosen = backend if backend in ("gloo", "nccl") else ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout_s))
        atexit.register(_destroy_at_exit)
    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    """Wait for every rank, then leave the process group (call once, at the end of a run).

    A rank that exits while another still holds the group open (e.g. rank 0 writing
    files) can abort in the C++ teardown; leaving together avoids that.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _destroy_at_exit() -> None:
    # Tear the group down before interpreter shutdown destroys its threads mid-flight.
    if dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(grads: dict[str, torch.Tensor], world_size: int) -> dict[str, torch.Tensor]:
    """All-reduce (sum) the gradients as one flat buffer, divide by the world size.

    Traceable: make_fx records ``_c10d_functional.all_reduce`` + ``wait_tensor``.
    """
    keys = list(grads)
    flat = torch.cat([grads[k].reshape(-1) for k in keys])
    group = dist.group.WORLD
    assert group is not None, "average_gradients needs an initialized process group"
    flat = funcol.all_reduce(flat, "sum", group) / world_size
    out, offset = {}, 0
    for k in keys:
        n = grads[k].numel()
        out[k] = flat[offset : offset + n].view_as(grads[k])
        offset += n
    return out


class SplitBatches:
    """A rank's shard of a plain iterable of batches: each batch split along dim 0.

    Every tensor in a batch (tuple, list or dict of tensors) is cut into W chunks
    with ``torch.tensor_split`` and rank r keeps chunk r, so every rank sees as many
    batches as one process would (the schedule stays in lockstep).
    """

    def __init__(self, batches: Iterable[Any], rank: int, world_size: int) -> None:
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            yield torch.utils._pytree.tree_map(self._chunk, batch)

    def _chunk(self, leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            if leaf.shape[0] < self.world_size:
                raise DistributedError(
                    f"a batch of {leaf.shape[0]} rows cannot be split across {self.world_size} ranks"
                )
            return torch.tensor_split(leaf, self.world_size)[self.rank]
        return leaf


def shard_loader(loader: Any, rank: int, world_size: int) -> Any:
    """Return ``loader``'s shard for ``rank``.

    A DataLoader over a map-style dataset gets a DistributedSampler (shuffled iff the
    original was; reshuffled per epoch via ``set_epoch``); any other iterable of
    batches is split: rank r keeps the r-th of W chunks of every batch (dim 0).
    """
    if isinstance(loader, tuple):
        return tuple(shard_loader(ld, rank, world_size) for ld in loader)
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, (RandomSampler, SequentialSampler)):
        sampler: DistributedSampler[Any] = DistributedSampler(
            loader.dataset,
            world_size,
            rank,
            shuffle=isinstance(loader.sampler, RandomSampler),
            drop_last=loader.drop_last,
        )
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=sampler,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            drop_last=loader.drop_last,
        )
    return SplitBatches(loader, rank, world_size)


def setup(backend: str | None, timeout_s: float, problems: Iterable[Any]) -> tuple[int, int]:
    """Join the process group; with several ranks, start every rank from rank 0's weights and shard the data.

    Returns this process's rank and the world size.
    """
    problems = list(problems)
    rank, world_size = init_process_group(backend, timeout_s)
    if world_size > 1:
        broadcast_parameters(p.module for p in problems if p.module is not None)
        shard_problems(problems, rank, world_size)
    return rank, world_size


def shard_problems(problems: Iterable[Any], rank: int, world_size: int) -> None:
    """Give every problem this rank's shard of its loaders (its iterators restart there)."""
    for problem in problems:
        loader = shard_loader(problem._loaders(), rank, world_size)
        problem.train_data_loader = loader[0] if len(loader) == 1 else loader
        problem._iterators = None


def broadcast_parameters(modules: Iterable[torch.nn.Module]) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)


def check_identical(named: dict[str, list[torch.Tensor]], step: int) -> None:
    """Raise DistributedError naming the problem if its tensors differ across ranks."""
    for name, tensors in named.items():
        mine = torch.stack([t.detach().double().sum() for t in tensors] + [torch.zeros((), dtype=torch.float64)])
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise DistributedError(
                f"problem {name!r}: parameters or optimizer state differ across ranks at global step {step}; "
                "every rank must run the same program on equally many batches"
            )


def check_problems_identical(problems: Iterable[Any], step: int) -> None:
    """Raise DistributedError naming the first problem whose parameters or optimizer state differ across ranks."""
    named = {}
    for problem in problems:
        state = problem.optimizer.state
        named[problem.name] = [
            t
            for p in problem.trainable_parameters()
            for t in (p, *(v for v in state.get(p, {}).values() if isinstance(v, torch.Tensor)))
        ]
    check_identical(named, step)


def broadcast_flag(flag: bool) -> bool:
    """Return rank 0's ``flag`` on every rank (e.g. an early-stopping decision)."""
    box = [flag]
    dist.broadcast_object_list(box, 0)
    return bool(box[0])
