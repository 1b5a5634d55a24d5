"""The benchmarked programs' losses, modules and synthetic data.

Each loss is written once, as a mixin, and put on top of either library's
``ImplicitProblem`` (as ``tests/test_betty_parity.py`` does), so Betty and mlocompile
run literally the same ``training_step``. The hand-written torch.func baseline
(``benchmarks/torchfunc.py``) calls the pure functions below with the same modules.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = tuple[Tensor, ...]


# -- pure loss functions (shared by the mixins and the torch.func baseline) --------------------
def mwn_inner_loss(net: Any, wnet: Any, batch: Batch) -> Tensor:
    """Per-sample cross-entropies reweighted by ``sigmoid(wnet(loss))`` (Meta-Weight-Net)."""
    x, y = batch
    loss = F.cross_entropy(net(x), y, reduction="none").reshape(-1, 1)
    return (torch.sigmoid(wnet(loss.detach())) * loss).mean()


def ce_loss(net: Any, batch: Batch) -> Tensor:
    """Mean cross-entropy of ``net`` on ``batch``."""
    x, y = batch
    return F.cross_entropy(net(x), y)


def hpo_inner_loss(logits: Tensor, weight: Tensor, log_lambda: Tensor, y: Tensor) -> Tensor:
    """Logistic loss plus the per-feature L2 penalty ``0.5 Σ exp(log_lambda) w²``."""
    penalty = 0.5 * (torch.exp(log_lambda) * weight.reshape(-1) ** 2).sum()
    return F.binary_cross_entropy_with_logits(logits, y) + penalty


def chain_middle_loss(bottom: Any, middle_params: list[Tensor], top_value: Tensor, batch: Batch) -> Tensor:
    """Cross-entropy of ``bottom`` on meta data plus ``0.5 exp(top) ‖θ_middle‖²``."""
    reg = sum((p**2).sum() for p in middle_params)
    return ce_loss(bottom, batch) + 0.5 * torch.exp(top_value).sum() * reg


def chain_top_loss(middle: Any, batch: Batch) -> Tensor:
    """Squared distance of the weight net's outputs from 0.5."""
    (z,) = batch
    return ((torch.sigmoid(middle(z)) - 0.5) ** 2).mean()


# -- loss mixins, one per problem ----------------------------------------------------------------
class MWNInner:
    """Meta-Weight-Net lower problem: the classifier on reweighted per-sample losses."""

    def training_step(self, batch: Batch) -> Tensor:
        return mwn_inner_loss(self.module, self.outer, batch)  # type: ignore[attr-defined]


class MWNOuter:
    """Meta-Weight-Net upper problem: the classifier's loss on clean meta data."""

    def training_step(self, batch: Batch) -> Tensor:
        return ce_loss(self.inner, batch)  # type: ignore[attr-defined]


class HPOInner:
    """Logistic regression with a per-feature L2 penalty ``exp(outer())``."""

    def training_step(self, batch: Batch) -> Tensor:
        x, y = batch
        logits = self.module(x).squeeze(-1)  # type: ignore[attr-defined]
        return hpo_inner_loss(logits, self.module.weight, self.outer(), y)  # type: ignore[attr-defined]


class HPOOuter:
    """Validation logistic loss of the regularized model."""

    def training_step(self, batch: Batch) -> Tensor:
        x, y = batch
        return F.binary_cross_entropy_with_logits(self.inner(x).squeeze(-1), y)  # type: ignore[attr-defined]


class ChainBottom:
    """Level 0: classifier on per-sample losses reweighted by ``middle``."""

    def training_step(self, batch: Batch) -> Tensor:
        return mwn_inner_loss(self.module, self.middle, batch)  # type: ignore[attr-defined]


class ChainMiddle:
    """Level 1: the weight net, judged by ``bottom`` on meta data, L2-regularized by ``top``."""

    def training_step(self, batch: Batch) -> Tensor:
        params = list(self.module.parameters())  # type: ignore[attr-defined]
        return chain_middle_loss(self.bottom, params, self.top(), batch)  # type: ignore[attr-defined]


class ChainTop:
    """Level 2: the regularization strength, judged by the weight net's outputs."""

    def training_step(self, batch: Batch) -> Tensor:
        return chain_top_loss(self.middle, batch)  # type: ignore[attr-defined]


class MAMLInner:
    """MAML lower problem: adapts, from the meta-initialisation, to one sinusoid task."""

    def on_inner_loop_start(self) -> None:
        self.load_parameters_from(self.outer)  # type: ignore[attr-defined]

    def training_step(self, batch: Batch) -> Tensor:
        x, y = batch
        return F.mse_loss(self.module(x), y)  # type: ignore[attr-defined]


class BettyMAMLInner(MAMLInner):
    """Betty has no ``load_parameters_from``: copy the meta-initialisation by hand."""

    def on_inner_loop_start(self) -> None:
        with torch.no_grad():
            for p, q in zip(self.module.parameters(), self.outer.module.parameters()):  # type: ignore[attr-defined]
                p.copy_(q)


class MAMLOuter:
    """MAML upper problem: the adapted model's loss on the task's query points."""

    def training_step(self, batch: Batch) -> Tensor:
        x, y = batch
        return F.mse_loss(self.inner(x), y)  # type: ignore[attr-defined]


# -- modules --------------------------------------------------------------------------------------
class HyperParam(nn.Module):
    """A module whose forward returns its parameter (per-feature log-lambdas)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.log_l = nn.Parameter(torch.full((d,), -3.0))

    def forward(self) -> Tensor:
        return self.log_l


def mlp(*sizes: int) -> nn.Sequential:
    """Return Linear-ReLU-...-Linear with the given widths."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# -- synthetic data (a few batches, cycled: data loading costs nothing and is identical) -----------
def classification_batches(
    seed: int, n: int, batch: int, d: int, classes: int, noise: float = 0.0
) -> list[tuple[Tensor, Tensor]]:
    """Gaussian inputs labelled by a fixed random projection, a fraction ``noise`` relabelled."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(d, classes, generator=torch.Generator().manual_seed(1234))
    out = []
    for _ in range(n):
        x = torch.randn(batch, d, generator=g)
        y = (x @ proj).argmax(-1)
        flip = torch.rand(batch, generator=g) < noise
        out.append((x, torch.where(flip, torch.randint(0, classes, (batch,), generator=g), y)))
    return out


def binary_batches(seed: int, n: int, batch: int, d: int) -> list[tuple[Tensor, Tensor]]:
    """Gaussian inputs with Bernoulli labels from a sparse-ish true logistic model."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=torch.Generator().manual_seed(4321)) * (torch.rand(d, generator=g) < 0.2)
    out = []
    for _ in range(n):
        x = torch.randn(batch, d, generator=g)
        y = (torch.sigmoid(x @ w_true) > torch.rand(batch, generator=g)).to(x.dtype)
        out.append((x, y))
    return out


def sinusoid_tasks(seed: int, n_tasks: int, shots: int) -> list[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]:
    """MAML's sinusoid regression: per task, ``shots`` support and ``shots`` query points."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n_tasks):
        amp = 0.1 + 4.9 * torch.rand((), generator=g)
        phase = torch.pi * torch.rand((), generator=g)
        xs, xq = (10 * torch.rand(shots, 1, generator=g) - 5 for _ in range(2))
        tasks.append(((xs, amp * torch.sin(xs - phase)), (xq, amp * torch.sin(xq - phase))))
    return tasks
