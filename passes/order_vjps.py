"""Pass: turn each upper problem's paths into right-to-left VJP chains with shared suffixes."""

from __future__ import annotations

from torch.fx import GraphModule, Node

from mlocompile.errors import IRVerificationError
from mlocompile.program import ProgramGraph, VjpOp


def order_vjps(program: ProgramGraph) -> ProgramGraph:
    """Plan every path as a chain of vector-Jacobian products, sharing common suffixes.

    A path ``k -u2l-> l1 -l2u-> l2 -l2u-> l3`` is evaluated right to left: start from
    ``v = ∂C_k/∂θ_l3``, then ``v ← (∂θ*_l3/∂θ_l2)ᵀ v``, ``v ← (∂θ*_l2/∂θ_l1)ᵀ v``,
    ``v ← (∂θ*_l1/∂θ_k)ᵀ v``. Paths whose right ends agree share those products
    (a trie over reversed chains), so each product is computed once.

    Requires: ``program.paths`` (from ``enumerate_paths``).
    Ensures: ``program.plans[k]`` is a topologically ordered op list and
    ``program.path_ends[k][i]`` is the op whose output is path i's contribution.

    Before/after (two paths sharing the suffix ``-l2u-> mid``)::

        path top -u2l-> a -l2u-> mid         vjp top.v0 = vjp[mid](dC/dmid) -> d/da
        path top -u2l-> b -l2u-> mid   =>    vjp top.v1 = vjp[a](v0) -> d/dtop
                                             vjp top.v2 = vjp[mid](dC/dmid) -> d/db
                                             vjp top.v3 = vjp[b](v2) -> d/dtop
    """
    plans: dict[str, list[VjpOp]] = {}
    ends: dict[str, list[int]] = {}
    for upper, paths in program.paths.items():
        plan: list[VjpOp] = []
        trie: dict[tuple[str, ...], int] = {}
        ends[upper] = []
        for path in paths:
            # evaluation order: chain reversed, each hop's "prev" is the next problem up
            hops = list(reversed(path.chain))
            prevs = hops[1:] + [upper]
            source: int | None = None
            for i, (curr, prev) in enumerate(zip(hops, prevs)):
                key = tuple(hops[: i + 1]) + (prev,)
                if key not in trie:
                    trie[key] = len(plan)
                    plan.append(VjpOp(id=len(plan), source=source, curr=curr, prev=prev))
                source = trie[key]
            assert source is not None
            ends[upper].append(source)
        plans[upper] = plan
    program.plans = plans
    program.path_ends = ends
    return program


def check_no_jacobians(gm: GraphModule, sizes: dict[str, int]) -> None:
    """Raise IRVerificationError if the hypergradient machinery made a node with a Jacobian's shape (d_i × d_j).

    ``sizes`` maps each problem to its flattened parameter count; only sizes above 1
    are considered, so scalars and vectors never trip the check. Only what mlocompile
    makes is judged, never the user's own losses: a loss may build any matrix
    (``torch.diag(λ)`` is d × d), and differentiating it yields cotangents of the same
    shapes. So nodes of the user's forward (``mlo.role`` "forward") are skipped, and a
    shape that a forward value or a parameter has (or its transpose) is one no node is
    judged by; a real Jacobian of another shape is still caught.
    """
    dims = {d for d in sizes.values() if d > 1}
    if not dims:
        return
    users: set[tuple[int, ...]] = set()
    judged: list[tuple[Node, tuple[int, ...]]] = []  # matrices made by anything but the user's forward
    for node in gm.graph.nodes:  # NOTE: one walk, matrices only: most of 100,000 nodes need one lookup
        size = getattr(node.meta.get("val"), "shape", None)
        if size is None or len(size) != 2:
            continue
        shape = tuple(size)
        forward = node.meta.get("mlo.role") == "forward"
        if forward or str(node.meta.get("mlo.input", "")).startswith("params."):
            users |= {shape, shape[::-1]}
        if not forward:
            judged.append((node, shape))
    for node, shape in judged:
        if shape in users:
            continue
        if shape[0] in dims and shape[1] in dims and shape[0] * shape[1] > max(dims):
            raise IRVerificationError(
                f"node {node.name} ({node.target}) has shape {shape}, the shape of a best-response "
                "Jacobian; hypergradients must be vector-Jacobian products"
            )
