"""Betty's examples/implicit_maml (main.py, models.py), written once against a library namespace ``lib``.

Identical to the example except:

- data: learn2learn's Omniglot task sets are replaced by ``SyntheticTaskset``, a seeded
  sampler with learn2learn's ``sample()`` layout: ``ways`` classes drawn from a pool of
  synthetic 1x28x28 "characters" (prototype plus noise), ``2 * shots`` images each, labels
  0..ways-1 in consecutive order (what ``split_data`` expects); no download;
- models.py's ``ConvOmniglot``/``ConvModel`` (4 conv blocks with BatchNorm2d(momentum=1,
  track_running_stats=False)) with ``hidden_size`` 64 -> 8; the mini-ImageNet, ResNet12 and
  WRN options (and the DropBlock code they use) are not ported;
- argparse is replaced by ``ARGS`` (the example's defaults: 5 ways, 5 shots, reg 0.5,
  meta_lr 5e-4, base_lr 0.1) with ``inner_steps`` 5 -> 2 and ``meta_batch_size`` 16 -> 2;
  ``train_iters`` = 20 steps; the scheduler's ``T_max`` (the run's number of outer steps,
  ``meta_batch_size * 7500``) is the shrunk run's 10; ``valid_step`` 10 and 2 validation
  tasks instead of 500; ``parent_config.log_step`` as the example's formula (40: never
  reached); CUDA seeding removed;
- the child's ``cg_iterations=3`` -> ``child_iterations`` (1 by default: Betty's CG is
  wrong beyond one iteration); ``child_type="darts"`` is the example's commented alternative;
- ``Outer.training_step``'s accuracy stays a tensor (the example calls ``.item()``, which
  mlocompile's traced step cannot do; Betty only logs the value either way);
- the parent optimizer is ``lib.AdamW``: torch.optim.AdamW for mlocompile; for Betty a
  subclass that accepts the ``decoupled_weight_decay`` key, because Betty rebuilds every
  optimizer as ``cls(params, **optimizer.defaults)`` and torch 2.x's AdamW puts
  ``decoupled_weight_decay`` in its defaults but refuses it as an argument (TypeError).
"""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

ARGS = SimpleNamespace(
    task="omniglot",
    ways=5,
    shots=5,
    inner_steps=2,
    meta_batch_size=2,
    task_num=-1,
    seed=1,
    hidden_size=8,
    reg=0.5,
    meta_lr=5e-4,
    base_lr=1e-1,
    model_type="cnn",
)
POOL_CLASSES = 20


# -- models.py (ConvOmniglot) ----------------------------------------------------------------------
def conv_block(in_channels, out_channels, **kwargs):
    return nn.Sequential(
        OrderedDict(
            [
                ("conv", nn.Conv2d(in_channels, out_channels, **kwargs)),
                (
                    "norm",
                    nn.BatchNorm2d(out_channels, momentum=1.0, track_running_stats=False),
                ),
                ("relu", nn.ReLU()),
                ("pool", nn.MaxPool2d(2)),
            ]
        )
    )


class ConvModel(nn.Module):
    """4-layer Convolutional Neural Network architecture from Finn et al. (2017), as in the example."""

    def __init__(self, in_channels, out_features, hidden_size=64, feature_size=64):
        super().__init__()
        self.in_channels = in_channels
        self.out_features = out_features
        self.hidden_size = hidden_size
        self.feature_size = feature_size

        conv = {"kernel_size": 3, "stride": 1, "padding": 1, "bias": True}
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("layer1", conv_block(in_channels, hidden_size, **conv)),
                    ("layer2", conv_block(hidden_size, hidden_size, **conv)),
                    ("layer3", conv_block(hidden_size, hidden_size, **conv)),
                    ("layer4", conv_block(hidden_size, hidden_size, **conv)),
                ]
            )
        )
        self.classifier = nn.Linear(feature_size, out_features, bias=True)

    def forward(self, inputs):
        features = self.features(inputs)
        features = features.view((features.size(0), -1))
        logits = self.classifier(features)
        return logits


def ConvOmniglot(out_features, hidden_size=64):
    return ConvModel(1, out_features, hidden_size=hidden_size, feature_size=hidden_size)


# -- the task sampler (learn2learn's get_tasksets, synthetic) --------------------------------------
class SyntheticTaskset:
    """``sample()`` -> (data [ways * samples, 1, 28, 28], labels 0..ways-1, consecutive), seeded."""

    def __init__(self, ways: int, samples: int, seed: int) -> None:
        self.ways, self.samples = ways, samples
        self.gen = torch.Generator().manual_seed(seed)
        self.prototypes = torch.randn(POOL_CLASSES, 1, 28, 28, generator=torch.Generator().manual_seed(seed + 100))

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        classes = torch.randperm(POOL_CLASSES, generator=self.gen)[: self.ways]
        data = self.prototypes[classes].repeat_interleave(self.samples, dim=0)
        data = data + 0.5 * torch.randn(data.shape, generator=self.gen)
        labels = torch.arange(self.ways).repeat_interleave(self.samples)
        return data.to(torch.get_default_dtype()), labels


def get_tasksets(train_ways, train_samples, test_ways, test_samples, seed):
    return SimpleNamespace(
        train=SyntheticTaskset(train_ways, train_samples, seed),
        test=SyntheticTaskset(test_ways, test_samples, seed + 1),
    )


# -- main.py ---------------------------------------------------------------------------------------
def reg_loss(parameters, reference_parameters, reg_lambda=0.25):
    loss = 0
    for p1, p2 in zip(parameters, reference_parameters, strict=True):
        loss += torch.sum(torch.pow((p1 - p2), 2))

    return reg_lambda * loss


