"""DARTS architecture search (Liu et al., ICLR 2019) on scikit-learn's 8x8 digits.

A one-cell convolutional network whose cell is a small DAG: the stem's output is node 0,
each of three further nodes sums one *mixed op* per incoming edge (six edges), and the
head classifies the concatenation of nodes 1-3. A mixed op is ``sum_o softmax(alpha)_o
* o(x)`` over the candidates in ``OPS`` (zero, skip, 3x3 and 5x5 convolutions, 3x3 max
and average pooling). Two problems, as in DARTS:

- ``weights`` (lower): the network's weights, SGD with momentum on the training split;
- ``arch`` (upper): ``alpha``, Adam (lr 3e-3, betas (0.5, 0.999)) on the validation split.

The lower uses ``Config(type="darts")``: Betty's finite-difference best response with
Hessian-inverse ~ identity, i.e. DARTS' second-order term without its inner learning-rate
factor, evaluated at the current weights rather than one look-ahead step.

After the search, the derived architecture keeps the argmax non-zero op per edge. It is
retrained from scratch with plain PyTorch on train+validation and tested, next to random
architectures from the same space (one non-zero op per edge, uniformly) retrained the
same way. The table's ``supernet`` row is the search network itself (mixed ops) on the
test split, timed for the whole search. Run it from the repository root::

    .venv/bin/python examples/darts_nas.py
    .venv/bin/python examples/darts_nas.py --iters 300 --random 5 --compile eager

Batch norm is DARTS' affine-free one with running statistics tracked (advanced once per
training step of the weights, and by the arch step's forward); every accuracy is measured in
eval mode, on the running statistics.

What happened on seed 0 (defaults): alpha moves from near-uniform to 0.18-0.24 for the
top op of each edge; the derived cell is conv5x5 on five edges and maxpool on one, and it
retrains to 0.988 ± 0.006 test accuracy (mean ± sample std over 3 retraining seeds: 0.995,
0.985, 0.985) against 0.982 ± 0.007 for six random cells (~3 min on 2 CPU cores). The gap
is about 4 of 597 test images and within one standard deviation: on 8x8 digits nearly every
cell in this space reaches 97.6-99.2%, so the search mostly rediscovers that the parametric
ops help (its cell has 2.3x the random cells' mean parameter count).
The random row is the honest baseline, not a strawman: random search is known to be hard
to beat on small search spaces (Li and Talwalkar, 2019).

No step selection, unlike the reweighting examples: as in DARTS, the cell is derived from
the search's last step, and it is retrained on train + validation for a fixed cosine
schedule, so no held-out data is left to pick a step with, and the test split is read once
per retrained network. (The supernet's validation accuracy is what alpha is trained on:
choosing a search step by it would choose on training data.) All numbers come from one
search seed (``--seed``); a new seed also draws a new split.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import mlocompile as mlo

OPS = ("zero", "skip", "conv3x3", "conv5x5", "maxpool", "avgpool")
NODES = 3  # intermediate nodes; node j reads nodes 0..j-1, so 1 + 2 + 3 = 6 edges
EDGES = tuple((i, j) for j in range(1, NODES + 1) for i in range(j))
CHANNELS = 8
BATCH = 64
N_TRAIN, N_VAL = 600, 600  # the rest (597) is the test split
W_LR, W_MOMENTUM, W_DECAY = 0.05, 0.9, 3e-4
A_LR, A_BETAS, A_DECAY = 3e-3, (0.5, 0.999), 1e-3  # DARTS' architecture optimizer
RETRAIN_STEPS, RETRAIN_LR = 600, 0.05

Split = tuple[Tensor, Tensor]
Arch = tuple[str, ...]  # one op name per edge, in EDGES order


def load_data(seed: int = 0) -> dict[str, Split]:
    """Return ``train``/``val``/``test`` splits as ``(x [n,1,8,8] float32, y int64)``."""
    x, y = load_digits(return_X_y=True)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, train_size=N_TRAIN, stratify=y, random_state=seed)
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, train_size=N_VAL, stratify=y_rest, random_state=seed
    )
    mean, std = x_train.mean(), x_train.std()

    def pack(a: np.ndarray, b: np.ndarray) -> Split:
        return torch.tensor((a - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8), torch.tensor(b)

    return {"train": pack(x_train, y_train), "val": pack(x_val, y_val), "test": pack(x_test, y_test)}


def norm(c: int) -> nn.BatchNorm2d:
    """Return DARTS' affine-free batch norm (running statistics tracked, used in eval mode)."""
    return nn.BatchNorm2d(c, affine=False)


