"""The block view of a step graph: one box per (problem, role, module), costs, shapes, and its bounds."""

from __future__ import annotations

import graphlib
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from torch.fx import Graph, GraphModule

import mlocompile as mlo
from mlocompile import cost, viz
from mlocompile.__main__ import main
from mlocompile.errors import ProgramError
from programs import mwn_engine

ROOT = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"
# every node statement of the DOT text (quoted ids, and the bare ``legend``)
NODE = re.compile(r'^\s*("(?:[^"\\]|\\.)*"|legend) \[(.*)\];$')
EDGE = re.compile(r'^\s*"((?:[^"\\]|\\.)*)" -> "((?:[^"\\]|\\.)*)"(?: \[label="((?:[^"\\]|\\.)*)"\])?;$')
LABEL = re.compile(r'label="((?:[^"\\]|\\.)*)"')
TOOLTIP = re.compile(r'tooltip="problem=(\w+) ')


def nodes(dot: str, problem: str | None = None) -> dict[str, list[str]]:
    """DOT node id -> its label's lines (ids unquoted); only blocks of ``problem`` if given."""
    found = {}
    for line in dot.splitlines():
        if (m := NODE.match(line)) and (problem is None or (t := TOOLTIP.search(m[2])) and t[1] == problem):
            label = LABEL.search(m[2])
            found[m[1].strip('"')] = label[1].split("\\n") if label else []
    return found


def edges(dot: str) -> list[tuple[str, str, list[str]]]:
    return [(m[1], m[2], m[3].split("\\n") if m[3] else []) for line in dot.splitlines() if (m := EDGE.match(line))]


def block(dot: str, title: str, head: str, problem: str | None = None) -> tuple[str, list[str]]:
    """The one box of step graph ``title`` (and ``problem``) whose first label line is ``head``."""
    hits = [(k, v) for k, v in nodes(dot, problem).items() if k.startswith(f"{title}/") and v and v[0] == head]
    assert len(hits) == 1, f"{head!r} in {title}: {hits}"
    return hits[0]


@pytest.fixture(scope="module")
def mwn():
    return mlo.compile(mwn_engine())


def test_mwn_blocks_per_problem_role_and_module(mwn):
    dot = mwn.to_dot("step")
    assert len(nodes(dot)) <= 60
    for title, problem in (("step_inner", "inner"), ("step_outer", "outer")):
        for module in ("inner.0", "inner.2"):
            block(dot, title, f"{module} · forward", problem)
            block(dot, title, f"{module} · grad", problem)
    for module in ("outer.0", "outer.2"):
        block(dot, "step_inner", f"{module} · forward")  # the weighting net inside the inner loss
        block(dot, "step_outer", f"{module} · hypergrad")  # its backward in darts' ±ε evaluations
    block(dot, "step_inner", "inner · update")
    block(dot, "step_outer", "outer · update")
    # darts evaluates the inner loss twice (w + εv, w - εv): two forward blocks per module, of
    # problem inner (the meta step's own forward of the classifier is problem outer's)
    for module in ("inner.0", "inner.2", "outer.0", "outer.2"):
        _, plus = block(dot, "step_outer", f"{module} · forward", "inner")
        _, minus = block(dot, "step_outer", f"{module} · forward #2", "inner")
        assert plus[1] == minus[1] == "darts (outer.v0)"
    _, own = block(dot, "step_outer", "inner.0 · forward", "outer")
    assert own[1] == "t, addmm, relu_"


def test_mwn_block_labels_carry_the_cost_model(mwn):
    dot = mwn.to_dot("step:step_inner")
    # outer.0 on 16 losses: addmm [16x1] @ [1x4] = 2*16*1*4 FLOPs; addmm and relu_ each write 16x4 floats
    _, label = block(dot, "step_inner", "outer.0 · forward")
    assert label[1:] == ["t, addmm, relu_", "3 ops · 128 FLOPs · 512 B written"]
    # every computing node is in exactly one block, and the blocks' FLOPs add up to the step's
    gm = mwn.graph_modules["step_inner"]
    blocks, where = viz.find_blocks(gm, viz.find_modules(gm, set(mwn.program.problems)))
    computing = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert sorted(where, key=computing.index) == computing
    assert sum(len(b.nodes) for b in blocks) == len(computing)
    by_block = sum(cost.estimate_node_flops(n) for b in blocks for n in b.nodes)
    assert by_block == cost.estimate_step_cost(gm).flops > 0
    ops = sum(int(v[-1].split(" ops")[0]) for k, v in nodes(dot).items() if re.fullmatch(r"step_inner/\d+", k))
    assert ops == sum(1 for n in computing if n.target.__name__ != "getitem")


