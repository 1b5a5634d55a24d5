"""Betty's examples/learning_to_reweight (Meta-Weight-Net: main.py, model.py, data.py),
written once against a library namespace ``lib``.

Identical to the example except:

- data (data.py's ``build_dataloader``): CIFAR-10 is not downloaded; a synthetic
  CIFAR-shaped set (3x32x32 float images, 10 classes, already normalized: class prototype
  plus noise) goes through the example's own index logic, seeded: the per-class meta split
  (``num_meta`` 1000 -> 50), the long-tailed subsampling (``imbalanced_factor=10``, from
  ``BASE_PER_CLASS`` images per class instead of 5000) and uniform label corruption
  (``corruption_ratio=0.4``, the example's ``uniform_corruption``). The random-crop/flip
  transforms and ``torch.save`` of the index/label files are removed; the loaders get a
  seeded ``torch.Generator`` (the example's global RNG) and no ``pin_memory``;
- model.py's ``ResNet32`` takes ``num_blocks`` and a base ``width`` (the example's 16,
  giving 16/32/64 channels) and is built with ``num_blocks=[1, 1, 1], width=4``;
  BatchNorm2d is kept;
- argparse is replaced by ``ARGS`` (the example's defaults) with batch_size 100 -> 10;
  ``train_iters`` 15000 -> 20, ``valid_step`` 500 -> 10, the scheduler's milestones
  [10000, 13000] -> [13, 17] (the same fractions of the run, so the LR drops happen);
  ``logger_type="tensorboard"`` -> ``"none"``; ``.to(args.device)`` and CUDA seeding removed;
  the validation's checkpoints go to ``save_dir`` instead of ``cifar10/``;
- ``Outer.training_step``'s accuracy stays a tensor (the example calls ``.item()``, which
  mlocompile's traced step cannot do; Betty only logs the value either way);
- ``from betty.problems import MetaIterativeProblem`` (unused, and absent from Betty 0.2.1)
  is dropped, as is the ``--baseline``/``--retrain`` path (reweight.pt from a previous run).
"""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.functional as functional
import torch.nn.init as init
import torch.optim as optim
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

ARGS = SimpleNamespace(
    device="cpu",
    precision="fp32",
    strategy="default",
    rollback=False,
    seed=1,
    meta_net_hidden_size=100,
    meta_net_num_layers=1,
    lr=0.1,
    momentum=0.9,
    dampening=0.0,
    nesterov=False,
    weight_decay=5e-4,
    meta_lr=1e-5,
    meta_weight_decay=0.0,
    dataset="cifar10",
    num_meta=50,
    imbalanced_factor=10,
    corruption_type="uniform",
    corruption_ratio=0.4,
    batch_size=10,
)
BASE_PER_CLASS = 20  # synthetic images per class before the meta split and subsampling
NUM_CLASSES = 10


# -- model.py (ResNet32 with num_blocks and width as arguments) -----------------------------------
def _weights_init(m):
    if isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d):
        init.kaiming_normal_(m.weight)


class LambdaLayer(nn.Module):
    def __init__(self, lambd):
        super().__init__()
        self.lambd = lambd

    def forward(self, x):
        return self.lambd(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = LambdaLayer(
                lambda x: functional.pad(
                    x[:, :, ::2, ::2],
                    (0, 0, 0, 0, planes // 4, planes // 4),
                    "constant",
                    0,
                )
            )

    def forward(self, x):
        out = functional.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = functional.relu(out)
        return out


class ResNet32(nn.Module):
    def __init__(self, num_classes=10, block=BasicBlock, num_blocks=(5, 5, 5), width=16):
        super().__init__()
        self.in_planes = width

        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 2 * width, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, num_blocks[2], stride=2)
        self.output = nn.Linear(4 * width, num_classes)

        self.apply(_weights_init)

    def _make_layer(self, block, planes, num_blocks, stride):
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for stride in strides:
            layers.append(block(self.in_planes, planes, stride))
            self.in_planes = planes * block.expansion

        return nn.Sequential(*layers)

    def forward(self, x):
        out = functional.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = functional.avg_pool2d(out, out.size()[3])
        out = out.view(out.size(0), -1)
        out = self.output(out)
        return out


class HiddenLayer(nn.Module):
    def __init__(self, input_size, output_size):
        super().__init__()
        self.fc = nn.Linear(input_size, output_size)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.fc(x))


