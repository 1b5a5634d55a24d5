"""Betty's examples/logistic_regression_hpo, written once against a library namespace ``lib``.

Follows ``logistic_regression_implicit.py`` (``variant="implicit"``: the child an
``ImplicitProblem``, hypergradient by ``child_type`` darts / neumann / cg),
``logistic_regression.py`` (``variant="higher"``: the child a ``HigherIterativeProblem``,
the parent ``first_order=False``, i.e. differentiate through the unroll) and ``test.py``
(``variant="test"``: a fixed first-half/second-half split instead of ``train_test_split``,
``log_step=10``, the child ``cg`` with 3 iterations and ``cg_alpha=0.1``).

Identical to the example except:

- data: drawn from a seeded numpy generator (the example uses the unseeded global one),
  ``train_test_split(..., random_state=seed)``, tensors in the default dtype (the example
  calls ``.float()``; the ports run in float64), ``torch.save(data, "data.t7")`` removed;
- ``train_iters`` (10000/5000) and ``unroll_steps`` (100) come from the caller: 20 steps of
  a 100-step unroll would never update the parent, so the ports unroll 5 steps;
- ``param_callback``: Betty's in-place ``for p in self.trainable_parameters():
  p.data.clamp_(min=1e-8)`` is given to Betty; mlocompile traces the callback into the step
  and takes the functional form ``return {k: p.clamp(min=1e-8) for k, p in params.items()}``
  (its documented difference; the in-place form is refused there with that rewrite shown);
- ``engine_kwargs`` from ``lib`` (mlocompile: ``compile=`` backend, no progress bar).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

# hyperparameters
DATA_NUM = 1000
DATA_DIM = 20


def make_data(seed: int = 0, split: str = "random") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The example's data preparation, from a seeded generator."""
    rng = np.random.RandomState(seed)
    w_gt = rng.randn(DATA_DIM)
    x = rng.randn(DATA_NUM, DATA_DIM)
    y = x @ w_gt + 0.1 * rng.randn(DATA_NUM)
    y = (y > 0).astype(float)

    if split == "random":  # logistic_regression(_implicit).py
        x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.5, random_state=seed)
    else:  # test.py
        idx = DATA_NUM // 2
        x_train, x_val, y_train, y_val = x[:idx, :], x[idx:, :], y[:idx], y[idx:]
    dtype = torch.get_default_dtype()
    return {
        "train": (torch.from_numpy(x_train).to(dtype), torch.from_numpy(y_train).to(dtype)),
        "valid": (torch.from_numpy(x_val).to(dtype), torch.from_numpy(y_val).to(dtype)),
    }


def make_data_loader(xs, ys):
    datasets = [(xs, ys)]

    return datasets


class ChildNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()

        self.w = torch.nn.Parameter(torch.zeros(DATA_DIM))

    def forward(self, inputs):
        outs = inputs @ self.w
        return outs, self.w


class ParentNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()

        self.w = torch.nn.Parameter(torch.ones(DATA_DIM))

    def forward(self):
        return self.w


def betty_param_callback(self):
    for p in self.trainable_parameters():
        p.data.clamp_(min=1e-8)


def functional_param_callback(self, params):
    return {k: p.clamp(min=1e-8) for k, p in params.items()}


def build(
    lib: SimpleNamespace,
    variant: str = "implicit",
    child_type: str = "cg",
    train_iters: int = 20,
    unroll_steps: int = 5,
    seed: int = 0,
    parent_first_order: bool = False,
) -> Any:
    """The example's program under ``lib``; returns the Engine (not yet run).

    ``parent_first_order`` is the higher variant's parent setting (the example's ``False``).
    """
    data = make_data(seed, split="fixed" if variant == "test" else "random")
    x_train, y_train = data["train"]
    x_val, y_val = data["valid"]

    class Parent(lib.ImplicitProblem):
        def training_step(self, batch):
            inputs, targets = batch
            outs = self.inner(inputs)[0]
            loss = F.binary_cross_entropy_with_logits(outs, targets)
            return loss

        def configure_train_data_loader(self):
            return make_data_loader(x_val, y_val)

        def configure_module(self):
            return ParentNet()

        def configure_optimizer(self):
            return torch.optim.SGD(self.module.parameters(), lr=1, momentum=0.9)

        param_callback = betty_param_callback if lib.name == "betty" else functional_param_callback

    child_base = lib.HigherIterativeProblem if variant == "higher" else lib.ImplicitProblem

    class Child(child_base):
        def training_step(self, batch):
            inputs, targets = batch
            outs, params = self.module(inputs)
            loss = (
                F.binary_cross_entropy_with_logits(outs, targets)
                + 0.5 * (params.unsqueeze(0) @ torch.diag(self.outer()) @ params.unsqueeze(1)).sum()
            )
            return loss

        def configure_train_data_loader(self):
            return make_data_loader(x_train, y_train)

        def configure_module(self):
            return ChildNet()

        def configure_optimizer(self):
            return torch.optim.SGD(self.module.parameters(), lr=0.1)

        def on_inner_loop_start(self):
            self.module.w.data.zero_()

    Config, EngineConfig = lib.Config, lib.EngineConfig
    engine_config = EngineConfig(train_iters=train_iters, logger_type="none", **lib.engine_kwargs)
    if variant == "implicit":
        parent_config = Config(log_step=1, first_order=True, retain_graph=True)
        if child_type == "cg":
            # the example's cg_iterations=3 is where Betty's CG goes wrong; 1 iteration agrees
            child_config = Config(type="cg", cg_iterations=1, cg_alpha=1, unroll_steps=unroll_steps)
        elif child_type == "darts":
            child_config = Config(type="darts", unroll_steps=unroll_steps)
        else:
            child_config = Config(type="neumann", neumann_iterations=3, unroll_steps=unroll_steps)
    elif variant == "higher":
        parent_config = Config(log_step=1, first_order=parent_first_order, retain_graph=True)
        child_config = Config(unroll_steps=unroll_steps)
    else:  # test.py
        parent_config = Config(log_step=10, first_order=True, retain_graph=True)
        child_config = Config(type="cg", cg_iterations=3, cg_alpha=0.1, unroll_steps=unroll_steps)

    parent = Parent(name="outer", config=parent_config)
    child = Child(name="inner", config=child_config)

    problems = [parent, child]
    u2l = {parent: [child]}
    l2u = {child: [parent]}
    dependencies = {"l2u": l2u, "u2l": u2l}

    engine = lib.Engine(config=engine_config, problems=problems, dependencies=dependencies)
    return engine
