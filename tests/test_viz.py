"""Graphviz diagrams: DOT content of the problem and step graphs, determinism, and rendering."""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET
from textwrap import dedent

import pytest
import torch

import mlocompile as mlo
from mlocompile import viz
from mlocompile.errors import MLOError, ProgramError
from mlocompile.ir import ROLES
from programs import Vec, chain_engine, mwn_engine

NODE = re.compile(r'^\s*("(?:[^"\\]|\\.)*") (\[.*\]);$')
EDGE = re.compile(r'^\s*("(?:[^"\\]|\\.)*") -> ("(?:[^"\\]|\\.)*")(?: (\[.*\]))?;$')
ATTR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^,\]]+)')
SVG = "{http://www.w3.org/2000/svg}"


def unquote(text: str) -> str:
    """Undo DOT quoting; label escapes such as \\n and \\l stay as written."""
    return re.sub(r'\\(["\\])', r"\1", text[1:-1]) if text.startswith('"') else text


def attrs(text: str | None) -> dict[str, str]:
    return {k: unquote(v) for k, v in ATTR.findall(text or "")}


def dot_nodes(dot: str) -> dict[str, dict[str, str]]:
    return {unquote(m[1]): attrs(m[2]) for line in dot.splitlines() if (m := NODE.match(line))}


def dot_edges(dot: str) -> list[tuple[str, str, dict[str, str]]]:
    return [(unquote(m[1]), unquote(m[2]), attrs(m[3])) for line in dot.splitlines() if (m := EDGE.match(line))]


@pytest.fixture(scope="module")
def mwn():
    return mlo.compile(mwn_engine())


@pytest.fixture(scope="module")
def chain3():
    return mlo.compile(chain_engine("darts", "fx", levels=3))


# --- the problem graph ---------------------------------------------------------------------------
def test_program_dot_bilevel_golden(mwn):
    expected = dedent(r"""
        digraph program {
          graph [rankdir=TB, nodesep=0.6, ranksep=0.8, fontname="Helvetica"];
          node [shape=box, style="rounded,filled", fillcolor="#f5f5f5", fontname="Helvetica"];
          edge [fontname="Helvetica", fontsize=10];
          { rank=same; "level 1" [shape="plaintext", style="", fontcolor="gray40"];
            "problem:outer" [label="outer\nlevel 1 · darts"];
          }
          { rank=same; "level 0" [shape="plaintext", style="", fontcolor="gray40"];
            "problem:inner" [label="inner\nlevel 0 · darts"];
          }
          "level 1" -> "level 0" [style=invis];
          "level 0" -> "paths" [style=invis];
          "problem:outer" -> "problem:inner" [label="u2l", color="#ff0000", fontcolor="#ff0000", penwidth="1.6"];
          "problem:inner" -> "problem:outer" [label="l2u", color="#008000", fontcolor="#008000", penwidth="1.6", constraint="false"];
          "paths" [shape="note", style="", label="hypergradient paths:\l  outer -u2l-> inner\lVJP plan:\l  outer.v0 = vjp[inner (darts)](dC/dinner) -> d/douter\l"];
        }
        """).lstrip()
    assert mwn.to_dot() == expected
    assert mwn.to_dot("program") == expected


def test_program_dot_three_levels(chain3):
    dot = chain3.to_dot()
    nodes = dot_nodes(dot)
    for i in range(3):
        assert nodes[f"problem:p{i}"]["label"] == f"p{i}\\nlevel {i} · darts"
    edges = {(u, v): a for u, v, a in dot_edges(dot)}
    red = {(u, v) for (u, v), a in edges.items() if a.get("color") == "#ff0000"}
    green = {(u, v) for (u, v), a in edges.items() if a.get("color") == "#008000"}
    assert red == {("problem:p1", "problem:p0"), ("problem:p2", "problem:p1")}
    assert green == {("problem:p0", "problem:p1"), ("problem:p1", "problem:p2")}
    assert all(edges[e]["label"] == "u2l" for e in red) and all(edges[e]["label"] == "l2u" for e in green)
    # one rank=same group per level, highest level first, each holding exactly its problems
    groups = re.findall(r"\{ rank=same; \"level (\d+)\".*?\n((?:    .*\n)*?)  \}", dot)
    assert [int(lvl) for lvl, _ in groups] == [2, 1, 0]
    for lvl, body in groups:
        assert re.findall(r'"problem:(\w+)"', body) == [f"p{lvl}"]
    paths = nodes["paths"]["label"].split("\\l")
    assert "  p1 -u2l-> p0" in paths and "  p2 -u2l-> p1" in paths
    assert "  p2.v0 = vjp[p1 (darts)](dC/dp1) -> d/dp2" in paths


