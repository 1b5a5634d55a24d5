"""Betty's learning-by-ignoring example (examples/learning_by_ignoring), ported against ``lib``.

Follows Betty's ``main.py`` (the three problems Pretraining / Finetuning / Reweighting with
their ``configure_*`` hooks and ``param_groups``, configs, dependencies, ``LBIEngine``),
``model/resnet.py`` (``build_model``, ``build_optimizer``) and ``utils/utils.py``
(``set_random_seed``). torchvision is not installed, so ``resnet18`` is written out below
with torchvision's layout (7x7/2 stem, 3x3/2 max-pool, four stages of two BasicBlocks,
global average pool, ``fc``) and torchvision's initialisation, at widths 4-8-16-32
instead of 64-128-256-512, randomly initialised (Betty: ``pretrained=True``, ImageNet
weights). Removed: argparse (defaults in :data:`DEFAULTS`), OfficeHome download and
transforms (synthetic 3x224x224 images, 65 classes, (image, label, index) batches; the
source domain has a share of wrong labels for the reweighting to ignore), ``num_workers``
/ ``pin_memory``, the ``.to(device)`` moves, the final prints. The loaders keep
``shuffle=True`` (with their own seeded ``torch.Generator``) and ``drop_last``.
Shrunk: batch 64 -> 4, ``valid_step`` 20 -> 10, 24 images per split.

``param_groups``: Betty rebuilds each optimizer as ``type(opt)(self.param_groups(),
**opt.defaults)``; without the hook it would flatten ``build_optimizer``'s two groups into
one at Adam's default lr. The example's hook returns the groups ``build_optimizer`` already
made, so the rebuilt optimizer equals the one given.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.utils.data import DataLoader, Dataset


# -- torchvision's resnet18, narrow ---------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), widths=(4, 8, 16, 32), num_classes=1000):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * BasicBlock.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(pretrained=False):
    assert not pretrained, "no downloads: randomly initialised"
    return ResNet()


# -- model/resnet.py -------------------------------------------------------------------------------
def build_model(num_classes):
    model = resnet18(pretrained=False)  # Betty: pretrained=True
    num_ftrs = model.fc.in_features
    model.fc = nn.Linear(num_ftrs, num_classes)
    nn.init.xavier_uniform_(model.fc.weight, 0.1)
    nn.init.constant_(model.fc.bias, 0.0)
    return model


def build_optimizer(model, args, betas=None, weight_decay=None, lrs=None):
    wd = weight_decay if weight_decay is not None else args.weight_decay
    b = betas if betas is not None else (0.9, 0.999)
    lr1 = lrs[0] if lrs is not None else args.features_lr
    lr2 = lrs[1] if lrs is not None else args.classifier_lr
    optimizer = optim.Adam(
        [
            {"params": [param for name, param in model.named_parameters() if "fc" not in name], "lr": lr1},
            {"params": model.fc.parameters(), "lr": lr2},
        ],
        weight_decay=wd,
        betas=b,
    )
    return optimizer


# -- synthetic OfficeHome (Cl -> Ar) ---------------------------------------------------------------
class DomainImages(Dataset):
    """(image, label, index) at OfficeHome's 3x224x224 and 65 classes: a class pattern shared by both
    domains, a per-domain shift, noise; ``corrupt`` of the labels replaced by random ones."""

    num_classes = 65

    def __init__(self, n, seed, domain, corrupt=0.0):
        g = torch.Generator().manual_seed(seed)
        patterns = torch.randn(self.num_classes, 3, 28, 28, generator=torch.Generator().manual_seed(7))
        shift = torch.randn(3, 1, 1, generator=torch.Generator().manual_seed(100 + domain))
        self.labels = torch.randint(0, self.num_classes, (n,), generator=g)
        clean = F.interpolate(patterns[self.labels], size=224, mode="nearest")
        self.images = clean + 0.5 * shift + torch.randn(n, 3, 224, 224, generator=g)
        flip = torch.rand(n, generator=g) < corrupt
        self.labels = torch.where(flip, torch.randint(0, self.num_classes, (n,), generator=g), self.labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):
        return self.images[idx], self.labels[idx], idx


DEFAULTS: dict[str, Any] = dict(
    features_lr=1e-4,
    classifier_lr=1e-3,
    batch_size=4,  # 64
    weight_decay=5e-4,
    random_seed=0,
    lam=7e-3,
    gamma=0.1,
    step_size=400,
    baseline=False,
    valid_step=10,  # 20
    n_images=24,
)


def set_random_seed(seed=0):
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build(lib: SimpleNamespace, train_iters: int = 1000, engine_config: dict[str, Any] | None = None, **kw):
    args = SimpleNamespace(**{**DEFAULTS, **kw})
    set_random_seed(args.random_seed)

    n = args.n_images
    train_source_dataset = DomainImages(n, seed=1, domain=0, corrupt=0.5)
    train_target_dataset = DomainImages(n, seed=2, domain=1)
    valid_target_dataset = train_target_dataset  # Betty: the same images under the test transform
    test_target_dataset = DomainImages(8, seed=3, domain=1)

    def loader(ds, seed, shuffle, drop_last):
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(ds, batch_size=args.batch_size, shuffle=shuffle, drop_last=drop_last, generator=gen)

    train_loader = loader(train_target_dataset, 11, True, False)
    valid_loader = loader(valid_target_dataset, 12, True, False)
    test_loader = loader(test_target_dataset, 13, False, False)
    train_source_loader = loader(train_source_dataset, 14, True, True)

    def param_groups(self):
        return [
            {"params": [param for name, param in self.module.named_parameters() if "fc" not in name], "lr": args.features_lr},
            {"params": self.module.fc.parameters(), "lr": args.classifier_lr},
        ]

    class Pretraining(lib.ImplicitProblem):
        def forward(self, x):
            return self.module(x)

        def training_step(self, batch):
            inputs, targets, _ = batch
            outs = self.module(inputs)
            loss_raw = F.cross_entropy(outs, targets, reduction="none")
            if args.baseline:
                loss = torch.mean(loss_raw)
            else:
                logit = self.reweight(inputs)
                weight = torch.sigmoid(logit)
                loss = torch.mean(loss_raw * weight)
            return loss

        def configure_train_data_loader(self):
            return train_source_loader

        def configure_module(self):
            return build_model(num_classes=train_source_dataset.num_classes)

        def configure_optimizer(self):
            return build_optimizer(self.module, args)

        def configure_scheduler(self):
            return optim.lr_scheduler.StepLR(self.optimizer, step_size=args.step_size, gamma=args.gamma)

    class Finetuning(lib.ImplicitProblem):
        def forward(self, x):
            return self.module(x)

        def training_step(self, batch):
            inputs, targets, _ = batch
            outs = self(inputs)
            ce_loss = F.cross_entropy(outs, targets, reduction="none")
            ce_loss = torch.mean(ce_loss)
            reg_loss = self.reg_loss()
            return ce_loss + reg_loss

        def reg_loss(self):
            loss = 0
            for (n1, p1), (n2, p2) in zip(self.module.named_parameters(), self.pretrain.module.named_parameters()):  # noqa: B007
                lam = 0 if "fc" in n1 else args.lam
                loss = loss + lam * (p1 - p2).pow(2).sum()
            return loss

        def configure_train_data_loader(self):
            return train_loader

        def configure_module(self):
            return build_model(num_classes=test_target_dataset.num_classes)

        def configure_optimizer(self):
            return build_optimizer(self.module, args)

        def configure_scheduler(self):
            return optim.lr_scheduler.StepLR(self.optimizer, step_size=args.step_size, gamma=args.gamma)

    class Reweighting(lib.ImplicitProblem):
        def forward(self, x):
            out = self.module(x).squeeze()
            return out

        def training_step(self, batch):
            inputs, targets, _ = batch
            outs = self.finetune(inputs)
            loss = F.cross_entropy(outs, targets)
            reg_loss = self.reg_loss()
            return loss + reg_loss

        def reg_loss(self):
            loss = 0
            for (n1, p1), (n2, p2) in zip(  # noqa: B007 (as in the example)
                self.finetune.module.named_parameters(), self.pretrain.module.named_parameters()
            ):
                lam = 0 if "fc" in n1 else args.lam
                loss = loss + lam * (p1 - p2).pow(2).sum()
            return loss

        def configure_train_data_loader(self):
            return valid_loader

        def configure_module(self):
            return build_model(num_classes=1)

        def configure_optimizer(self):
            return build_optimizer(self.module, args)

        def configure_scheduler(self):
            return optim.lr_scheduler.StepLR(self.optimizer, step_size=args.step_size, gamma=args.gamma)

    for cls in (Pretraining, Finetuning, Reweighting):
        cls.param_groups = param_groups

    best_acc = [-1.0]

    class LBIEngine(lib.Engine):
        @torch.no_grad()
        def validation(self):
            correct = 0
            loss = 0
            total = 0
            for batch in test_loader:
                inputs = batch[0]
                targets = batch[1]
                outputs = self.finetune(inputs)
                loss += F.cross_entropy(outputs, targets, reduction="sum")
                correct += (outputs.argmax(dim=1) == targets).float().sum().item()
                total += inputs.size(0)
            acc = correct / total
            avgloss = loss / total
            if best_acc[0] < acc:
                best_acc[0] = acc
            return {"loss": avgloss, "acc": acc, "best_acc": best_acc[0]}

    reweight_config = lib.Config(type="darts", retain_graph=True)
    finetune_config = lib.Config(type="darts", unroll_steps=1, allow_unused=False)
    pretrain_config = lib.Config(type="darts", unroll_steps=1, allow_unused=False)
    engine_config = lib.EngineConfig(
        **{"valid_step": args.valid_step, "train_iters": train_iters, "roll_back": False, **(engine_config or {})}
    )

    # the modules come from the configure_module hooks, called when the Engine initialises the
    # problems; both libraries call them in this order (the test checks equal initial weights)
    reweight = Reweighting(name="reweight", config=reweight_config)
    finetune = Finetuning(name="finetune", config=finetune_config)
    pretrain = Pretraining(name="pretrain", config=pretrain_config)
    if args.baseline:
        problems = [finetune, pretrain]
    else:
        problems = [reweight, finetune, pretrain]
    if args.baseline:
        l2u = {pretrain: [finetune]}
        u2l = {}
    else:
        u2l = {reweight: [pretrain]}
        l2u = {pretrain: [finetune, reweight], finetune: [reweight]}
    dependencies = {"u2l": u2l, "l2u": l2u}
    return LBIEngine(config=engine_config, problems=problems, dependencies=dependencies)
