"""Betty's ``examples/saliency_aware_nas_4_level`` (SANAS), ported: one program, two libraries.

Follows Betty's ``train_search_sanas.py`` with ``--darts_type DARTS`` (``model_search.py``,
``operations.py``, ``genotypes.py``; ``utils.accuracy`` is imported by ``model_search.py``
but never called, so it is not copied). The program: ``outer`` holds the architecture
(alpha_normal, alpha_reduce; Adam), ``inner1`` trains a search network on clean images,
``inner2`` trains a second search network on saliency-reweighted images ``x * delta``,
where ``delta`` is a 7-step PGD perturbation against ``inner1``'s network; ``outer`` is
judged on both networks' validation loss. ``l2u = {inner1: [inner2, outer], inner2:
[outer]}``, ``u2l = {outer: [inner2, inner1]}``; darts on both lowers, ``roll_back=True``,
``first_order=True`` on the outer.

Shrunk: CIFAR-100 is replaced by seeded synthetic images of CIFAR's per-sample shape
layout at ``image`` x ``image`` pixels (3 channels, values in [0, 1], 100 classes), the
search network by ``init_ch`` channels, ``layers`` cells and ``arch_steps`` nodes per cell,
the batch by ``batchsz``; ``train_iters`` (and so the cosine schedules' ``T_max``) by the
test's step count.

Removed from the original (nothing else): argparse (its defaults are the module constants
below), logging and the per-step ``print(... loss.item())`` with the ``epoch`` it prints,
``assert not math.isnan(loss)`` (a Python read of a tensor value: mlocompile's
``check_finite`` raises ``NonFiniteError`` instead, Betty would run on), the CIFAR download
and transforms, ``.to(device)`` moves, ``pin_memory``/``num_workers``, and
``torch.save(genotype)`` in ``validation`` (it returns the accuracy and genotype instead).
Each ``SubsetRandomSampler`` gets its own seeded ``torch.Generator`` so both libraries see
the same batches whatever else draws from the global generator.

The attack: Betty's original makes ``x_purt`` require grad and calls
``torch.autograd.grad``; mlocompile refuses that inside a ``training_step`` (its losses run
under torch.func) and shows the rewrite, which ``attack="func"`` selects: the same seven
steps with the gradient taken by ``torch.func.grad`` of the same loss. ``build(lib,
attack="autograd")`` is Betty's code verbatim.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import optim

# -- genotypes.py, operations.py: the same files as the DARTS example's (tests/betty_ports/darts.py) --
from .darts import OPS, PRIMITIVES, DilConv, FactorizedReduce, Genotype, Identity, ReLUConvBN, SepConv, Zero  # noqa: E402, F401


# -- model_search.py -------------------------------------------------------------------------
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
        alpha_normal, alpha_reduce = alphas
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
        alpha_normal, alpha_reduce = alphas

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
        return self.alpha_normal, self.alpha_reduce


# -- train_search_sanas.py (argparse defaults, shrunk where the module docstring says) -------
ARGS = SimpleNamespace(
    batchsz=2,  # 192
    lr=0.1,
    lr_min=0.0,
    momentum=0.9,
    wd=3e-4,
    init_ch=4,  # 16
    layers=2,  # 8
    train_portion=0.5,
    arch_lr=6e-4,
    arch_wd=1e-3,
    arch_steps=2,  # 4
    unroll_steps=1,
    lam=1.0,
    gamma=1.0,
)
CIFAR_CLASS = 100
rand = True
num_steps = 7
epsilon = 8 / 255.0
step_size = 2 / 255.0


def attack_autograd(self, alphas, x, target):
    """Betty's ``Inner2.attack``, verbatim (commented-out lines dropped)."""
    x_purt = x.clone().detach()
    target = target.clone().detach()
    if rand:
        x_purt = x_purt + torch.zeros_like(x_purt).uniform_(-epsilon, epsilon)
    for i in range(num_steps):  # noqa: B007 - Betty's loop, verbatim
        x_purt.requires_grad_()
        with torch.enable_grad():
            logits = self.inner1.module(x_purt, alphas)
            loss1 = F.cross_entropy(logits, target, reduction="none")
            loss1 = torch.mean(loss1)
        grad = torch.autograd.grad(loss1, [x_purt])[0]

        x_purt = x_purt.detach() + step_size * torch.sign(grad.detach())
        delta = torch.clamp(x_purt - x, min=-epsilon, max=epsilon)
        x_purt = torch.clamp(x + delta, min=0, max=1).detach()
    pert_inp = torch.mul(x, delta)
    return pert_inp


