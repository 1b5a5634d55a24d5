"""The command line: run, ir, code, graph, cost, plot, and its errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlocompile.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
HPO = str(ROOT / "examples" / "hpo_l2.py")


def test_ir_and_code_commands(capsys):
    assert main(["ir", HPO]) == 0
    ir = capsys.readouterr().out
    assert ir.startswith("program:") and "edge u2l outer -> inner" in ir and "graph step_outer:" in ir
    assert main(["code", HPO]) == 0
    code = capsys.readouterr().out
    assert "def step_outer(self," in code and "torch.ops.aten" in code


def test_run_writes_metrics_ir_code_and_diagrams(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", HPO, "--iters", "20", "--out", str(out)]) == 0
    files = set(os.listdir(out))
    assert {"ir.txt", "code.py", "metrics.jsonl", "metrics.csv", "cost.txt"} <= files
    assert {"program.dot", "step.dot"} <= files or {"program.svg", "step.svg"} <= files
    assert "edge l2u inner -> outer" in (out / "ir.txt").read_text()
    printed = capsys.readouterr().out
    assert "[inner] step 20" in printed and "[validation] step 20" in printed
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    assert main(["plot", str(out), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clear_errors(tmp_path, capsys):
    assert main(["ir", str(tmp_path / "nope.py")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.py"
    bad.write_text("def build():\n    return 42\n")
    assert main(["ir", str(bad)]) == 2
    assert "returned int, expected an mlocompile Engine" in capsys.readouterr().err
    assert main(["plot", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "mlocompile", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "mlocompile run" in proc.stdout
