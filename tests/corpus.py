"""A corpus of real-model MLO programs: the models this field meta-trains, at tiny sizes.

Every case is a bilevel data-reweighting program (the lower trains ``model`` on
per-sample losses weighted by ``sigmoid(λ[idx])``; the upper's loss is the
lower model's loss on a validation batch), so any classifier fits in it and each
hypergradient method has work to do. Used by the pass sweep (every registered
pass before/after on the traced step graphs) and by the model tests (fx and
inductor against eager and against hand-written ``torch.autograd`` references).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import mlocompile as mlo
from programs import Vec

N_SAMPLES = 16  # training samples, so λ has 16 entries
BATCH = 8
GROUP_LR, GROUP_WD = (0.2, 0.05), (1e-2, 0.0)  # "groups": the first layer, the rest


class ConvBN(nn.Module):
    """Conv + BatchNorm (batch statistics) + in-place ReLU + Dropout: a DARTS/iMAML-style cell."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.act(self.bn(self.conv(x))))
        return self.head(F.max_pool2d(h, 2).flatten(1))


class BasicBlock(nn.Module):
    """ResNet's basic block (He et al.; the block of Betty's Meta-Weight-Net ResNet-32): BatchNorm
    with running statistics tracked, in-place ReLU, a projection shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A two-block ResNet for 8x8 single-channel images (ResNet-20/32 at toy width and depth)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(BasicBlock(4, 4), BasicBlock(4, 8, stride=2))
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class LSTMClassifier(nn.Module):
    """Embedding with a padding index, an LSTM, a linear head on the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 5, padding_idx=0)
        self.lstm = nn.LSTM(5, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, (h, _) = self.lstm(self.embed(tokens))
        return self.head(h[-1])


class Transformer(nn.Module):
    """A one-layer ``nn.TransformerEncoder`` over projected inputs, mean-pooled."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.proj(x)).mean(1))


class TiedLM(nn.Module):
    """A bag-of-tokens classifier whose output layer is tied to its embedding (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.embed(tokens).mean(1))))[:, :3]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def frozen_mlp() -> nn.Module:
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    net[0].weight.requires_grad_(False)  # a frozen feature layer: only the rest trains
    return net


def _features(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    if kind == "image":
        return torch.randn(n, 1, 8, 8, generator=g)
    if kind == "tokens":
        tokens = torch.randint(1, 10, (n, 3), generator=g)
        tokens[: n // 2, -1:] = 0  # padded sequences
        return tokens
    if kind == "sequence":
        return torch.randn(n, 5, 4, generator=g)
    return torch.randn(n, 6, generator=g)


@dataclass(frozen=True)
class Model:
    """A corpus model: how to build it, what its inputs are, and the lower optimizer."""

    name: str
    build: Callable[[], nn.Module]
    inputs: str = "vector"  # vector | image | tokens | sequence
    optimizer: str = "sgd"  # sgd (momentum) | amsgrad | groups (SGD, two groups: other lr and weight decay)
    random: bool = False  # draws random numbers in train mode (dropout)


MODELS = {
    m.name: m
    for m in [
        Model("mlp", mlp),
        Model("conv_bn_dropout", ConvBN, "image", random=True),
        Model("lstm", LSTMClassifier, "tokens"),
        Model("transformer", Transformer, "sequence"),
        Model("tied", TiedLM, "tokens"),
        Model("frozen", frozen_mlp),
        Model("amsgrad", mlp, optimizer="amsgrad"),
        Model("resnet", ResNet, "image"),
        Model("param_groups", mlp, optimizer="groups"),
    ]
}
METHODS = ("darts", "neumann", "cg", "itd")
# (model, method) pairs of the corpus: optimizer variants matter only where the optimizer is differentiated
CASES = [(m, k) for m in MODELS for k in METHODS if m not in ("amsgrad", "param_groups") or k == "itd"]


class Lower(mlo.ImplicitProblem):
    """Per-sample losses weighted by the upper's ``sigmoid(λ[idx])``."""

    def training_step(self, batch):
        x, t, idx = batch
        per = F.cross_entropy(self.module(x), t, reduction="none")
        return (torch.sigmoid(self.upper()[idx]) * per).mean()


class Upper(mlo.ImplicitProblem):
    """The lower model's loss on a validation batch."""

    def training_step(self, batch):
        x, t = batch
        return F.cross_entropy(self.lower(x), t)


def data(model: Model, seed: int = 0) -> tuple[list, list]:
    """Two training batches (with sample indices) and one validation batch."""
    g = torch.Generator().manual_seed(seed)
    x = _features(model.inputs, N_SAMPLES, g)
    t = torch.randint(0, 3, (N_SAMPLES,), generator=g)
    idx = torch.arange(N_SAMPLES)
    train = [(x[i : i + BATCH], t[i : i + BATCH], idx[i : i + BATCH]) for i in range(0, N_SAMPLES, BATCH)]
    xv = _features(model.inputs, BATCH, g)
    return train, [(xv, torch.randint(0, 3, (BATCH,), generator=g))]


def lower_config(method: str, unroll: int = 1) -> mlo.Config:
    return mlo.Config(
        type=method, unroll_steps=unroll, neumann_iterations=2, neumann_alpha=0.1, cg_iterations=2, darts_alpha=0.01
    )


def build(model_name: str, method: str, backend: str = "fx", seed: int = 0, unroll: int = 1, **engine_kw):
    """Return ``(engine, model, lam)`` for one corpus case, deterministic in ``seed``."""
    model = MODELS[model_name]
    torch.manual_seed(seed)
    net = model.build()
    lam = Vec(torch.linspace(-1.0, 1.0, N_SAMPLES))
    if model.optimizer == "amsgrad":
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=0.05, amsgrad=True)
    elif model.optimizer == "groups":
        first, rest = list(net[0].parameters()), list(net[2].parameters())
        opt = torch.optim.SGD(
            [{"params": first, "lr": GROUP_LR[0], "weight_decay": GROUP_WD[0]}, {"params": rest}],
            lr=GROUP_LR[1],
            momentum=0.9,
            weight_decay=GROUP_WD[1],
        )
    else:
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    train, valid = data(model, seed)
    lower = Lower("lower", lower_config(method, unroll), net, opt, train_data_loader=train)
    upper = Upper("upper", mlo.Config(), lam, torch.optim.SGD(lam.parameters(), lr=1.0), train_data_loader=valid)
    engine = mlo.Engine(
        [upper, lower],
        mlo.EngineConfig(compile=backend, progress=False, **engine_kw),
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
    )
    return engine, net, lam