def split_data(data, labels, shots, ways):
    out = {"train": None, "test": None}
    adapt_indices = np.zeros(data.size(0), dtype=bool)
    adapt_indices[np.arange(shots * ways) * 2] = True
    eval_indices = torch.from_numpy(~adapt_indices)
    adapt_indices = torch.from_numpy(adapt_indices)
    out["train"] = (data[adapt_indices], labels[adapt_indices])
    out["test"] = (data[eval_indices], labels[eval_indices])

    return out


def build(
    lib: SimpleNamespace,
    child_type: str = "cg",
    child_iterations: int = 1,
    train_iters: int = 20,
    valid_tasks: int = 2,
) -> Any:
    """The example's program under ``lib``; returns the Engine (not yet run)."""
    args = ARGS
    # Random seed setup
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    # data loader
    tasksets = get_tasksets(
        train_ways=args.ways,
        train_samples=2 * args.shots,
        test_ways=args.ways,
        test_samples=2 * args.shots,
        seed=args.seed,
    )

    # module & optimizer setup
    model_cls = ConvOmniglot

    parent_module = model_cls(args.ways, args.hidden_size)
    parent_optimizer = lib.AdamW(parent_module.parameters(), lr=args.meta_lr, weight_decay=1e-4)
    parent_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        parent_optimizer,
        T_max=train_iters // args.inner_steps,
    )

    child_module = model_cls(args.ways, args.hidden_size)
    child_optimizer = optim.SGD(child_module.parameters(), lr=args.base_lr)

    class Outer(lib.ImplicitProblem):
        def training_step(self, batch):
            inputs, labels = batch
            out = self.inner(inputs)
            loss = F.cross_entropy(out, labels)
            acc = 100.0 * (out.argmax(dim=1) == labels).float().mean()

            return {"loss": loss, "acc": acc}

        def get_batch(self):
            inputs, labels = self.env.batch["test"]

            return inputs, labels

    class Inner(lib.ImplicitProblem):
        def training_step(self, batch):
            inputs, labels = batch
            out = self.module(inputs)
            loss = F.cross_entropy(out, labels)
            reg = reg_loss(self.parameters(), self.outer.parameters(), args.reg)

            return loss + reg

        def get_batch(self):
            inputs, labels = self.env.batch["train"]

            return inputs, labels

        def on_inner_loop_start(self):
            self.module.load_state_dict(self.outer.module.state_dict())

    class MAMLEnv(lib.Env):
        def __init__(self):
            super().__init__()

            self.tasks = tasksets
            self.batch = {"train": None, "test": None}

        def step(self):
            data, labels = self.tasks.train.sample()
            data, labels = data.to(self.device), labels.to(self.device)
            out = split_data(data, labels, args.shots, args.ways)
            self.batch["train"] = out["train"]
            self.batch["test"] = out["test"]

    class MAMLEngine(lib.Engine):
        def train_step(self):
            if self.global_step % args.inner_steps == 1 or args.inner_steps == 1:
                self.env.step()
            for leaf in self.leaves:
                leaf.step(global_step=self.global_step)

        def validation(self):
            self.outer.module.train()
            if not hasattr(self, "best_acc"):
                self.best_acc = -1
            test_net = model_cls(args.ways, args.hidden_size)
            test_optim = optim.SGD(test_net.parameters(), lr=args.base_lr)
            test_net = test_net.to(self.device)
            accs = []
            for _ in range(valid_tasks):
                inputs, labels = tasksets.test.sample()
                inputs, labels = inputs.to(self.device), labels.to(self.device)
                out = split_data(inputs, labels, args.shots, args.ways)
                train_inputs, train_labels = out["train"]
                test_inputs, test_labels = out["test"]
                test_net.load_state_dict(self.outer.module.state_dict())
                for _ in range(args.inner_steps):
                    out = test_net(train_inputs)
                    loss = F.cross_entropy(out, train_labels)
                    test_optim.zero_grad()
                    loss.backward()
                    test_optim.step()

                out = test_net(test_inputs)
                accs.append((out.argmax(dim=1) == test_labels).detach())

            acc = 100.0 * torch.cat(accs).float().mean().item()
            if acc > self.best_acc:
                self.best_acc = acc

            return {"acc": acc, "best_acc": self.best_acc}

    engine_config = lib.EngineConfig(
        valid_step=10,
        train_iters=train_iters,
        **lib.engine_kwargs,
    )
    parent_config = lib.Config(
        log_step=int(args.inner_steps * args.meta_batch_size * 10),
        retain_graph=True,
        gradient_accumulation=args.meta_batch_size,
    )
    if child_type == "darts":
        child_config = lib.Config(type="darts", unroll_steps=args.inner_steps)
    else:
        child_config = lib.Config(
            type="cg", cg_iterations=child_iterations, cg_alpha=1.0, unroll_steps=args.inner_steps
        )

    outer = Outer(
        name="outer",
        module=parent_module,
        optimizer=parent_optimizer,
        scheduler=parent_scheduler,
        config=parent_config,
    )
    inner = Inner(name="inner", module=child_module, optimizer=child_optimizer, config=child_config)
    env = MAMLEnv()
    problems = [outer, inner]
    u2l = {outer: [inner]}
    l2u = {inner: [outer]}
    dependencies = {"u2l": u2l, "l2u": l2u}
    engine = MAMLEngine(config=engine_config, problems=problems, dependencies=dependencies, env=env)
    return engine