def test_mwn_edges_carry_shapes_and_inputs_are_summarized(mwn):
    dot = mwn.to_dot("step:step_inner")
    fwd0, _ = block(dot, "step_inner", "inner.0 · forward")
    fwd2, _ = block(dot, "step_inner", "inner.2 · forward")  # step_inner: every block is problem inner's
    grad0, _ = block(dot, "step_inner", "inner.0 · grad")
    update, _ = block(dot, "step_inner", "inner · update")
    labels = {(u, v): lab for u, v, lab in edges(dot)}
    assert labels[fwd0, fwd2] == ["[16x8]"]  # the hidden activation
    assert labels["step_inner/in:batch", fwd0] == ["[16x6]"]
    assert labels["step_inner/in:params.inner", fwd0] == ["[8x6]", "[8]"]
    assert labels[grad0, update] == ["[8x6]", "[8]"]  # inner.0's weight and bias gradients
    # one box per input group, not per placeholder
    drawn = nodes(dot)
    assert drawn["step_inner/in:params.inner"] == ["params.inner", "4 tensors · 332 B"]
    assert drawn["step_inner/in:hyper"] == ["hyper", "4 tensors · 32 B"]
    assert not {f"step_inner/{n.name}" for n in mwn.graph_modules["step_inner"].graph.nodes} & set(drawn)
    assert len([k for k in drawn if k.startswith("step_inner/in:")]) == 5  # params x2, batch, opt, hyper


@pytest.mark.parametrize("method", ["darts", "neumann", "cg", "itd"])
def test_block_graph_is_acyclic_and_small_for_every_method(method):
    compiled = mlo.compile(mwn_engine(method))
    dot = compiled.to_dot("step")
    assert len(nodes(dot)) <= 60
    deps: dict[str, set[str]] = {}
    for u, v, _ in edges(dot):
        deps.setdefault(v, set()).add(u)
    tuple(graphlib.TopologicalSorter(deps).static_order())  # raises CycleError on a cycle
    ops = compiled.to_dot("step", detail="ops")
    assert len(nodes(ops)) > 2 * len(nodes(dot))


def test_example_step_diagram_has_at_most_60_nodes():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import data_reweighting
    finally:
        sys.path.remove(str(ROOT / "examples"))
    dot = mlo.compile(data_reweighting.build(iters=2)).to_dot("step")
    drawn = nodes(dot)
    assert len(drawn) <= 60
    assert {"outer.net.0 · forward", "outer.net.2 · hypergrad", "inner.0 · grad", "outer · update"} <= {
        v[0] for v in drawn.values() if v
    }


def test_unknown_detail_is_a_program_error(mwn, tmp_path):
    with pytest.raises(ProgramError, match=r"unknown detail 'aten'; use one of blocks, ops"):
        mwn.to_dot("step", detail="aten")
    with pytest.raises(ProgramError, match=r"unknown detail"):
        mwn.render(str(tmp_path / "step.dot"), "step", detail="aten")
    assert list(tmp_path.iterdir()) == []


def test_module_stack_wins_over_inference():
    graph = Graph()
    x = graph.placeholder("x")
    x.meta.update({"mlo.input": "batch.0", "val": torch.empty(2, 3, device="meta")})
    y = graph.call_function(torch.ops.aten.relu.default, (x,))
    y.meta.update({"mlo.problem": "p", "mlo.role": "forward", "val": torch.empty(2, 3, device="meta")})
    y.meta["nn_module_stack"] = {"L__self__": ("", torch.nn.Sequential), "L__self___0": ("p.body.0", torch.nn.ReLU)}
    z = graph.call_function(torch.ops.aten.neg.default, (y,))
    z.meta.update({"mlo.problem": "p", "mlo.role": "forward", "val": torch.empty(2, 3, device="meta")})
    graph.output([z])
    gm = GraphModule(torch.nn.Module(), graph)
    modules = viz.find_modules(gm, {"p"})
    assert modules[y] == "p.body.0" and modules[z] == "p.body.0"  # neg keeps relu's shape: inherits it
    assert modules[x] is None


def test_cli_graph_detail_option(tmp_path, capsys):
    hpo = str(ROOT / "examples" / "hpo_l2.py")
    assert main(["graph", hpo, "-o", str(tmp_path / "blocks.dot"), "--kind", "step"]) == 0
    assert main(["graph", hpo, "-o", str(tmp_path / "ops.dot"), "--kind", "step", "--detail", "ops"]) == 0
    blocks, ops = (tmp_path / "blocks.dot").read_text(), (tmp_path / "ops.dot").read_text()
    assert "legend [" in blocks and '"legend:forward"' in ops
    assert len(nodes(blocks)) < len(nodes(ops))
    with pytest.raises(SystemExit):
        main(["graph", hpo, "-o", str(tmp_path / "x.dot"), "--detail", "aten"])
    assert "invalid choice: 'aten'" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_render_svg_blocks(mwn, tmp_path):
    root = ET.parse(mwn.render(str(tmp_path / "step.svg"), "step")).getroot()
    texts = {" ".join((t.text or "").split()) for t in root.iter(f"{SVG}text")}  # dot writes nbsp
    assert {"inner.0 · forward", "inner.2 · grad", "outer · update", "darts (outer.v0)", "[16x8]"} <= texts
    clusters = {g.findtext(f"{SVG}title") for g in root.iter(f"{SVG}g") if g.get("class") == "cluster"}
    assert {"cluster_step_inner", "cluster_step_outer/inner", "cluster_step_outer/outer"} <= clusters