class MLP(nn.Module):
    def __init__(self, hidden_size=500, num_layers=1):
        super().__init__()
        self.first_hidden_layer = HiddenLayer(1, hidden_size)
        self.rest_hidden_layers = nn.Sequential(*[HiddenLayer(hidden_size, hidden_size) for _ in range(num_layers - 1)])
        self.output_layer = nn.Linear(hidden_size, 1)

    def forward(self, x):
        x = self.first_hidden_layer(x)
        x = self.rest_hidden_layers(x)
        x = self.output_layer(x)
        return torch.sigmoid(x)


# -- data.py on synthetic CIFAR-shaped images ------------------------------------------------------
def uniform_corruption(corruption_ratio, num_classes):
    eye = np.eye(num_classes)
    noise = np.full((num_classes, num_classes), 1 / num_classes)
    corruption_matrix = eye * (1 - corruption_ratio) + noise * corruption_ratio
    return corruption_matrix


def synthetic_cifar(n_per_class: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(NUM_CLASSES, 3, 32, 32, generator=torch.Generator().manual_seed(1000))
    targets = [c for c in range(NUM_CLASSES) for _ in range(n_per_class)]
    data = prototypes[targets] + 2.0 * torch.randn(len(targets), 3, 32, 32, generator=g)
    perm = torch.randperm(len(targets), generator=g)  # CIFAR's classes come interleaved
    return data[perm].to(torch.get_default_dtype()), [targets[i] for i in perm.tolist()]


def build_dataloader(
    seed=1, num_meta_total=1000, imbalanced_factor=None, corruption_type=None, corruption_ratio=0.0, batch_size=100
):
    np.random.seed(seed)
    train_data, train_targets = synthetic_cifar(BASE_PER_CLASS, seed)
    test_data, test_targets = synthetic_cifar(2, seed + 1)

    num_classes = NUM_CLASSES
    num_meta = int(num_meta_total / num_classes)

    index_to_meta = []
    index_to_train = []

    if imbalanced_factor is not None:
        imbalanced_num_list = []
        sample_num = int((len(train_targets) - num_meta_total) / num_classes)
        for class_index in range(num_classes):
            imbalanced_num = sample_num / (imbalanced_factor ** (class_index / (num_classes - 1)))
            imbalanced_num_list.append(int(imbalanced_num))
        np.random.shuffle(imbalanced_num_list)
    else:
        imbalanced_num_list = None

    for class_index in range(num_classes):
        index_to_class = [index for index, label in enumerate(train_targets) if label == class_index]
        np.random.shuffle(index_to_class)
        index_to_meta.extend(index_to_class[:num_meta])
        index_to_class_for_train = index_to_class[num_meta:]

        if imbalanced_num_list is not None:
            index_to_class_for_train = index_to_class_for_train[: imbalanced_num_list[class_index]]

        index_to_train.extend(index_to_class_for_train)

    meta_targets = list(np.array(train_targets)[index_to_meta])
    meta_data = copy.deepcopy(train_data)[index_to_meta]
    train_data = train_data[index_to_train]
    train_targets = list(np.array(train_targets)[index_to_train])

    if corruption_type is not None:
        corruption_matrix = {"uniform": uniform_corruption}[corruption_type](corruption_ratio, num_classes)
        for index in range(len(train_targets)):
            p = corruption_matrix[train_targets[index]]
            train_targets[index] = np.random.choice(num_classes, p=p)

    def dataset(data, targets):
        return TensorDataset(data, torch.tensor(np.array(targets), dtype=torch.long))

    train_dataset = dataset(train_data, train_targets)
    meta_dataset = dataset(meta_data, meta_targets)
    test_dataset = dataset(test_data, test_targets)
    train_sampler = RandomSampler(train_dataset, generator=torch.Generator().manual_seed(seed))
    train_dataloader = DataLoader(
        train_dataset, batch_size=batch_size, sampler=train_sampler, generator=torch.Generator().manual_seed(seed + 10)
    )
    meta_dataloader = DataLoader(
        meta_dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed + 20)
    )
    test_dataloader = DataLoader(test_dataset, batch_size=batch_size)

    return train_dataloader, meta_dataloader, test_dataloader, imbalanced_num_list


