"""The symbols of the symbolic cost forms: sizes of the problems a best-response VJP touches.

Each method's rule (``hypergrad.METHOD_RULES``) states its FLOPs and memory in these
symbols; ``cost`` prints them next to the measured per-step numbers.
"""

from __future__ import annotations

import sympy

# All positive integers except the cost constant c.
d, p, K, iters, B, a = sympy.symbols("d p K I B a", positive=True, integer=True)
c = sympy.Symbol("c", positive=True)
SYMBOLS: dict[str, str] = {
    "d": "parameters of the lower problem (the one whose solution is differentiated)",
    "p": "parameters of the upper problem",
    "K": "unroll steps (itd replays K optimizer steps)",
    "I": "iterations (neumann_iterations / cg_iterations)",
    "B": "batch size of the lower problem's last batch",
    "a": "activation elements per sample kept by one forward of the lower loss",
    "c": "FLOPs per sample per parameter of one forward+backward",
}
HVP_FACTOR = 2  # reverse-over-reverse VJP of a gradient ~ 2x the gradient it reverses
UPDATE_FLOPS = 4  # per-parameter FLOPs of an SGD-with-momentum update (Adam ~ 12)

G = c * B * (d + p)  # one gradient of the lower loss L(w, λ): it evaluates both problems
