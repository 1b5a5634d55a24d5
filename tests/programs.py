"""Small MLO programs shared by tests (float64-friendly, deterministic)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

import mlocompile as mlo


class Vec(nn.Module):
    """A module that is just a parameter vector; calling it returns the vector."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.p = nn.Parameter(init.clone())

    def forward(self) -> torch.Tensor:
        return self.p


class Reweighted(mlo.ImplicitProblem):
    """Meta-Weight-Net lower problem: per-sample losses weighted by the upper's net."""

    def training_step(self, batch):
        x, t = batch
        per = F.cross_entropy(self.module(x), t, reduction="none").reshape(-1, 1)
        return (torch.sigmoid(self.outer(per.detach())) * per).mean()


class Meta(mlo.ImplicitProblem):
    """Meta-Weight-Net upper problem: clean-data loss of the lower's classifier."""

    def training_step(self, batch):
        x, t = batch
        logits = self.inner(x)
        return {"loss": F.cross_entropy(logits, t), "acc": (logits.argmax(1) == t).float().mean()}


def mwn_data(seed: int = 0, n: int = 64, d: int = 6, classes: int = 3, batch: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    t = torch.randint(0, classes, (n,), generator=g)
    return [(x[i : i + batch], t[i : i + batch]) for i in range(0, n, batch)]


def mwn_engine(
    method: str = "darts", backend: str = "fx", unroll: int = 1, seed: int = 0, lower_config=None, **engine_kw
):
    """A tiny Meta-Weight-Net program: inner MLP classifier, outer weighting net (``lower_config``: the inner's)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    wnet = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
    cfg = mlo.Config(type=method, unroll_steps=unroll, neumann_iterations=2, neumann_alpha=0.1, cg_iterations=2)
    cfg = cfg if lower_config is None else lower_config
    inner = Reweighted(
        "inner", cfg, net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), train_data_loader=mwn_data(seed)
    )
    outer = Meta(
        "outer", mlo.Config(), wnet, torch.optim.Adam(wnet.parameters(), lr=1e-2), train_data_loader=mwn_data(seed + 1)
    )
    config = mlo.EngineConfig(compile=backend, **engine_kw)
    return mlo.Engine([outer, inner], config, {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})


class Chain(mlo.ImplicitProblem):
    """A level of a linear chain: its loss uses the problems named in ``uses``."""

    uses: tuple[str, ...] = ()

    def training_step(self, batch):
        x, t = batch
        out = self.module(x)
        for name in self.uses:
            out = out + 0.1 * getattr(self, name).module(x)
        return F.mse_loss(out, t)


def chain_engine(method: str = "darts", backend: str = "fx", levels: int = 3):
    """A chain p0 (bottom) ... p{levels-1} (top); each level's loss uses its neighbours."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
    names = [f"p{i}" for i in range(levels)]
    probs = []
    for i, name in enumerate(names):
        cls = type(
            f"P{i}",
            (Chain,),
            {"uses": tuple(n for n in (names[i - 1] if i else None, names[i + 1] if i + 1 < levels else None) if n)},
        )
        mod = nn.Linear(3, 2)
        cfg = mlo.Config(type=method, neumann_iterations=2, neumann_alpha=0.1, cg_iterations=2)
        probs.append(cls(name, cfg, mod, torch.optim.SGD(mod.parameters(), lr=0.05), train_data_loader=[(x, t)]))
    deps = {
        "u2l": {probs[i + 1]: [probs[i]] for i in range(levels - 1)},
        "l2u": {probs[i]: [probs[i + 1]] for i in range(levels - 1)},
    }
    return mlo.Engine(probs, mlo.EngineConfig(compile=backend), deps)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (examples/ is not a package) as module ``<name>_example``."""
    spec = importlib.util.spec_from_file_location(f"{name}_example", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def one_thread() -> Iterator[None]:
    """Run with one intra-op thread: for tiny models on 2 cores, thread hand-offs cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def step_graph(fn, *args):
    """Trace ``fn`` with make_fx into a step-like graph: every node annotated, slim meta."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from mlocompile.ir import slim_meta

    gm = make_fx(fn)(*args)
    for node in gm.graph.nodes:
        node.meta.setdefault("mlo.problem", "p")
        node.meta.setdefault("mlo.role", "update")
    slim_meta(gm)
    return gm
