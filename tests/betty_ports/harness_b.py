"""Run a port under Betty or mlocompile: the libraries as namespaces, timing, parameters."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor


class BettyAdamW(torch.optim.AdamW):
    """AdamW as Betty can rebuild it on current torch.

    Betty 0.2.1 re-creates every optimizer as ``type(opt)(params, **opt.defaults)``; torch's
    AdamW lists ``decoupled_weight_decay`` in its defaults but its ``__init__`` does not take
    it (TypeError). Same update rule: AdamW always decouples.
    """

    def __init__(self, params: Any, decoupled_weight_decay: bool = True, **kw: Any) -> None:
        assert decoupled_weight_decay
        super().__init__(params, **kw)


def libs() -> dict[str, SimpleNamespace]:
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    import mlocompile

    return {
        "betty": SimpleNamespace(
            name="betty",
            Engine=Engine,
            Config=Config,
            EngineConfig=EngineConfig,
            ImplicitProblem=ImplicitProblem,
            AdamW=BettyAdamW,
        ),
        "mlocompile": SimpleNamespace(
            name="mlocompile",
            Engine=mlocompile.Engine,
            Config=mlocompile.Config,
            EngineConfig=mlocompile.EngineConfig,
            ImplicitProblem=mlocompile.ImplicitProblem,
            AdamW=torch.optim.AdamW,
        ),
    }


def run(build: Callable[..., Any], lib: SimpleNamespace, backend: str | None, steps: int, **kw: Any):
    """Build and run ``steps`` global steps.

    Returns (engine, initial parameters, final parameters, seconds to first step); parameters
    as {problem: {name: tensor}}, the initial ones read after the Engine is built (modules a
    ``configure_module`` hook makes exist only then).
    """
    engine_config = {"strategy": "cpu"} if backend is None else {"compile": backend, "progress": False}
    t0 = time.perf_counter()
    engine = build(lib, train_iters=steps, engine_config=engine_config, **kw)
    init = parameters(engine)
    first: list[float] = []
    inner_step = engine.train_step

    def timed_step() -> None:
        inner_step()
        if not first:
            first.append(time.perf_counter() - t0)

    engine.train_step = timed_step  # the instance attribute: run() calls self.train_step() in both libraries
    engine.run()
    return engine, init, parameters(engine), first[0]


def parameters(engine: Any) -> dict[str, dict[str, Tensor]]:
    return {p.name: {k: v.detach().clone() for k, v in p.module.named_parameters()} for p in engine.problems}


def compare(
    init: dict[str, dict[str, Tensor]],
    ref: dict[str, dict[str, Tensor]],
    ours: dict[str, dict[str, Tensor]],
    rtol: float,
    atol: float,
) -> tuple[float, float]:
    """Assert every parameter moved (in ``ref``) and equal (rtol, atol).

    Returns the max relative difference of the parameters and of their changes from ``init``.
    """
    assert ref.keys() == ours.keys() == init.keys()
    worst = worst_delta = 0.0
    for name in ref:
        assert ref[name].keys() == ours[name].keys() == init[name].keys(), name
        for key, value in ref[name].items():
            delta_ref, delta_ours = value - init[name][key], ours[name][key] - init[name][key]
            assert delta_ref.abs().max() > 0, f"{name}.{key} never changed in Betty"
            torch.testing.assert_close(
                ours[name][key], value, rtol=rtol, atol=atol, msg=lambda m, n=name, k=key: f"{n}.{k}: {m}"
            )
            rel = ((ours[name][key] - value).abs() / value.abs().clamp_min(atol / rtol)).max().item()
            worst = max(worst, rel)
            rel_delta = ((delta_ours - delta_ref).abs().max() / delta_ref.abs().max()).item()
            worst_delta = max(worst_delta, rel_delta)
    return worst, worst_delta
