"""The pass runner: every failure names the pass, the passes before it and the IR around the failing node."""

from __future__ import annotations

import pytest
import torch

import passes
from mlocompile.errors import PassError, ProgramError
from programs import step_graph


def _graph():
    return step_graph(lambda x, w: torch.relu(x @ w).sum(), torch.randn(3, 4), torch.randn(4, 2))


@pytest.fixture
def registered(monkeypatch):
    """Register a temporary graph pass under ``name``."""

    def add(name, fn):
        monkeypatch.setitem(passes.GRAPH_PASSES, name, fn)

    return add


def test_any_exception_in_a_pass_is_a_pass_error_quoting_the_ir_at_its_node(registered):
    def crash_at_relu(gm):
        for node in gm.graph.nodes:
            if node.target is torch.ops.aten.relu.default:
                raise KeyError("no rule for this op")
        return gm

    registered("crash_at_relu", crash_at_relu)
    gm = _graph()
    relu = next(n.name for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)
    with pytest.raises(PassError) as err:
        passes.run_pass(gm, "crash_at_relu", "step_p", ["simplify_no_ops"], None)
    msg = str(err.value)
    assert "pass crash_at_relu on step_p (after ['simplify_no_ops']) failed: KeyError" in msg
    assert f"IR around {relu}:" in msg
    marked = [line for line in msg.splitlines() if line.startswith(">> ")]
    assert len(marked) == 1 and f"%{relu} = aten.relu.default" in marked[0]
    assert "aten.mm.default" in msg  # the line before it is quoted too
    assert isinstance(err.value.__cause__, KeyError)


def test_a_pass_that_breaks_the_ir_fails_verification_naming_the_node(registered):
    def drop_annotations(gm):
        for node in gm.graph.nodes:
            if node.target is torch.ops.aten.mm.default:
                del node.meta["mlo.role"]
        return gm

    registered("drop_annotations", drop_annotations)
    gm = _graph()
    mm = next(n.name for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default)
    with pytest.raises(PassError, match=r"pass drop_annotations on step_p \(after nothing\) failed: node mm") as err:
        passes.run_pass(gm, "drop_annotations", "step_p", [], None)
    assert any(line.startswith(">> ") and f"%{mm} =" in line for line in str(err.value).splitlines())


def test_checks_run_through_the_runner():
    gm = step_graph(lambda a, b: a[:, None] * b[None, :], torch.randn(6), torch.randn(5))
    with pytest.raises(PassError, match=r"check check_no_jacobians on step_p .*shape of a best-response Jacobian"):
        passes.run_check(gm, "check_no_jacobians", "step_p", [], sizes={"a": 6, "b": 5})
    passes.run_check(gm, "check_no_jacobians", "step_p", [], sizes={"a": 7, "b": 8})  # other sizes: fine


def test_program_passes_run_through_the_runner(monkeypatch):
    def user_error(program):
        raise ProgramError("u2l edge a -> b has no l2u path back")

    def crash(program):
        raise RuntimeError("bug")

    monkeypatch.setitem(passes.PROGRAM_PASSES, "user_error", user_error)
    monkeypatch.setitem(passes.PROGRAM_PASSES, "crash", crash)
    with pytest.raises(ProgramError, match="no l2u path back"):  # the user's mistake: unchanged
        passes.run_program_pass(None, "user_error", [])
    with pytest.raises(PassError, match=r"program pass crash \(after \['enumerate_paths'\]\) failed: RuntimeError: bug"):
        passes.run_program_pass(None, "crash", ["enumerate_paths"])


def test_noop_rules_are_a_registry():
    from passes.simplify_no_ops import NOOP_RULES

    aten = torch.ops.aten
    assert {aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.t.default, aten.view.default} <= set(NOOP_RULES)
    assert len(NOOP_RULES[aten.add.Tensor]) == 2  # x + 0, then x + zeros


def _broken(how: str):
    """A verified step graph broken the way a buggy pass would break it."""
    gm = _graph()
    nodes = {n.target: n for n in gm.graph.nodes}
    mm, relu = nodes[torch.ops.aten.mm.default], nodes[torch.ops.aten.relu.default]
    if how == "order":
        relu.append(mm)  # mm moved after its user
    elif how == "foreign":
        other = _graph()
        outsider = next(n for n in other.graph.nodes if n.op == "placeholder")
        relu.args = (outsider,)
    elif how == "name":
        relu.name = mm.name
    elif how == "attr":
        with gm.graph.inserting_before(relu), pytest.warns(UserWarning, match="no underlying reference"):
            gm.graph.get_attr("_mlo_missing_buffer")
    elif how == "target":
        relu.target = "relu"
    return gm


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("order", "is used before it is defined"),
        ("foreign", "belongs to another graph"),
        ("name", "is defined twice"),
        ("attr", "_mlo_missing_buffer does not exist"),
        ("target", "is not callable"),
    ],
)
def test_verify_lints_what_fx_lint_checks(how, message):
    from mlocompile.errors import IRVerificationError
    from mlocompile.ir import verify

    verify(_graph())
    gm = _broken(how)
    with pytest.raises(IRVerificationError, match=f"FX lint failed: .*{message}"):
        verify(gm)
    with pytest.raises(Exception):  # noqa: B017 - fx's own lint agrees it is broken
        gm.graph.lint()


def test_verify_wants_exactly_one_output_and_annotated_nodes():
    from mlocompile.errors import IRVerificationError
    from mlocompile.ir import verify

    gm = _graph()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_after(out):
        gm.graph.output(out.args[0])
    with pytest.raises(IRVerificationError, match="step graph has 2 outputs, expected 1"):
        verify(gm)
    gm = _graph()
    gm.graph.erase_node(next(n for n in gm.graph.nodes if n.op == "output"))
    with pytest.raises(IRVerificationError, match="step graph has 0 outputs, expected 1"):
        verify(gm)
    gm = _graph()
    relu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)
    del relu.meta["mlo.problem"]
    with pytest.raises(IRVerificationError, match=f"node {relu.name} .* lacks mlo.problem/mlo.role"):
        verify(gm)