class MamlInner(mlo.ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        return ((x @ self.module() - y) ** 2).mean()

    def on_inner_loop_start(self):
        self.load_parameters_from(self.outer)


class MamlOuter(mlo.ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        return ((x @ self.inner() - y) ** 2).mean()


def test_program_dot_labels_maml_init_edge():
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, generator=g), torch.randn(8, generator=g)) for _ in range(2)]
    w, theta = Vec(torch.zeros(3)), Vec(torch.ones(3))
    inner = MamlInner(
        "inner",
        mlo.Config(type="itd", unroll_steps=2),
        w,
        torch.optim.SGD(w.parameters(), lr=0.1),
        train_data_loader=data,
    )
    outer = MamlOuter(
        "outer", mlo.Config(), theta, torch.optim.SGD(theta.parameters(), lr=0.1), train_data_loader=data[:1]
    )
    deps = {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}
    dot = mlo.compile(mlo.Engine([outer, inner], mlo.EngineConfig(compile="fx"), deps)).to_dot()
    edges = {(u, v): a for u, v, a in dot_edges(dot)}
    assert edges["problem:outer", "problem:inner"]["label"] == "u2l (init)"
    assert edges["problem:inner", "problem:outer"]["label"] == "l2u"
    assert dot_nodes(dot)["problem:inner"]["label"] == "inner\\nlevel 0 · itd"


# --- step graphs, every aten node (detail="ops"; the default block view: test_viz_blocks.py) ------
def test_role_colors_cover_every_role():
    assert set(viz.ROLE_COLORS) == set(ROLES)
    assert len(set(viz.ROLE_COLORS.values())) == len(ROLES)


def test_step_dot_clusters_colours_and_edges(mwn):
    dot = mwn.to_dot("step", detail="ops")
    nodes, edges = dot_nodes(dot), dot_edges(dot)
    for title, gm in mwn.graph_modules.items():
        assert f'subgraph "cluster_{title}" {{' in dot
        expected_edges = {(f"{title}/{i.name}", f"{title}/{n.name}") for n in gm.graph.nodes for i in n.all_input_nodes}
        assert expected_edges == {(u, v) for u, v, _ in edges if u.startswith(f"{title}/")}
        for node in gm.graph.nodes:
            drawn = nodes[f"{title}/{node.name}"]
            assert drawn["fillcolor"] == viz.ROLE_COLORS[node.meta["mlo.role"]]
            assert "aten." not in drawn["label"] and ".default" not in drawn["label"]
        # every computing node sits in the cluster of its problem
        for problem in {n.meta["mlo.problem"] for n in gm.graph.nodes if "mlo.problem" in n.meta}:
            body = re.search(rf'subgraph "cluster_{title}/{problem}" {{\n(.*?)\n    }}', dot, re.S)
            assert body is not None
            inside = set(re.findall(rf'"{title}/(\w+)" \[', body[1]))
            owned = {n.name for n in gm.graph.nodes if n.meta.get("mlo.problem") == problem}
            assert owned <= inside
    outer_step = mwn.graph_modules["step_outer"]
    hyper = [n for n in outer_step.graph.nodes if n.meta.get("mlo.role") == "hypergrad"]
    assert hyper and all(nodes[f"step_outer/{n.name}"]["fillcolor"] == viz.ROLE_COLORS["hypergrad"] for n in hyper)
    assert "method=darts" in nodes[f"step_outer/{hyper[0].name}"]["tooltip"]
    mm = next(n for n in outer_step.graph.nodes if str(n.target) == "aten.addmm.default")
    shape = "x".join(str(s) for s in mm.meta["val"].shape)
    assert nodes[f"step_outer/{mm.name}"]["label"] == f"addmm\\n[{shape}]"
    legend = {k.removeprefix("legend:"): a["fillcolor"] for k, a in nodes.items() if k.startswith("legend:")}
    assert legend == viz.ROLE_COLORS


def test_step_dot_one_graph_by_title(mwn):
    dot = mwn.to_dot("step:step_inner", detail="ops")
    assert 'subgraph "cluster_step_inner" {' in dot and "cluster_step_outer" not in dot
    assert len([k for k in dot_nodes(dot) if k.startswith("step_inner/")]) == len(
        mwn.graph_modules["step_inner"].graph.nodes
    )