def set_seed(seed=1):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- main.py ---------------------------------------------------------------------------------------
def build(
    lib: SimpleNamespace,
    inner_type: str = "darts",
    train_iters: int = 20,
    save_dir: str | None = None,
    num_blocks: tuple[int, int, int] = (1, 1, 1),
    width: int = 4,
    rollback: bool = False,
) -> Any:
    """The example's program under ``lib``; returns the Engine (not yet run). ``rollback``: ``--rollback``."""
    args = SimpleNamespace(**{**vars(ARGS), "rollback": rollback})
    set_seed(args.seed)

    (
        train_dataloader,
        meta_dataloader,
        test_dataloader,
        imbalanced_num_list,
    ) = build_dataloader(
        seed=args.seed,
        num_meta_total=args.num_meta,
        imbalanced_factor=args.imbalanced_factor,
        corruption_type=args.corruption_type,
        corruption_ratio=args.corruption_ratio,
        batch_size=args.batch_size,
    )

    class Outer(lib.ImplicitProblem):
        def forward(self, x):
            return self.module(x)

        def training_step(self, batch):
            inputs, labels = batch
            outputs = self.inner(inputs)
            loss = F.cross_entropy(outputs, labels.long())
            acc = (outputs.argmax(dim=1) == labels.long()).float().mean() * 100

            return {"loss": loss, "acc": acc}

        def configure_train_data_loader(self):
            return meta_dataloader

        def configure_module(self):
            meta_net = MLP(hidden_size=args.meta_net_hidden_size, num_layers=args.meta_net_num_layers)
            return meta_net

        def configure_optimizer(self):
            meta_optimizer = optim.Adam(
                self.module.parameters(),
                lr=args.meta_lr,
                weight_decay=args.meta_weight_decay,
            )
            return meta_optimizer

    class Inner(lib.ImplicitProblem):
        def forward(self, x):
            return self.module(x)

        def training_step(self, batch):
            inputs, labels = batch
            outputs = self.forward(inputs)
            loss_vector = F.cross_entropy(outputs, labels.long(), reduction="none")
            loss_vector_reshape = torch.reshape(loss_vector, (-1, 1))
            weight = self.outer(loss_vector_reshape.detach())
            loss = torch.mean(weight * loss_vector_reshape)

            return loss

        def configure_train_data_loader(self):
            return train_dataloader

        def configure_module(self):
            return ResNet32(args.dataset == "cifar10" and 10 or 100, num_blocks=num_blocks, width=width)

        def configure_optimizer(self):
            optimizer = optim.SGD(
                self.module.parameters(),
                lr=args.lr,
                momentum=args.momentum,
                dampening=args.dampening,
                weight_decay=args.weight_decay,
                nesterov=args.nesterov,
            )
            return optimizer

        def configure_scheduler(self):
            scheduler = optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=[13, 17], gamma=0.1)
            return scheduler

    best = {"acc": -1.0}

    class ReweightingEngine(lib.Engine):
        @torch.no_grad()
        def validation(self):
            correct = 0
            total = 0
            for x, target in test_dataloader:
                with torch.no_grad():
                    out = self.inner(x)
                correct += (out.argmax(dim=1) == target).sum().item()
                total += x.size(0)
            acc = correct / total * 100
            if best["acc"] < acc:
                best["acc"] = acc
            if save_dir is not None:
                torch.save(self.inner.state_dict(), f"{save_dir}/net_{self.global_step}.pt")
                torch.save(self.outer.state_dict(), f"{save_dir}/meta_net_{self.global_step}.pt")
            return {"acc": acc, "best_acc": best["acc"]}

    outer_config = lib.Config(type="darts", precision=args.precision, log_step=100, retain_graph=True)
    inner_config = lib.Config(type=inner_type, precision=args.precision, unroll_steps=1)
    engine_config = lib.EngineConfig(
        **{
            "train_iters": train_iters,
            "valid_step": 10,
            "strategy": args.strategy,
            "roll_back": args.rollback,
            "logger_type": "none",
            **lib.engine_kwargs,  # Betty: strategy="cpu" (no CUDA moves)
        }
    )
    outer = Outer(name="outer", config=outer_config)
    inner = Inner(name="inner", config=inner_config)

    problems = [outer, inner]
    u2l = {outer: [inner]}
    l2u = {inner: [outer]}
    dependencies = {"l2u": l2u, "u2l": u2l}

    engine = ReweightingEngine(config=engine_config, problems=problems, dependencies=dependencies)
    engine.best = best
    return engine