def attack_func(self, alphas, x, target):
    """The attack with the rewrite mlocompile's ProgramError shows: the attack loss's gradient by
    ``torch.func.grad`` instead of ``requires_grad_()`` + ``torch.autograd.grad``.

    As the message writes it, that rewrite fails on this network, in plain PyTorch too: its
    train-mode BatchNorm layers update their running statistics (``num_batches_tracked.add_``,
    the running mean and variance) in place, and a function under ``torch.func.grad`` may not
    mutate a tensor it captured. ``attack_func_buffers`` is the rewrite that runs."""
    x_purt = x.clone().detach()
    target = target.clone().detach()
    if rand:
        x_purt = x_purt + torch.zeros_like(x_purt).uniform_(-epsilon, epsilon)
    for i in range(num_steps):  # noqa: B007 - Betty's loop, verbatim

        def attack_loss(d, x_purt=x_purt):
            logits = self.inner1.module(x_purt + d, alphas)
            loss1 = F.cross_entropy(logits, target, reduction="none")
            return torch.mean(loss1)

        grad = torch.func.grad(attack_loss)(torch.zeros_like(x_purt))

        x_purt = x_purt.detach() + step_size * torch.sign(grad.detach())
        delta = torch.clamp(x_purt - x, min=-epsilon, max=epsilon)
        x_purt = torch.clamp(x + delta, min=0, max=1).detach()
    pert_inp = torch.mul(x, delta)
    return pert_inp


def attack_func_buffers(self, alphas, x, target):
    """``attack_func`` with the network run on copies of its buffers (``torch.func.functional_call``),
    made inside the transformed function, so BatchNorm's in-place updates touch only those copies.

    The parameters see the same computation as Betty's autograd attack (train-mode BatchNorm
    normalizes with batch statistics; the running statistics are never read in train mode).
    What differs is buffers only: Betty's 7 attack forwards advance ``inner1``'s running
    statistics, here they are dropped."""
    x_purt = x.clone().detach()
    target = target.clone().detach()
    if rand:
        x_purt = x_purt + torch.zeros_like(x_purt).uniform_(-epsilon, epsilon)
    net = self.inner1.module
    for i in range(num_steps):  # noqa: B007 - Betty's loop, verbatim

        def attack_loss(d, x_purt=x_purt):
            buffers = {k: b.clone() for k, b in net.named_buffers()}
            logits = torch.func.functional_call(net, buffers, (x_purt + d, alphas), strict=False)
            loss1 = F.cross_entropy(logits, target, reduction="none")
            return torch.mean(loss1)

        grad = torch.func.grad(attack_loss)(torch.zeros_like(x_purt))

        x_purt = x_purt.detach() + step_size * torch.sign(grad.detach())
        delta = torch.clamp(x_purt - x, min=-epsilon, max=epsilon)
        x_purt = torch.clamp(x + delta, min=0, max=1).detach()
    pert_inp = torch.mul(x, delta)
    return pert_inp


ATTACKS = {"autograd": attack_autograd, "func": attack_func, "func_buffers": attack_func_buffers}


def make_classes(lib: SimpleNamespace, attack_impl: str, data: dict[str, Any]) -> dict[str, type]:
    """The example's problem and engine classes on top of ``lib``'s ``ImplicitProblem``/``Engine``."""
    args = ARGS
    train_iters = data["train_iters"]

    class Outer(lib.ImplicitProblem):
        def forward(self):
            return self.module()

        def training_step(self, batch):
            x, target = batch
            alphas = self.forward()
            loss1 = self.inner1.module.loss(x, alphas, target)
            loss2 = self.inner2.module.loss(x, alphas, target)
            loss = loss2 + args.lam * loss1
            return loss

        def configure_train_data_loader(self):
            return data["loader"](data["valid_indices"], data["seeds"]["outer"])

        def configure_module(self):
            return data["modules"]["outer"]

        def configure_optimizer(self):
            return optim.Adam(self.module.parameters(), lr=args.arch_lr, betas=(0.5, 0.999), weight_decay=args.arch_wd)

    class Inner2(lib.ImplicitProblem):
        def forward(self, pert_inp, alphas):
            return self.module(pert_inp, alphas)

        def training_step(self, batch):
            x, target = batch
            alphas = self.outer()
            pert_inp = self.attack(alphas, x, target)
            loss1 = self.inner1.module.loss(pert_inp, alphas, target)
            loss2 = self.module.loss(pert_inp, alphas, target)
            loss = loss2 + args.gamma * loss1
            return loss

        attack = ATTACKS[attack_impl]

        def configure_train_data_loader(self):
            return data["loader"](data["train_indices"], data["seeds"]["inner2"])

        def configure_module(self):
            return data["modules"]["inner2"]

        def configure_optimizer(self):
            return optim.SGD(self.module.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)

        def configure_scheduler(self):
            return optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, float(train_iters // args.unroll_steps), eta_min=args.lr_min
            )

    class Inner1(lib.ImplicitProblem):
        def forward(self, x, alphas):
            return self.module(x, alphas)

        def training_step(self, batch):
            x, target = batch
            alphas = self.outer()
            loss = self.module.loss(x, alphas, target)
            return loss

        def configure_train_data_loader(self):
            return data["loader"](data["train_indices"], data["seeds"]["inner1"])

        def configure_module(self):
            return data["modules"]["inner1"]

        def configure_optimizer(self):
            return optim.SGD(self.module.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)

        def configure_scheduler(self):
            return optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, float(train_iters // args.unroll_steps), eta_min=args.lr_min
            )

    class NASEngine(lib.Engine):
        @torch.no_grad()
        def validation(self):
            corrects = 0
            total = 0
            for x, target in data["test_queue"]:
                alphas = self.outer()
                _, correct = self.inner1.module.loss(x, alphas, target, acc=True)
                corrects += correct
                total += x.size(0)
            acc = corrects / total
            alphas = self.outer()
            self.genotype = self.inner1.module.genotype(alphas)
            return {"acc": acc}

    return {"Outer": Outer, "Inner1": Inner1, "Inner2": Inner2, "NASEngine": NASEngine}


