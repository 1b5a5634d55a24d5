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


def test_bernoulli_is_made_opaque_for_inductor_with_the_same_draws():
    from mlocompile.rng import BERNOULLI
    from passes.opaque_bernoulli import opaque_bernoulli
    from programs import step_graph

    def f(x):
        return x * torch.empty_like(x).bernoulli_(0.8) / 0.8

    x = torch.randn(4, 5)
    gm = step_graph(torch.func.functionalize(f), x)  # as step graphs are: bernoulli_ becomes bernoulli.p
    assert torch.ops.aten.bernoulli.p in [n.target for n in gm.graph.nodes]
    torch.manual_seed(3)
    want = gm(x)
    opaque_bernoulli(gm)
    targets = [n.target for n in gm.graph.nodes]
    assert torch.ops.aten.bernoulli.p not in targets and BERNOULLI in targets
    assert torch.Tag.nondeterministic_seeded in BERNOULLI.tags  # thread_rng_order orders it among the draws
    torch.manual_seed(3)
    assert torch.equal(gm(x), want)


def test_batchnorm_dropout_program_under_inductor_equals_fx():
    """Inductor's own lowering of ``bernoulli.p`` read the dropout mask before drawing it: this program's
    first lower loss was NaN (every step, in float32). Its itd replay also swaps generator states."""
    import txn_program

    runs = {}
    for backend in ("fx", "inductor"):
        engine = txn_program.build("itd", backend)
        for _ in range(4):
            engine.train_step()
        runs[backend] = _params(engine)
    torch.testing.assert_close(runs["inductor"], runs["fx"], rtol=1e-4, atol=1e-5)
