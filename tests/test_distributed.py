"""Data-parallel training with real processes: torchrun, 2 CPU ranks, gloo."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from programs import Meta, Reweighted

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")
WORKER = str(Path(__file__).with_name("dist_worker.py"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(scenario: str, out: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        WORKER,
        scenario,
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc = _torchrun("train", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("case", ["mwn", "chain3", "itd", "resume"])
def test_ranks_hold_identical_parameters(two_ranks, case):
    a, b = two_ranks[0][case], two_ranks[1][case]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_continues_identically(two_ranks):
    for rank in range(2):
        straight, resumed = two_ranks[rank]["resume_straight"], two_ranks[rank]["resume"]
        for key in straight:
            assert torch.equal(straight[key], resumed[key]), key


def test_ir_shows_where_gradients_are_averaged(two_ranks):
    ir = two_ranks[0]["itd_ir"]
    comm = [ln for ln in ir.splitlines() if "role=comm" in ln]
    assert any("_c10d_functional.all_reduce" in ln for ln in comm)
    assert any("wait_tensor" in ln for ln in comm)


def test_matches_single_process_average_of_shard_gradients(two_ranks):
    """Reference: one process computes each shard's gradients and averages them (float64)."""
    sys.path.insert(0, str(Path(WORKER).parent))
    import dist_worker

    torch.set_default_dtype(torch.float64)
    try:
        engine = dist_worker.mwn()
        engine.config.strategy = "default"
        inner, outer = engine.program.problems["inner"], engine.program.problems["outer"]
        shards = {}
        for name, n, bs, seed in (("inner", 64, 8, 0), ("outer", 32, 4, 1)):
            ds = dist_worker.data(n, seed)
            shards[name] = [
                list(
                    torch.utils.data.DataLoader(
                        ds, batch_size=bs, sampler=torch.utils.data.DistributedSampler(ds, 2, r, shuffle=False)
                    )
                )
                for r in range(2)
            ]
        for step in range(10):
            for name, problem in (("inner", inner), ("outer", outer)):
                grads = []
                for r in range(2):
                    inner.cur_batch = shards["inner"][r][step % len(shards["inner"][r])]
                    batch = shards[name][r][step % len(shards[name][r])]
                    grads.append(engine.gradients(name, batch))
                named = dict(problem.module.named_parameters())
                for k, p in named.items():
                    p.grad = (grads[0][k] + grads[1][k]) / 2
                problem.optimizer.step()
                problem.optimizer.zero_grad()
        got = two_ranks[0]["mwn"]
        for name, problem in (("inner", inner), ("outer", outer)):
            for k, v in problem.module.state_dict().items():
                torch.testing.assert_close(got[f"{name}.{k}"], v, rtol=1e-10, atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)
    assert Meta and Reweighted


def test_a_failing_rank_brings_the_group_down(tmp_path):
    start = time.monotonic()
    proc = _torchrun("fail", tmp_path, timeout=200)
    assert proc.returncode != 0
    assert "NonFiniteError" in proc.stderr + proc.stdout
    assert time.monotonic() - start < 180  # no hang until the collective timeout of a stuck peer


def test_command_line_launcher(tmp_path):
    root = Path(WORKER).parents[1]
    cmd = [
        sys.executable,
        "-m",
        "mlocompile",
        "run",
        str(root / "examples" / "hpo_l2.py"),
        "--iters",
        "10",
        "--nproc",
        "2",
        "--out",
        str(tmp_path / "run"),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[validation] step 10" in proc.stdout
    assert (tmp_path / "run" / "ir.txt").exists()
    assert proc.stdout.count("wrote ") == 5  # rank 0 alone writes the artifacts
