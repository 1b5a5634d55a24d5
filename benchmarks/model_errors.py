"""Hypergradient error on real models, per model x method x backend, in float64.

    python benchmarks/model_errors.py [--inductor]

For every case of the test corpus (tests/corpus.py: MLP, conv + BatchNorm + dropout,
LSTM, TransformerEncoder, tied and frozen weights, Adam(amsgrad) under itd) prints
the relative error of the upper problem's hypergradient against the hand-written
``torch.autograd`` reference (tests/reference.py), for eager and fx (and inductor
with ``--inductor``; ~30 s of compiling per case). itd cases follow two live lower
steps, so with dropout the reference is the trajectory that actually happened. An
error, not a number, means the backend raised. ``tests/test_models.py`` asserts
the same quantities.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_models  # noqa: E402

import corpus  # noqa: E402


def error(model: str, method: str, backend: str) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if method == "itd":
                got, want = test_models.itd_case(model, backend)[:2]
            else:
                got, want = test_models.implicit_case(model, method, backend)
    except Exception as exc:  # report, do not stop: the table is the point
        return f"{type(exc).__name__}"
    return f"{test_models.rel(got, want):.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inductor", action="store_true", help="also compile every case with inductor (slow)")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    backends = ["eager", "fx"] + (["inductor"] if args.inductor else [])
    print("| model | method | " + " | ".join(backends) + " |")
    print("|---|---|" + "---|" * len(backends))
    for model, method in corpus.CASES:
        cells = [error(model, method, b) for b in backends]
        print(f"| {model} | {method} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
