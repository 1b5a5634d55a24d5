"""The amp pass: bf16 matmuls in the IR, fp32 master weights, hypergradients within bf16 tolerance."""

from __future__ import annotations

import pytest
import torch

import mlocompile as mlo
from programs import chain_engine, mwn_engine


def _with_precision(engine, precision):
    for problem in engine.program.problems.values():
        problem.config.precision = precision
    return engine


def _flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


@pytest.mark.parametrize("method", ["darts", "neumann", "itd"])
def test_bf16_hypergradients_within_bf16_tolerance(method):
    ref = _flat(mwn_engine(method).gradients("outer"))
    low = _flat(_with_precision(mwn_engine(method), "bf16").gradients("outer"))
    rel = (low - ref).norm() / ref.norm()
    assert rel < 5e-2, rel  # bf16 keeps 8 mantissa bits: ~0.4% per rounding
    assert not torch.equal(low, ref)  # the casts are really there


def test_casts_are_visible_in_the_ir(golden):
    engine = _with_precision(chain_engine("darts", levels=2), "bf16")
    ir = mlo.compile(engine).ir
    golden("amp/chain2_bf16.txt", ir)
    lines = ir.splitlines()
    addmm = [ln for ln in lines if "aten.addmm.default" in ln and "role=forward" in ln]
    assert addmm and all(": bfloat16[" in ln for ln in addmm if "method=" not in ln)
    assert any("aten._to_copy.default" in ln and "dtype=bfloat16" in ln for ln in lines)
    # best-response products stay fp32 by default (darts' difference quotient would lose ~20%)
    assert all(": bfloat16[" not in ln for ln in lines if "method=darts" in ln)
    assert "cast_for_amp" in str(mlo.compile(engine).report())


def test_master_weights_and_outputs_stay_fp32():
    engine = _with_precision(mwn_engine("darts"), "bf16")
    for _ in range(3):
        engine.train_step()
    for problem in engine.program.problems.values():
        assert all(p.dtype == torch.float32 for p in problem.module.parameters())
    for gm in mlo.compile(engine).graph_modules.values():
        out = next(n for n in gm.graph.nodes if n.op == "output")
        for arg in out.all_input_nodes:
            val = arg.meta.get("val")
            assert not isinstance(val, torch.Tensor) or val.dtype != torch.bfloat16, arg.name


def test_fp16_needs_a_working_scaler():
    with pytest.raises(mlo.ProgramError, match=r"precision='fp16' needs dynamic loss scaling"):
        mlo.Config(precision="fp16", scale_factor=1.0).validate("inner")


def _fp16_engine(scale: float):
    engine = _with_precision(mwn_engine("darts"), "fp16")
    for problem in engine.program.problems.values():
        problem.config.initial_dynamic_scale = scale
        engine.runner.runs[problem.name].scaler.scale = scale
    return engine


def test_fp16_overflow_skips_the_step_and_backs_off():
    """An injected overflow (a loss scale fp16 cannot hold) skips the update, as GradScaler does."""
    engine = _fp16_engine(1e30)
    inner = engine.program.problems["inner"]
    before = [p.detach().clone() for p in inner.module.parameters()]
    engine.train_step()
    assert all(torch.equal(b, p) for b, p in zip(before, inner.module.parameters()))
    assert engine.runner.runs["inner"].scaler.skipped_steps == 1 and engine.runner.runs["inner"].scaler.scale == 5e29
    assert not inner.optimizer.state  # no optimizer step was taken


def test_fp16_with_a_sane_scale_trains_close_to_fp32():
    engine = _fp16_engine(1024.0)
    ref = mwn_engine("darts")
    for _ in range(3):
        engine.train_step()
        ref.train_step()
    assert engine.runner.runs["inner"].scaler.skipped_steps == 0
    got = torch.cat([p.flatten() for p in engine.program.problems["inner"].module.parameters()])
    want = torch.cat([p.flatten() for p in ref.program.problems["inner"].module.parameters()])
    assert (got - want).norm() / want.norm() < 1e-2
    assert "float16" in mlo.compile(engine).ir


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 speed and GradScaler parity need a CUDA GPU")
def test_fp16_on_gpu_matches_gradscaler_semantics():
    engine = _fp16_engine(2.0**16)
    for problem in engine.program.problems.values():
        problem.module.cuda()
        problem.train_data_loader = [tuple(t.cuda() for t in b) for b in problem.train_data_loader]
    for _ in range(3):
        engine.train_step()
    assert all(p.is_cuda and p.dtype == torch.float32 for p in engine.program.problems["inner"].module.parameters())
