"""The benchmarked workloads: which program, which sizes, which implementations, how long.

A workload is declarative (``Workload``); ``build_program`` turns it into concrete
problems (loss mixin, module, optimizer, data, config) that ``engines.py`` hands to
Betty or mlocompile and ``torchfunc.py`` runs by hand. Every implementation of a
workload starts from the same seed, hence the same weights and batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from benchmarks import programs as P

IMPLS = ("eager", "fx", "fx_inplace", "inductor", "betty", "torchfunc")
# fx_inplace: fx with EngineConfig(in_place_updates=True) (updates written into the old tensors, not atomic)
MLOCOMPILE_IMPLS = ("eager", "fx", "fx_inplace", "inductor")


@dataclass(frozen=True)
class Workload:
    """One benchmarked MLO program and how to time it.

    A *cycle* is ``unroll`` calls of ``Engine.train_step()``: the lowest problem's
    ``unroll`` steps, then every upper problem's one step.
    """

    name: str
    kind: str  # "mwn" | "hpo" | "chain" | "maml" | "scale"
    method: str = "darts"
    unroll: int = 1
    iterations: int = 3  # neumann / cg iterations
    sizes: dict[str, int] = field(default_factory=dict)
    impls: tuple[str, ...] = IMPLS
    warmup: int = 3
    min_cycles: int = 20
    min_seconds: float = 1.0
    max_cycles: int = 300
    max_rounds: int | None = None  # cap on --rounds (the 100M-parameter model: one process is enough)
    note: str = ""


MWN_SIZES = {"d": 784, "hidden": 256, "classes": 10, "batch": 128, "meta_hidden": 100}
# 1024 -> 4096, 6 x (4096 -> 4096), 4096 -> 10: 105M parameters in the lower problem
SCALE_SIZES = {"d": 1024, "hidden": 4096, "depth": 7, "classes": 10, "batch": 64, "meta_hidden": 100}

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        *(
            Workload(f"mwn_{m}_u{u}", "mwn", method=m, unroll=u, sizes=MWN_SIZES)
            for m in ("darts", "neumann", "cg")
            for u in (1, 5)
        ),
        Workload("hpo_d20", "hpo", sizes={"d": 20, "batch": 256}),
        Workload("hpo_d10000", "hpo", sizes={"d": 10000, "batch": 256}),
        Workload("hpo_d10000_neumann", "hpo", method="neumann", sizes={"d": 10000, "batch": 256}),
        Workload("chain3_darts", "chain", sizes=MWN_SIZES),
        *(
            Workload(
                f"maml_itd_k{k}",
                "maml",
                method="itd",
                unroll=k,
                sizes={"hidden": 40, "shots": 10},
                note="Betty's IterativeProblem crashes on torch 2.x; compare with torchfunc",
            )
            for k in (5, 20)
        ),
        Workload(
            "scale_mwn_105m",
            "scale",
            sizes=SCALE_SIZES,
            impls=("fx", "fx_inplace", "eager", "inductor", "betty"),
            warmup=1,
            min_cycles=3,
            min_seconds=0.0,
            max_cycles=3,
            max_rounds=1,
            note="memory vs the theoretical minimum; 1 warm-up (the trace) + 3 timed cycles; no torch.func",
        ),
    ]
}

QUICK_SIZES = {
    "mwn": {"d": 32, "hidden": 16, "classes": 4, "batch": 16, "meta_hidden": 8},
    "chain": {"d": 32, "hidden": 16, "classes": 4, "batch": 16, "meta_hidden": 8},
    "scale": {"d": 32, "hidden": 64, "depth": 2, "classes": 4, "batch": 8, "meta_hidden": 8},
    "maml": {"hidden": 8, "shots": 5},
}


def quick(w: Workload, cycles: int | None = None) -> Workload:
    """Return ``w`` at smoke-test sizes: tiny models, 3 warm-up and a few timed cycles."""
    sizes = dict(QUICK_SIZES.get(w.kind, w.sizes))
    if w.kind == "hpo":
        sizes = {"d": min(w.sizes["d"], 100), "batch": 32}
    n = cycles or 5
    return replace(w, sizes=sizes, warmup=min(w.warmup, 3), min_cycles=n, max_cycles=n, min_seconds=0.0)


# -- concrete programs -----------------------------------------------------------------------
@dataclass
class ProblemSpec:
    """One problem: its loss mixin, module, optimizer factory, data and Config fields."""

    mixin: type
    module: nn.Module
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    data: list[Any]
    config: dict[str, Any]
    betty_mixin: type | None = None  # where Betty needs a different hook
    iterative: bool = False  # Betty: an IterativeProblem (MAML)


@dataclass
class Program:
    """A workload made concrete: problems by name and the dependency edges."""

    problems: dict[str, ProblemSpec]
    u2l: dict[str, list[str]]
    l2u: dict[str, list[str]]


def _sgd_momentum(lr: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)


def _adam(lr: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda m: torch.optim.Adam(m.parameters(), lr=lr)


def method_config(w: Workload) -> dict[str, Any]:
    """The lower problem's Config fields for ``w``'s hypergradient method."""
    cfg: dict[str, Any] = {"type": w.method, "unroll_steps": w.unroll}
    if w.method == "neumann":
        cfg.update(neumann_iterations=w.iterations, neumann_alpha=0.1)
    if w.method == "cg":
        cfg.update(cg_iterations=w.iterations, cg_alpha=1.0)
    return cfg


def build_program(w: Workload) -> Program:
    """Build ``w``'s modules, optimizers and data from a fixed seed."""
    torch.manual_seed(0)
    return {"mwn": _mwn, "scale": _mwn, "hpo": _hpo, "chain": _chain, "maml": _maml}[w.kind](w)