def make_op(name: str, c: int) -> nn.Module:
    """Return candidate op ``name`` on ``c`` channels (shape-preserving on 8x8 maps)."""
    if name == "skip":
        return nn.Identity()
    if name in ("conv3x3", "conv5x5"):
        k = int(name[-1])
        return nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, k, padding=k // 2, bias=False), norm(c))
    if name == "maxpool":
        return nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), norm(c))
    if name == "avgpool":
        return nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), norm(c))
    raise ValueError(f"unknown op {name!r}; use one of {list(OPS)}")


class Net(nn.Module):
    """Stem, one cell over ``EDGES`` and a linear head.

    ``choices[e]`` lists the candidate ops of edge ``e``: all of ``OPS`` for the search
    network (``forward(x, alpha)`` mixes them with ``softmax(alpha[e])``), a single op
    for a derived architecture (``forward(x)``). ``zero`` is never computed: its output
    is zero, so it only takes part in the softmax.
    """

    def __init__(self, choices: Sequence[Sequence[str]], c: int = CHANNELS) -> None:
        super().__init__()
        self.choices = [tuple(ops) for ops in choices]
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), norm(c))
        self.edges = nn.ModuleList(
            nn.ModuleDict({op: make_op(op, c) for op in ops if op != "zero"}) for ops in self.choices
        )
        self.head = nn.Linear(NODES * c * 4, 10)

    def forward(self, x: Tensor, alpha: Tensor | None = None) -> Tensor:
        weights = None if alpha is None else F.softmax(alpha, dim=-1)
        nodes = [self.stem(x)]
        for j in range(1, NODES + 1):
            total: Tensor | int = 0
            for e, (i, jj) in enumerate(EDGES):
                if jj != j:
                    continue
                for o, op in enumerate(self.choices[e]):
                    if op == "zero":
                        continue
                    out = self.edges[e][op](nodes[i])
                    total = total + (out if weights is None else weights[e, o] * out)
            nodes.append(total if isinstance(total, Tensor) else torch.zeros_like(nodes[0]))
        features = F.adaptive_avg_pool2d(torch.cat(nodes[1:], dim=1), 2)  # 2x2 keeps coarse position
        return self.head(features.flatten(1))


class Alpha(nn.Module):
    """The architecture parameters, one row of op logits per edge; calling it returns them."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(1e-3 * torch.randn(len(EDGES), len(OPS)))  # DARTS' near-uniform start

    def forward(self) -> Tensor:
        return self.alpha


class Weights(mlo.ImplicitProblem):
    """The search network's weights, trained on the training split under the current alpha."""

    def training_step(self, batch: Split) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.module(x, self.arch()), y)


class Architecture(mlo.ImplicitProblem):
    """alpha, trained on the validation split through the weights' best response."""

    def training_step(self, batch: Split) -> dict[str, Tensor]:
        x, y = batch
        logits = self.weights.module(x, self.module())
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(1) == y).float().mean()}


def derive(engine: mlo.Engine) -> Arch:
    """Return the discrete architecture: the argmax non-zero op of each edge."""
    alpha = engine.arch.module.alpha.detach()
    allowed = alpha.clone()
    allowed[:, OPS.index("zero")] = -float("inf")
    return tuple(OPS[i] for i in allowed.argmax(1).tolist())


def describe(arch: Arch) -> str:
    """Return ``arch`` as ``i->j:op`` pairs."""
    return " ".join(f"{i}->{j}:{op}" for (i, j), op in zip(EDGES, arch))


