"""The inductor backend: same numbers as fx, and a clear fallback when compilation fails."""

from __future__ import annotations

import pytest
import torch

from programs import mwn_engine

pytestmark = pytest.mark.slow


def _params(engine):
    return torch.cat(
        [p.detach().flatten() for prob in engine.program.problems.values() for p in prob.module.parameters()]
    )


def test_inductor_matches_fx():
    runs = {}
    for backend in ("fx", "inductor"):
        engine = mwn_engine("darts", backend)
        for _ in range(4):
            engine.train_step()
        runs[backend] = _params(engine)
    # fused kernels reorder float32 arithmetic: agreement to float32 round-off, not bitwise
    torch.testing.assert_close(runs["inductor"], runs["fx"], rtol=1e-4, atol=1e-5)


def test_inductor_failure_falls_back_to_fx_with_a_warning(monkeypatch):
    def boom(gm, example_inputs):
        raise RuntimeError("LoweringException: no lowering for aten.fancy_op.default")

    monkeypatch.setattr(torch._inductor, "compile", boom)
    engine = mwn_engine("darts", "inductor")
    with pytest.warns(UserWarning, match=r"inductor could not compile the step at aten\.fancy_op\.default.*fx backend"):
        engine.train_step()
    reference = mwn_engine("darts", "fx")
    reference.train_step()
    assert torch.equal(_params(engine), _params(reference))


def test_foreach_norms_are_split_for_inductor_with_the_same_values():
    from mlocompile.functional import tree_norm
    from passes.split_foreach_norms import split_foreach_norms
    from programs import step_graph

    def f(a, b):
        return tree_norm({"a": a, "b": b}) * 2

    a, b = torch.randn(5, 3), torch.randn(7)
    gm = step_graph(f, a, b)
    def targets():
        return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]

    assert "aten._foreach_norm.Scalar" in targets()
    want = gm(a, b)
    split_foreach_norms(gm)
    assert "aten._foreach_norm.Scalar" not in targets()
    assert targets().count("aten.linalg_vector_norm.default") == 3  # one per tensor, one over the norms
    assert torch.equal(gm(a, b), want)
