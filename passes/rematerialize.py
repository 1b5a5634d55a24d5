"""Pass: rematerialize activations so the step's estimated peak memory fits a budget."""

from __future__ import annotations

import operator
import weakref
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.utils._python_dispatch import TorchDispatchMode

from mlocompile.analysis import aliased_input, estimate_peak_memory, is_impure, node_nbytes

aten = torch.ops.aten
MAX_CHAIN = 6  # nodes recomputed for one rematerialized value, at most


def _recomputable(node: Node) -> bool:
    if node.op != "call_function" or is_impure(node):
        return False
    target = node.target
    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return not target._schema.is_mutable


def _plan_chain(node: Node, at: int, pos: dict[Node, int], last_use: dict[Node, int]) -> list[Node] | None:
    """Nodes to recompute (in order) so ``node`` is available at position ``at``.

    An input is free when it is a graph input or stays alive until ``at`` anyway.
    Otherwise it is recomputed too (up to MAX_CHAIN nodes), or, if recomputing it is
    impossible, kept alive longer when that costs under half of what ``node`` frees.
    """
    chain: list[Node] = []
    extended = [0]

    def need(n: Node) -> bool:
        if n.op in ("placeholder", "get_attr") or last_use.get(n, -1) >= at or n in chain:
            return True
        if _recomputable(n) and len(chain) < MAX_CHAIN:
            mark = len(chain), extended[0]
            if all(need(a) for a in n.all_input_nodes):
                chain.append(n)
                return True
            del chain[mark[0] :]
            extended[0] = mark[1]
        extended[0] += node_nbytes(n)  # fall back to keeping it alive until ``at``
        return 2 * extended[0] <= node_nbytes(node)

    if not _recomputable(node) or not all(need(a) for a in node.all_input_nodes):
        return None
    chain.append(node)
    return chain


def _live_at(gm: GraphModule, at: int) -> tuple[list[Node], dict[Node, int], dict[Node, int]]:
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((pos[u] for u in n.users), default=pos[n]) for n in nodes}
    live = [
        n
        for n in nodes[:at]
        if n.op == "call_function"
        and last_use[n] > at
        and node_nbytes(n) > 0
        and aliased_input(n) is None
        and n.target is not operator.getitem
        and all(pos[u] > at for u in n.users if pos[u] >= at)
    ]
    return live, pos, last_use


def _rematerialize(gm: GraphModule, node: Node, at: int, pos: dict[Node, int], last_use: dict[Node, int]) -> bool:
    late = sorted((u for u in node.users if pos[u] > at), key=pos.__getitem__)
    if not late or late[0].op == "output":
        return False
    first = pos[late[0]]
    chain = _plan_chain(node, first, pos, {n: p for n, p in last_use.items() if n is not node})
    if chain is None:
        return False
    copies: dict[Node, Node] = {}
    with gm.graph.inserting_before(late[0]):
        for old in chain:
            new = gm.graph.node_copy(old, lambda a: copies.get(a, a))
            new.meta = dict(old.meta)
            new.meta["mlo.remat"] = old.name
            copies[old] = new
    for user in late:
        user.replace_input_with(node, copies[node])
    return True


def rematerialize(gm: GraphModule, *, memory_budget: float | int) -> GraphModule:
    """Recompute large intermediate values late instead of keeping them alive.

    Repeatedly finds the estimated peak, picks the largest value that is live across
    it without being used there, and recomputes it (with any inputs that would
    otherwise have to stay alive, up to a short chain) just before its first use
    after the peak. Stops when the estimated peak fits ``memory_budget`` (bytes, or a
    fraction of the unoptimized peak when <= 1) or nothing more helps. Recomputed
    ops are deterministic, so results are bitwise identical.

    Requires: a verified step graph with ``val`` meta.
    Ensures: estimated peak <= budget when reachable; recomputed nodes carry
    ``mlo.remat`` naming the node they copy.

    Before/after::

        %h = aten.relu(%a)                  %h = aten.relu(%a)
        %y = aten.mm(%h, %w)                %y = aten.mm(%h, %w)
        ...  (peak: %h kept alive)    =>    ...
        %g = aten.mm(%d, %h)                %h_1 = aten.relu(%a)
                                            %g = aten.mm(%d, %h_1)
    """
    peak, where = estimate_peak_memory(gm)
    budget = memory_budget * peak if isinstance(memory_budget, float) and memory_budget <= 1 else memory_budget
    tried: set[str] = set()
    for _ in range(500):
        if peak <= budget:
            break
        at = next(i for i, n in enumerate(gm.graph.nodes) if n.name == where)
        live, pos, last_use = _live_at(gm, at)
        candidates = sorted((n for n in live if n.name not in tried), key=node_nbytes, reverse=True)
        done = False
        for node in candidates:
            tried.add(node.name)
            if _rematerialize(gm, node, at, pos, last_use):
                done = True
                break
        if not done:
            break
        gm.graph.eliminate_dead_code()
        peak, where = estimate_peak_memory(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def measure_peak_memory(fn: Any, *args: Any, exclude: frozenset[int] = frozenset()) -> int:
    """Run ``fn(*args)`` and return the peak bytes of the tensors it allocated at once.

    A dispatch mode sees every tensor an op returns; storages are counted once
    (views are free) and released when the last tensor using them is collected.
    Storages of ``args`` and those whose data pointers are in ``exclude`` (tensors
    that existed before) are not counted; the caller must keep the latter alive.
    """
    state = {"live": 0, "peak": 0}
    refs: dict[int, list[int]] = {}  # storage pointer -> [tensors alive, bytes]
    external = set(exclude) | {
        t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)
    }

    def release(key: int) -> None:
        entry = refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            state["live"] -= entry[1]
            del refs[key]

    class Tracker(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                key = t.untyped_storage().data_ptr()
                if not key or key in external:
                    continue
                if key not in refs:
                    refs[key] = [0, t.untyped_storage().nbytes()]
                    state["live"] += refs[key][1]
                    state["peak"] = max(state["peak"], state["live"])
                refs[key][0] += 1
                weakref.finalize(t, release, key)
            return out

    with Tracker():
        result = fn(*args)
    del result
    return state["peak"]