def accuracy(net: nn.Module, split: Split, alpha: Tensor | None = None) -> float:
    """Return ``net``'s accuracy on a whole split."""
    x, y = split
    was = net.training
    net.eval()  # batch norm with the running statistics, as at test time
    try:
        with torch.no_grad():
            logits = net(x) if alpha is None else net(x, alpha)
    finally:
        net.train(was)
    return (logits.argmax(1) == y).float().mean().item()


class DartsEngine(mlo.Engine):
    """An Engine that prints the supernet's validation accuracy and the current derivation."""

    data: dict[str, Split]

    def validation(self) -> dict[str, Any]:
        alpha = self.arch.module.alpha.detach()
        stats = {"val_acc": accuracy(self.weights.module, self.data["val"], alpha)}
        if self.config.progress:
            probs = F.softmax(alpha, -1).max(1).values
            print(
                f"  step {self.global_step:5d}  supernet val_acc {stats['val_acc']:.4f}  "
                f"max softmax(alpha) per edge {probs.min().item():.3f}-{probs.max().item():.3f}  "
                f"{describe(derive(self))}",
                flush=True,
            )
        return stats


def loader(split: Split, seed: int) -> DataLoader:
    """Return a reshuffling loader of full ``BATCH``-sized batches."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(*split), batch_size=BATCH, shuffle=True, drop_last=True, generator=gen)


def build(iters: int = 400, seed: int = 0, compile: str = "fx", *, progress: bool = False) -> DartsEngine:
    """Build the DARTS search engine (the caller runs it); ``iters`` counts weight steps."""
    data = load_data(seed)
    torch.manual_seed(seed)
    net, alpha = Net([OPS] * len(EDGES)), Alpha()
    weights = Weights(
        name="weights",
        module=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=W_LR, momentum=W_MOMENTUM, weight_decay=W_DECAY),
        train_data_loader=loader(data["train"], seed),
        config=mlo.Config(type="darts", unroll_steps=1),
    )
    arch = Architecture(
        name="arch",
        module=alpha,
        optimizer=torch.optim.Adam(alpha.parameters(), lr=A_LR, betas=A_BETAS, weight_decay=A_DECAY),
        train_data_loader=loader(data["val"], seed + 1),
        config=mlo.Config(),
    )
    engine = DartsEngine(
        problems=[arch, weights],
        dependencies={"u2l": {arch: [weights]}, "l2u": {weights: [arch]}},
        config=mlo.EngineConfig(train_iters=iters, valid_step=max(1, iters // 5), compile=compile, progress=progress),
    )
    engine.data = data
    return engine


def retrain(arch: Arch, data: dict[str, Split], seed: int = 0, steps: int = RETRAIN_STEPS) -> float:
    """Train ``arch`` from scratch on train+val with plain PyTorch; return its test accuracy."""
    torch.manual_seed(seed)
    net = Net([[op] for op in arch])
    x = torch.cat([data["train"][0], data["val"][0]])
    y = torch.cat([data["train"][1], data["val"][1]])
    opt = torch.optim.SGD(net.parameters(), lr=RETRAIN_LR, momentum=0.9, weight_decay=W_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        if step % (len(y) // BATCH) == 0:
            perm = torch.randperm(len(y), generator=gen)
        idx = perm[(step % (len(y) // BATCH)) * BATCH :][:BATCH]
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
        sched.step()
    net.eval()
    return accuracy(net, data["test"])


def n_params(arch: Arch) -> int:
    """Return the parameter count of the discrete network for ``arch``."""
    return sum(p.numel() for p in Net([[op] for op in arch]).parameters())


def random_arch(rng: random.Random) -> Arch:
    """Return a uniformly random non-zero op per edge."""
    return tuple(rng.choice(OPS[1:]) for _ in EDGES)


def sample_std(values: Sequence[float]) -> float | None:
    """Return the sample standard deviation of ``values`` (None for fewer than two)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=400, help="search steps (one weight + one alpha step each)")
    parser.add_argument("--random", type=int, default=6, help="random architectures to retrain for comparison")
    parser.add_argument("--retrains", type=int, default=3, help="retraining seeds of the derived architecture")
    parser.add_argument("--retrain-steps", type=int, default=RETRAIN_STEPS)
    parser.add_argument("--compile", default="fx", choices=("eager", "fx", "inductor"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def print_table(rows: list[dict[str, Any]]) -> None:
    """Print one row per architecture: test accuracy (mean ± sample std over retrained nets), parameters, seconds."""
    header = f"{'architecture':<14} {'test acc':>16} {'params':>7} {'seconds':>8}  ops (edge i->j)"
    print(f"\n{header}\n{'-' * len(header)}")
    for r in rows:
        acc = f"{r['test_acc']:.4f}" + (f" ± {r['test_std']:.4f}" if r.get("test_std") is not None else "")
        print(f"{r['name']:<14} {acc:>16} {r['params']:>7.0f} {r['seconds']:>8.2f}  {r['ops']}")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Search, derive, retrain the derived and random architectures; print a table and return its rows."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # NOTE: 8-channel 8x8 maps: on 2 cores thread hand-offs cost more than they save
    try:
        data = load_data(args.seed)
        n = {k: len(v[1]) for k, v in data.items()}
        print(
            f"digits 8x8: train/val/test = {n['train']}/{n['val']}/{n['test']}, {len(EDGES)} edges x {len(OPS)} ops, "
            f"{args.iters} search steps, compile={args.compile}"
        )
        start = time.perf_counter()
        engine = build(args.iters, args.seed, args.compile, progress=True)
        engine.run()
        search_s = time.perf_counter() - start
        derived = derive(engine)
        supernet = accuracy(engine.weights.module, data["test"], engine.arch.module.alpha.detach())
        print("\nsoftmax(alpha), one row per edge, columns " + " ".join(OPS))
        for (i, j), row in zip(EDGES, F.softmax(engine.arch.module.alpha.detach(), -1).tolist()):
            print(f"  {i}->{j}: " + " ".join(f"{p:.3f}" for p in row))
        params = sum(p.numel() for p in engine.weights.module.parameters())
        rows = [
            {
                "name": "supernet",
                "test_acc": supernet,
                "params": params,
                "seconds": search_s,
                "ops": "(search, mixed ops)",
            }
        ]
        start = time.perf_counter()
        accs = []
        for r in range(args.retrains):
            accs.append(retrain(derived, data, args.seed + r, args.retrain_steps))
            print(f"  DARTS retrain seed {args.seed + r}: test acc {accs[-1]:.4f}", flush=True)
        rows.append(
            {
                "name": "DARTS",
                "test_acc": float(np.mean(accs)),
                "test_std": sample_std(accs),
                "params": n_params(derived),
                "seconds": time.perf_counter() - start,
                "ops": describe(derived),
            }
        )
        rng = random.Random(args.seed)
        accs, sizes, start = [], [], time.perf_counter()
        for k in range(args.random):
            arch = random_arch(rng)
            accs.append(retrain(arch, data, args.seed, args.retrain_steps))
            sizes.append(n_params(arch))
            print(f"  random {k}: test acc {accs[-1]:.4f}  params {sizes[-1]}  {describe(arch)}", flush=True)
        if accs:
            rows.append(
                {
                    "name": f"random x{len(accs)}",
                    "test_acc": float(np.mean(accs)),
                    "test_std": sample_std(accs),
                    "params": float(np.mean(sizes)),
                    "seconds": time.perf_counter() - start,
                    "ops": "(one non-zero op per edge, uniformly; params: mean)",
                }
            )
    finally:
        torch.set_num_threads(threads)
    print_table(rows)
    print(
        f"test acc: DARTS: mean ± sample std over {args.retrains} retraining seeds of the cell searched with seed "
        f"{args.seed}; random: over {args.random} cells, one retraining each; supernet: the search network at its "
        "last step"
    )
    return rows


if __name__ == "__main__":
    main()
