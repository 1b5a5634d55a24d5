"""Betty's ``Env``: state shared by several problems (a task sampler, an RL environment).

An Engine built with ``env=`` hands it to every problem as ``self.env`` and makes every
problem an attribute of it (``env.<name>``); the user steps it, typically from an
overridden ``Engine.train_step``. The Engine never steps it, saves it or rolls it back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class Env:
    """Base class of a user environment shared by the problems of a program (Betty's ``Env``).

    Subclass it, keep shared state on it (e.g. ``self.batch`` of the current task) and
    define the methods your program calls (``step()``, ``reset()``); problems read it as
    ``self.env``. The Engine calls ``configure_distributed_training``,
    ``configure_device`` and then ``initialize`` once, when it is built.

    Its state is the user's: a failed ``train_step`` does not put it back, and
    ``Engine.save`` does not store it (save it yourself, e.g. the sampler's seed).
    """

    env: Any = None
    train_data_loader: Any = None
    device: torch.device | None = None
    _strategy: str | None = None
    _world_size: int | None = None
    _rank: int | None = None
    _local_rank: int | None = None

    def initialize(self) -> None:
        """Finish set-up once the Engine has configured device and distribution (override freely)."""
        if self.train_data_loader is not None:
            self.train_data_loader = self.patch_data_loader(self.train_data_loader)

    def patch_module(self, module: nn.Module) -> nn.Module:
        """Return ``module`` on the engine's device (Betty also wraps it for DDP; one process here)."""
        return module.to(self.device) if self.device is not None else module

    def patch_data_loader(self, loader: Any) -> Any:
        """Return ``loader`` as this process should use it (unchanged: one process here)."""
        return loader

    def configure_device(self, device: torch.device | str | None) -> None:
        """Set the device the program runs on."""
        self.device = None if device is None else torch.device(device)

    def configure_distributed_training(self, dictionary: Mapping[str, Any]) -> None:
        """Take the engine's distribution settings (``strategy``, ``world_size``, ``rank``, ``local_rank``).

        The Engine refuses an Env under ``strategy="distributed"`` (it would not shard or
        synchronize the Env's data), so this is always one process here.
        """
        self._strategy = dictionary["strategy"]
        self._world_size = dictionary["world_size"]
        self._rank = dictionary["rank"]
        self._local_rank = dictionary["local_rank"]
