"""Settings are validated when the Engine is built: every error names the field, its value and what is allowed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import mlocompile as mlo
from programs import mwn_engine

BAD_CONFIG = [
    ("unroll_steps", 0, "an integer >= 1"),
    ("unroll_steps", 2.5, "an integer >= 1"),
    ("unroll_steps", True, "an integer >= 1"),
    ("gradient_accumulation", -1, "an integer >= 1"),
    ("neumann_iterations", 0, "an integer >= 1"),
    ("cg_iterations", "3", "an integer >= 1"),
    ("warmup_steps", -2, "an integer >= 0"),
    ("itd_segments", 1.0, "an integer >= 0"),
    ("gradient_clipping", -0.5, "a finite number >= 0"),
    ("gradient_clipping", float("nan"), "a finite number >= 0"),
    ("darts_alpha", 0.0, "a finite number > 0"),
    ("neumann_alpha", float("inf"), "a finite number > 0"),
    ("cg_alpha", -1.0, "a finite number > 0"),
    ("precision", "fp8", "use one of ['fp32', 'bf16', 'fp16']"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), BAD_CONFIG)
def test_bad_config_fields_fail_at_construction(field, value, allowed):
    cfg = mlo.Config(type="neumann")
    setattr(cfg, field, value)
    with pytest.raises(mlo.ProgramError) as err:
        mwn_engine("neumann", "eager", lower_config=cfg)
    msg = str(err.value)
    assert f"Config of problem 'inner': {field}={value!r}" in msg and allowed in msg


BAD_ENGINE_CONFIG = [
    ("train_iters", -1, "an integer >= 0"),
    ("valid_step", 0, "an integer >= 1"),
    ("early_stopping_tolerance", 0, "an integer >= 1"),
    ("log_every", 1.5, "an integer >= 0"),
    ("dist_check_every", -1, "an integer >= 0"),
    ("dist_timeout_s", 0, "a number of seconds > 0"),
    ("memory_budget", -1.0, "memory_budget must be > 0"),
    ("memory_budget", float("nan"), "memory_budget must be > 0"),
    ("logger_type", "wandb-ish", "use one of ['none', 'tensorboard', 'wandb']"),
    ("strategy", "fsdp", "is not implemented; use strategy='distributed'"),
    ("strategy", "tpu", "use one of ['default', 'cpu', 'gpu', 'distributed']"),
    ("compile", "jit", "use one of ['eager', 'fx', 'inductor']"),
    ("early_stopping_mode", "best", "use one of ['min', 'max']"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), BAD_ENGINE_CONFIG)
def test_bad_engine_config_fields_fail_at_construction(field, value, allowed):
    backend = value if field == "compile" else "eager"
    kw = {} if field == "compile" else {field: value}
    with pytest.raises(mlo.ProgramError) as err:
        mwn_engine("darts", backend, **kw)
    msg = str(err.value)
    assert f"EngineConfig: {field}={value!r}" in msg or f"EngineConfig.{field}={value!r}" in msg
    assert allowed in msg


def test_tensorboard_missing_fails_at_construction_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(mlo.ProgramError, match=r"logger_type='tensorboard' needs TensorBoard.*pip install tensorboard"):
        mwn_engine("darts", "eager", logger_type="tensorboard")


def test_good_settings_still_build_and_step():
    engine = mwn_engine("neumann", "eager", lower_config=mlo.Config(type="neumann", gradient_clipping=1, cg_alpha=2))
    engine.train_step()
    assert all(torch.isfinite(p).all() for p in engine.inner.module.parameters())