def _mwn(w: Workload) -> Program:
    s = w.sizes
    hidden = [s["hidden"]] * s.get("depth", 1)
    net, wnet = P.mlp(s["d"], *hidden, s["classes"]), P.mlp(1, s["meta_hidden"], 1)
    n_batches = 2 if w.kind == "scale" else 4
    return Program(
        problems={
            "inner": ProblemSpec(
                P.MWNInner,
                net,
                _sgd_momentum(0.05 if w.kind == "scale" else 0.1),
                P.classification_batches(1, n_batches, s["batch"], s["d"], s["classes"], noise=0.4),
                method_config(w),
            ),
            "outer": ProblemSpec(
                P.MWNOuter,
                wnet,
                _adam(1e-3),
                P.classification_batches(2, n_batches, s["batch"], s["d"], s["classes"]),
                {},
            ),
        },
        u2l={"outer": ["inner"]},
        l2u={"inner": ["outer"]},
    )


def _hpo(w: Workload) -> Program:
    d, batch = w.sizes["d"], w.sizes["batch"]
    return Program(
        problems={
            "inner": ProblemSpec(
                P.HPOInner,
                nn.Linear(d, 1),
                lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                P.binary_batches(1, 4, batch, d),
                method_config(w),
            ),
            "outer": ProblemSpec(P.HPOOuter, P.HyperParam(d), _adam(0.01), P.binary_batches(2, 4, batch, d), {}),
        },
        u2l={"outer": ["inner"]},
        l2u={"inner": ["outer"]},
    )


def _chain(w: Workload) -> Program:
    s = w.sizes
    g = torch.Generator().manual_seed(3)
    return Program(
        problems={
            "bottom": ProblemSpec(
                P.ChainBottom,
                P.mlp(s["d"], s["hidden"], s["classes"]),
                _sgd_momentum(0.1),
                P.classification_batches(1, 4, s["batch"], s["d"], s["classes"], noise=0.4),
                {"type": "darts"},
            ),
            "middle": ProblemSpec(
                P.ChainMiddle,
                P.mlp(1, s["meta_hidden"], 1),
                _adam(1e-3),
                P.classification_batches(2, 4, s["batch"], s["d"], s["classes"]),
                # Betty frees middle's loss graph after its direct gradient unless told to keep it
                {"type": "darts", "retain_graph": True},
            ),
            "top": ProblemSpec(
                P.ChainTop, P.HyperParam(1), _adam(1e-2), [(torch.randn(s["batch"], 1, generator=g),)] * 4, {}
            ),
        },
        u2l={"top": ["middle"], "middle": ["bottom"]},
        l2u={"bottom": ["middle"], "middle": ["top"]},
    )


def _maml(w: Workload) -> Program:
    h, shots = w.sizes["hidden"], w.sizes["shots"]
    meta = P.mlp(1, h, h, 1)
    learner = P.mlp(1, h, h, 1)
    tasks = P.sinusoid_tasks(5, 8, shots)
    # the lower problem sees its task's support set at each of its K steps; the upper the query set
    support = [support for support, _ in tasks for _ in range(w.unroll)]
    query = [q for _, q in tasks]
    return Program(
        problems={
            "inner": ProblemSpec(
                P.MAMLInner,
                learner,
                lambda m: torch.optim.SGD(m.parameters(), lr=0.01),
                support,
                {"type": "itd", "unroll_steps": w.unroll},
                betty_mixin=P.BettyMAMLInner,
                iterative=True,
            ),
            "outer": ProblemSpec(P.MAMLOuter, meta, _adam(1e-3), query, {}),
        },
        u2l={"outer": ["inner"]},
        l2u={"inner": ["outer"]},
    )


def theoretical_min_bytes(w: Workload) -> dict[str, int]:
    """Lower bound on the memory of one ``scale``/``mwn`` cycle (fp32), by component.

    params + grads + optimizer state (SGD momentum: one buffer; Adam: two) for both
    problems, plus the activations one backward pass must keep: every layer's input
    and output (pre- and post-ReLU) for one batch.
    """
    s = w.sizes
    widths = [s["d"], *([s["hidden"]] * s.get("depth", 1)), s["classes"]]
    n_inner = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    n_outer = 1 * s["meta_hidden"] + s["meta_hidden"] + s["meta_hidden"] + 1
    act = s["batch"] * (widths[0] + 2 * sum(widths[1:-1]) + widths[-1])
    f32 = 4
    parts = {
        "params": (n_inner + n_outer) * f32,
        "grads": (n_inner + n_outer) * f32,
        "optimizer_state": (n_inner + 2 * n_outer) * f32,
        "activations": act * f32,
    }
    parts["total"] = sum(parts.values())
    parts["inner_params"] = n_inner
    return parts