def test_unknown_kind_and_title_are_program_errors(mwn):
    with pytest.raises(ProgramError, match=r"unknown kind 'ir'; use one of program, step, step:<title>"):
        mwn.to_dot("ir")
    with pytest.raises(ProgramError, match=r"no step graph named 'step_x'.*\['step_inner', 'step_outer'\]"):
        mwn.to_dot("step:step_x")


def test_dot_is_deterministic(mwn):
    again = mlo.compile(mwn_engine())
    for kind in ("program", "step"):
        for detail in viz.DETAILS:
            assert mwn.to_dot(kind, detail) == mwn.to_dot(kind, detail) == again.to_dot(kind, detail)


def test_quoting_escapes_quotes_backslashes_and_newlines():
    assert viz._q('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'
    assert viz._label(['say "hi"', "x"], "left") == '"say \\"hi\\"\\lx\\l"'


# --- rendering -----------------------------------------------------------------------------------
def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_render_dot_extension_writes_only_dot(mwn, tmp_path):
    out = mwn.render(str(tmp_path / "sub" / "prog.dot"))
    assert out == str(tmp_path / "sub" / "prog.dot")
    assert (tmp_path / "sub" / "prog.dot").read_text() == mwn.to_dot()
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["prog.dot"]


def test_render_without_graphviz_says_how_to_install(mwn, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(viz.RenderError) as err:
        mwn.render(tmp_path / "prog.svg")
    assert isinstance(err.value, MLOError)
    msg = str(err.value)
    assert "Graphviz's `dot` is not installed" in msg
    assert "apt-get install graphviz" in msg and "brew install graphviz" in msg and "conda" in msg
    assert str(tmp_path / "prog.dot") in msg
    assert (tmp_path / "prog.dot").read_text() == mwn.to_dot()
    assert not (tmp_path / "prog.svg").exists() and not leftovers(tmp_path)


def test_render_unknown_extension(mwn, tmp_path):
    with pytest.raises(viz.RenderError, match=r"end the path with one of \.dot, \.svg, \.png, \.pdf"):
        mwn.render(tmp_path / "prog.jpg")
    assert list(tmp_path.iterdir()) == []


def test_render_reports_dot_failure(mwn, tmp_path, monkeypatch):
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` executable to stand in for a failing dot")
    monkeypatch.setattr(shutil, "which", lambda name: false)
    with pytest.raises(viz.RenderError, match=r"failed \(exit 1\)"):
        mwn.render(tmp_path / "prog.png")
    assert not (tmp_path / "prog.png").exists() and not leftovers(tmp_path)


def svg_edges(root: ET.Element) -> dict[str, set[str]]:
    """Edge title ("a->b") -> stroke colours of its drawn path."""
    return {
        g.findtext(f"{SVG}title", ""): {p.get("stroke", "") for p in g.iter(f"{SVG}path")}
        for g in root.iter(f"{SVG}g")
        if g.get("class") == "edge"
    }


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_render_svg_program(chain3, tmp_path):
    out = chain3.render(tmp_path / "prog.svg")
    assert out == str(tmp_path / "prog.svg") and (tmp_path / "prog.dot").exists()
    root = ET.parse(out).getroot()
    texts = {" ".join((t.text or "").split()) for t in root.iter(f"{SVG}text")}  # dot writes nbsp
    assert {"p0", "p1", "p2", "u2l", "l2u", "p2 -u2l-> p1", "level 2 · darts"} <= texts
    edges = svg_edges(root)
    assert edges["problem:p2->problem:p1"] & {"red", "#ff0000"}
    assert edges["problem:p1->problem:p2"] & {"green", "#008000"}
    assert not leftovers(tmp_path)


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_render_svg_step_graph(mwn, tmp_path):
    root = ET.parse(mwn.render(tmp_path / "step.svg", "step:step_outer", detail="ops")).getroot()
    gm = mwn.graph_modules["step_outer"]
    titles = {g.findtext(f"{SVG}title") for g in root.iter(f"{SVG}g") if g.get("class") == "node"}
    assert {f"step_outer/{n.name}" for n in gm.graph.nodes} <= titles
    fills = {p.get("fill") for g in root.iter(f"{SVG}g") if g.get("class") == "node" for p in g.iter(f"{SVG}path")}
    assert {viz.ROLE_COLORS[r] for r in ("forward", "grad", "hypergrad", "update")} <= fills
    clusters = {g.findtext(f"{SVG}title") for g in root.iter(f"{SVG}g") if g.get("class") == "cluster"}
    assert {"cluster_step_outer/outer", "cluster_step_outer/inner", "cluster_legend"} <= clusters