def make_data(
    seed: int = 0,
    image: int = 16,
    num_train: int = 16,
    num_test: int = 4,
    train_iters: int = 20,
    layers: int | None = None,
) -> dict[str, Any]:
    """Seeded synthetic CIFAR-100-shaped data and the three modules' initial weights (deep-copied per build)."""
    args = ARGS
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(num_train, 3, image, image, generator=g, dtype=torch.get_default_dtype())
    labels = torch.randint(0, CIFAR_CLASS, (num_train,), generator=g)
    test_images = torch.rand(num_test, 3, image, image, generator=g, dtype=torch.get_default_dtype())
    test_labels = torch.randint(0, CIFAR_CLASS, (num_test,), generator=g)
    train_data = torch.utils.data.TensorDataset(images, labels)
    indices = list(range(num_train))
    split = int(args.train_portion * num_train)
    torch.manual_seed(seed)
    n_layers = args.layers if layers is None else layers
    criterion = nn.CrossEntropyLoss()
    modules = {
        "outer": Architecture(steps=args.arch_steps),
        # multiplier: the original's default 4 concatenates its 4 nodes; with 2 nodes it must be 2
        "inner1": Network(
            args.init_ch, CIFAR_CLASS, n_layers, criterion, steps=args.arch_steps, multiplier=args.arch_steps
        ),
        "inner2": Network(
            args.init_ch, CIFAR_CLASS, n_layers, criterion, steps=args.arch_steps, multiplier=args.arch_steps
        ),
    }

    def loader(idx: list[int], loader_seed: int) -> torch.utils.data.DataLoader:
        sampler = torch.utils.data.sampler.SubsetRandomSampler(idx, generator=torch.Generator().manual_seed(loader_seed))
        return torch.utils.data.DataLoader(train_data, batch_size=args.batchsz, sampler=sampler)

    return {
        "modules": modules,
        "loader": loader,
        "train_indices": indices[:split],
        "valid_indices": indices[split:],
        "seeds": {"outer": seed + 1, "inner1": seed + 2, "inner2": seed + 3},
        "test_queue": torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(test_images, test_labels), batch_size=args.batchsz, shuffle=False
        ),
        "train_iters": train_iters,
        "rng_seed": seed + 100,
    }


def build(lib: SimpleNamespace, data: dict[str, Any], attack: str = "autograd") -> Any:
    """The example's engine under ``lib``, on deep copies of ``data``'s modules (``data`` stays untouched)."""
    args = ARGS
    data = {**data, "modules": copy.deepcopy(data["modules"])}
    classes = make_classes(lib, attack, data)
    Config, EngineConfig = lib.Config, lib.EngineConfig
    outer_config = Config(retain_graph=True, first_order=True, log_step=1)
    inner2_config = Config(type="darts", unroll_steps=args.unroll_steps, allow_unused=True)
    inner1_config = Config(type="darts", unroll_steps=args.unroll_steps, allow_unused=True)
    engine_config = EngineConfig(
        valid_step=10**9,  # report_freq: one epoch of CIFAR, beyond the 20 steps
        train_iters=data["train_iters"],
        roll_back=True,
        **getattr(lib, "engine_kwargs", {}),
    )
    outer = classes["Outer"](name="outer", config=outer_config)
    inner1 = classes["Inner1"](name="inner1", config=inner1_config)
    inner2 = classes["Inner2"](name="inner2", config=inner2_config)
    problems = [outer, inner2, inner1]
    l2u = {inner1: [inner2, outer], inner2: [outer]}
    u2l = {outer: [inner2, inner1]}
    dependencies = {"l2u": l2u, "u2l": u2l}
    torch.manual_seed(data["rng_seed"])  # the attack's uniform_ start draws from the global generator
    return classes["NASEngine"](config=engine_config, problems=problems, dependencies=dependencies)
