"""Betty's DARTS example (examples/neural_architecture_search), ported against a ``lib`` namespace.

Follows Betty's ``train_search.py`` (problems, configs, engine), ``model_search.py``,
``operations.py`` and ``genotypes.py`` (copied below, unchanged apart from dropping the
unused ``from utils import accuracy`` import). Removed: argparse (its defaults are the
keyword arguments of :func:`build`), CIFAR-10 download and transforms (synthetic images of
CIFAR's shape 3x32x32, 10 classes), ``CUDA_VISIBLE_DEVICES`` and the ``.to(device)``
moves, DataLoader worker/pin-memory settings, and the ``torch.save`` of the genotype in
``validation()`` (the genotype is kept on the engine as ``engine.genotype`` instead).
Shrunk: ``init_ch`` 16 -> 4, ``layers`` 8 -> 3 (one normal cell, two reduction cells, so
both alphas are used), ``arch_steps`` 4 -> 2 nodes per cell (and ``Network``'s ``multiplier`` 4 -> 2 with it), batch 64 -> 4, and
``report_freq`` 100 -> 10.
"""

from __future__ import annotations

from collections import namedtuple
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn, optim

# -- genotypes.py -----------------------------------------------------------------------------
Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")

PRIMITIVES = [
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
]

# -- operations.py ----------------------------------------------------------------------------
OPS = {
    "none": lambda C, stride, affine: Zero(stride),
    "avg_pool_3x3": lambda C, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda C, stride, affine: (Identity() if stride == 1 else FactorizedReduce(C, C, affine=affine)),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine=affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine=affine),
    "sep_conv_7x7": lambda C, stride, affine: SepConv(C, C, 7, stride, 3, affine=affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine=affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine=affine),
    "conv_7x1_1x7": lambda C, stride, affine: nn.Sequential(
        nn.ReLU(inplace=False),
        nn.Conv2d(C, C, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
        nn.Conv2d(C, C, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
        nn.BatchNorm2d(C, affine=affine),
    ),
}


class ReLUConvBN(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x):
        return self.op(x)


class DilConv(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(
                C_in,
                C_in,
                kernel_size=kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=C_in,
                bias=False,
            ),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x):
        return self.op(x)


class SepConv(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size=kernel_size, stride=stride, padding=padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_in, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size=kernel_size, stride=1, padding=padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x):
        return self.op(x)


class Identity(nn.Module):
    def forward(self, x):
        return x


class Zero(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    def __init__(self, C_in, C_out, affine=True):
        super().__init__()
        assert C_out % 2 == 0
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        out = torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1)
        out = self.bn(out)
        return out


# -- model_search.py --------------------------------------------------------------------------
class MixedLayer(nn.Module):
    def __init__(self, c, stride):
        super().__init__()
        self.layers = nn.ModuleList()
        for primitive in PRIMITIVES:
            layer = OPS[primitive](c, stride, False)
            if "pool" in primitive:
                layer = nn.Sequential(layer, nn.BatchNorm2d(c, affine=False))
            self.layers.append(layer)

    def forward(self, x, weights):
        res = [w * layer(x) for w, layer in zip(weights, self.layers)]
        res = sum(res)
        return res


class Cell(nn.Module):
    def __init__(self, steps, multiplier, cpp, cp, c, reduction, reduction_prev):
        super().__init__()
        self.reduction = reduction
        self.reduction_prev = reduction_prev
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(cpp, c, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(cpp, c, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(cp, c, 1, 1, 0, affine=False)
        self.steps = steps
        self.multiplier = multiplier
        self.layers = nn.ModuleList()
        for i in range(self.steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                layer = MixedLayer(c, stride)
                self.layers.append(layer)

    def forward(self, s0, s1, weights):
        s0 = self.preprocess0(s0)
        s1 = self.preprocess1(s1)
        states = [s0, s1]
        offset = 0
        for _ in range(self.steps):
            s = sum(self.layers[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self.multiplier :], dim=1)


class Network(nn.Module):
    def __init__(self, c, num_classes, layers, criterion, steps=4, multiplier=4, stem_multiplier=3):
        super().__init__()
        self.c = c
        self.num_classes = num_classes
        self.layers = layers
        self.criterion = criterion
        self.steps = steps
        self.multiplier = multiplier
        c_curr = stem_multiplier * c
        self.stem = nn.Sequential(nn.Conv2d(3, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr))
        cpp, cp, c_curr = c_curr, c_curr, c
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            if i in [layers // 3, 2 * layers // 3]:
                c_curr *= 2
                reduction = True
            else:
                reduction = False
            cell = Cell(steps, multiplier, cpp, cp, c_curr, reduction, reduction_prev)
            reduction_prev = reduction
            self.cells += [cell]
            cpp, cp = cp, multiplier * c_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cp, num_classes)

    def forward(self, x, alphas):
        s0 = s1 = self.stem(x)
        alpha_reduce, alpha_normal = alphas
        for _, cell in enumerate(self.cells):
            if cell.reduction:
                weights = F.softmax(alpha_reduce, dim=-1)
            else:
                weights = F.softmax(alpha_normal, dim=-1)
            s0, s1 = s1, cell(s0, s1, weights)
        out = self.global_pooling(s1)
        logits = self.classifier(out.view(out.size(0), -1))
        return logits

    def loss(self, x, alphas, target, acc=False):
        logits = self(x, alphas)
        if not acc:
            return self.criterion(logits, target)
        correct = (logits.argmax(dim=1) == target).float().sum().item()
        return self.criterion(logits, target), correct

    def genotype(self, alphas):
        alpha_reduce, alpha_normal = alphas

        def _parse(weights):
            gene = []
            n = 2
            start = 0
            for i in range(self.steps):
                end = start + n
                W = weights[start:end].copy()
                edges = sorted(
                    range(i + 2),
                    key=lambda x: -max(W[x][k] for k in range(len(W[x])) if k != PRIMITIVES.index("none")),
                )[:2]
                for j in edges:
                    k_best = None
                    for k in range(len(W[j])):
                        if k != PRIMITIVES.index("none"):
                            if k_best is None or W[j][k] > W[j][k_best]:
                                k_best = k
                    gene.append((PRIMITIVES[k_best], j))
                start = end
                n += 1
            return gene

        gene_normal = _parse(F.softmax(alpha_normal, dim=-1).data.cpu().numpy())
        gene_reduce = _parse(F.softmax(alpha_reduce, dim=-1).data.cpu().numpy())
        concat = range(2 + self.steps - self.multiplier, self.steps + 2)
        return Genotype(normal=gene_normal, normal_concat=concat, reduce=gene_reduce, reduce_concat=concat)


class Architecture(nn.Module):
    def __init__(self, steps):
        super().__init__()
        k = sum(1 for i in range(steps) for j in range(2 + i))
        num_ops = len(PRIMITIVES)
        self.alpha_normal = nn.Parameter(torch.randn(k, num_ops))
        self.alpha_reduce = nn.Parameter(torch.randn(k, num_ops))
        with torch.no_grad():
            self.alpha_normal.mul_(1e-3)
            self.alpha_reduce.mul_(1e-3)

    def forward(self):
        return self.alpha_reduce, self.alpha_normal


# -- synthetic CIFAR-10 -----------------------------------------------------------------------
def cifar_like(seed: int, n_batches: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised 3x32x32 images, 10 classes: a fixed per-class pattern plus noise (learnable)."""
    patterns = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, 10, (batch,), generator=g)
        x = 0.5 * patterns[y] + torch.randn(batch, 3, 32, 32, generator=g)
        out.append((x, y))
    return out


# -- train_search.py --------------------------------------------------------------------------
DEFAULTS: dict[str, Any] = dict(
    batchsz=4,  # 64
    lr=0.025,
    lr_min=0.001,
    momentum=0.9,
    wd=3e-4,
    report_freq=10,  # 100
    epochs=50,
    init_ch=4,  # 16
    layers=3,  # 8
    train_portion=0.5,
    arch_lr=3e-4,
    arch_wd=1e-3,
    arch_steps=2,  # 4
    unroll_steps=1,
    num_train=80,  # CIFAR-10's 50000 training images: 10 batches of 4 per half
)


def build(lib: SimpleNamespace, train_iters: int | None = None, engine_config: dict[str, Any] | None = None, **kw):
    """Build the example's engine with ``lib`` (seeded: both libraries get the same weights and data)."""
    args = SimpleNamespace(**{**DEFAULTS, **kw})
    torch.manual_seed(0)
    num_train = args.num_train
    split = int(args.train_portion * num_train)
    n_train = split // args.batchsz
    n_arch = (num_train - split) // args.batchsz
    classifier_loader = cifar_like(1, n_train, args.batchsz)
    arch_loader = cifar_like(2, n_arch, args.batchsz)
    test_queue = cifar_like(3, 2, args.batchsz)
    if train_iters is None:
        train_iters = int(args.epochs * (num_train * args.train_portion // args.batchsz + 1) * args.unroll_steps)

    arch_net = Architecture(steps=args.arch_steps)
    arch_optimizer = optim.Adam(arch_net.parameters(), lr=args.arch_lr, betas=(0.5, 0.999), weight_decay=args.arch_wd)

    criterion = nn.CrossEntropyLoss()
    # multiplier: Network's default 4 equals the example's 4 nodes; with 2 nodes it must be 2 (a cell
    # concatenates its last `multiplier` states, and the two inputs of a reduction cell are not reduced)
    classifier_net = Network(args.init_ch, 10, args.layers, criterion, steps=args.arch_steps, multiplier=args.arch_steps)
    classifier_optimizer = optim.SGD(
        classifier_net.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd
    )
    classifier_scheduler = optim.lr_scheduler.CosineAnnealingLR(
        classifier_optimizer, float(train_iters // args.unroll_steps), eta_min=args.lr_min
    )

    class Arch(lib.ImplicitProblem):
        def training_step(self, batch):
            x, target = batch
            alphas = self.forward()
            loss = self.classifier.module.loss(x, alphas, target)
            return loss

    class Classifier(lib.ImplicitProblem):
        def training_step(self, batch):
            x, target = batch
            alphas = self.arch()
            loss = self.module.loss(x, alphas, target)
            return loss

    class NASEngine(lib.Engine):
        @torch.no_grad()
        def validation(self):
            corrects = 0
            total = 0
            for x, target in test_queue:
                alphas = self.arch()
                _, correct = self.classifier.module.loss(x, alphas, target, acc=True)
                corrects += correct
                total += x.size(0)
            acc = corrects / total
            alphas = self.arch()
            self.genotype = self.classifier.module.genotype(alphas)  # Betty: torch.save(..., "genotype.t7")
            return {"acc": acc}

    outer_config = lib.Config(retain_graph=True)
    inner_config = lib.Config(type="darts", unroll_steps=args.unroll_steps)
    engine_config = lib.EngineConfig(
        valid_step=args.report_freq * args.unroll_steps,
        train_iters=train_iters,
        roll_back=True,
        **(engine_config or {}),
    )
    outer = Arch(
        name="arch", module=arch_net, optimizer=arch_optimizer, train_data_loader=arch_loader, config=outer_config
    )
    inner = Classifier(
        name="classifier",
        module=classifier_net,
        optimizer=classifier_optimizer,
        scheduler=classifier_scheduler,
        train_data_loader=classifier_loader,
        config=inner_config,
    )
    problems = [outer, inner]
    l2u = {inner: [outer]}
    u2l = {outer: [inner]}
    dependencies = {"l2u": l2u, "u2l": u2l}
    return NASEngine(config=engine_config, problems=problems, dependencies=dependencies)
