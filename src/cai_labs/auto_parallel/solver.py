"""Step 4: choose one strategy per node, minimising predicted step time under a memory budget.

Why an integer program, not dynamic programming: ResNet's residual branches and the GPT block's
skip connections make the graph a DAG, not a chain, and a value feeding two consumers ties their
choices together; a DP over a chain would have to cut those ties. The exact formulation stays
small because the cost of an edge depends only on the *layouts* at its two ends, not on which
strategies produced them:

* ``x[n, s]`` binary: node ``n`` runs strategy ``s``; ``sum_s x[n, s] = 1``.
* ``z[e, l, m]`` continuous in ``[0, 1]``: edge ``e`` carries layout ``l`` out of its source and
  needs layout ``m`` at its destination. Its row sums equal the source's choice of ``l``
  (``sum_m z[e, l, m] = sum_{s: out(s) = l} x[src, s]``) and its column sums the destination's
  choice of ``m``. With 0/1 marginals these transport constraints force ``z`` to 0/1 as well, so
  ``z`` need not be declared integer.
* minimise ``sum x * (compute + op collectives) + sum z * (resharding collectives)`` subject to
  ``sum x * memory + sum z * (resharded copies kept) <= budget``.

This is the formulation of Alpa's intra-op pass and Colossal-AI's auto-parallel solver, solved
exactly by HiGHS through :func:`scipy.optimize.milp`.

The fastest plan is solved first, without the budget row; if it fits, it is the answer. Without
the budget row HiGHS proves the optimum in about a second for ResNet-50's 177 nodes. A budget
close to the smallest feasible one turns the memory row into a hard knapsack;
if HiGHS reaches ``time_limit`` before proving the optimum, :func:`solve` also tries a Lagrangian
relaxation: it minimises ``time + lam * memory`` without the budget row (fast, like the
unconstrained problem) and bisects ``lam`` on a log scale for the smallest price whose plan fits.
The better of that plan and HiGHS's best so far is returned; it fits the budget but is not proven
optimal, and ``Solution.method`` says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from cai_labs.auto_parallel.cost_model import (
    MachineModel,
    PlanCost,
    edge_memory,
    edge_time,
    node_memory,
    node_time,
    plan_cost,
)
from cai_labs.auto_parallel.strategies import Edge, NodeInfo, Strategy, StrategyGraph

__all__ = ["Solution", "solve", "MemoryBudgetError", "minimum_memory"]


class MemoryBudgetError(ValueError):
    """No plan fits the per-rank memory budget; ``minimum`` is the smallest that would."""

    def __init__(self, budget: float, minimum: float) -> None:
        self.budget, self.minimum = budget, minimum
        super().__init__(
            f"no sharding plan fits a memory budget of {budget / 2**20:.2f} MiB per rank: the "
            f"smallest plan the strategies allow needs {minimum / 2**20:.2f} MiB. Raise "
            "memory_budget, use a smaller batch, or add activation checkpointing."
        )


@dataclass
class Solution:
    """The chosen plan (``{node: strategy index}``), its predicted cost and the solver's time."""

    plan: dict[str, int]
    cost: PlanCost
    seconds: float
    method: str = "exact"  # or "lagrangian" (fits the budget, optimality not proven)


Allowed = Callable[[NodeInfo, Strategy], bool]


class _Problem:
    """Columns (cost, memory, bounds, integrality) and equality rows of the MILP, in order."""

    def __init__(self) -> None:
        self.cost: list[float] = []
        self.mem: list[float] = []
        self.ub: list[float] = []
        self.integrality: list[int] = []
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.rhs: list[float] = []

    def column(self, cost: float, mem: float, ub: float, integer: bool) -> int:
        self.cost.append(cost)
        self.mem.append(mem)
        self.ub.append(ub)
        self.integrality.append(int(integer))
        return len(self.cost) - 1

    def row(self, entries: list[tuple[int, float]], rhs: float) -> None:
        r = len(self.rhs)
        for c, v in entries:
            self.rows.append(r), self.cols.append(c), self.vals.append(v)
        self.rhs.append(rhs)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, list[LinearConstraint], Bounds, np.ndarray]:
        n_rows, n_cols = len(self.rhs), len(self.cost)
        a_eq = coo_array((self.vals, (self.rows, self.cols)), shape=(n_rows, n_cols)).tocsr()
        rhs = np.array(self.rhs)
        bounds = Bounds(np.zeros(n_cols), np.array(self.ub))
        eq = [LinearConstraint(a_eq, rhs, rhs)]
        return np.array(self.cost), np.array(self.mem), eq, bounds, np.array(self.integrality)


def _node_columns(
    p: _Problem, sg: StrategyGraph, name: str, m: MachineModel, allowed: Allowed | None
) -> list[int]:
    """One binary column per strategy of node ``name`` (upper bound 0 if not allowed)."""
    info = sg.nodes[name]
    ok = [allowed is None or allowed(info, s) for s in info.strategies]
    if not any(ok):
        raise ValueError(
            f"node {name} ({info.op}) has no allowed strategy; "
            f"it has {[s.name for s in info.strategies]}"
        )
    out = []
    for i, s in enumerate(info.strategies):
        t = node_time(s, m, info.op, name)
        mm = node_memory(info, s, sg)
        out.append(
            p.column(t["compute"] + t["comm"], mm["params"] + mm["activations"], float(ok[i]), True)
        )
    return out


def _edge_rows(p: _Problem, sg: StrategyGraph, e: Edge, m: MachineModel, xcol: dict) -> None:
    """Columns ``z[lo, li]`` of an edge (its layout pair), tied to both ends' choices."""
    src_s, dst_s = sg.nodes[e.src].strategies, sg.nodes[e.dst].strategies
    outs = sorted({s.out_layout for s in src_s})
    ins = sorted({s.in_layouts[e.pos] for s in dst_s})
    zcol = {
        (lo, li): p.column(edge_time(sg, e, lo, li, m), edge_memory(sg, e, lo, li), 1.0, False)
        for lo in outs
        for li in ins
    }
    for lo in outs:  # row sums = source's choice of output layout
        mine = [(xcol[(e.src, i)], -1.0) for i, s in enumerate(src_s) if s.out_layout == lo]
        p.row([(zcol[(lo, li)], 1.0) for li in ins] + mine, 0.0)
    for li in ins:  # column sums = destination's choice of input layout
        mine = [(xcol[(e.dst, i)], -1.0) for i, s in enumerate(dst_s) if s.in_layouts[e.pos] == li]
        p.row([(zcol[(lo, li)], 1.0) for lo in outs] + mine, 0.0)


def _build(
    sg: StrategyGraph, m: MachineModel, allowed: Allowed | None
) -> tuple[
    np.ndarray, np.ndarray, list[LinearConstraint], Bounds, np.ndarray, dict[tuple[str, int], int]
]:
    p = _Problem()
    xcol: dict[tuple[str, int], int] = {}
    for name in sg.nodes:
        for i, c in enumerate(_node_columns(p, sg, name, m, allowed)):
            xcol[(name, i)] = c
    for name in sg.nodes:  # every node picks exactly one strategy
        p.row([(xcol[(name, i)], 1.0) for i in range(len(sg.nodes[name].strategies))], 1.0)
    for e in sg.edges:
        _edge_rows(p, sg, e, m, xcol)
    return (*p.arrays(), xcol)


def solve(
    sg: StrategyGraph,
    machine: MachineModel,
    memory_budget: float | None = None,
    allowed: Allowed | None = None,
    time_limit: float = 10.0,
    mip_gap: float = 1e-2,
) -> Solution:
    """The plan of least predicted step time whose predicted per-rank memory fits the budget.

    Args:
        sg: strategies and edges of the traced graph.
        machine: the calibrated :class:`~cai_labs.auto_parallel.cost_model.MachineModel`.
        memory_budget: bytes per rank (parameters + gradients + saved activations); None = no
            limit.
        allowed: optional filter ``(node, strategy) -> bool``, e.g. to ask for the best pure
            data-parallel plan.
        time_limit, mip_gap: HiGHS stops at ``time_limit`` seconds or once the plan is provably
            within ``mip_gap`` (relative) of the optimum.

    Raises:
        MemoryBudgetError: (a ``ValueError``) no plan fits; it says the smallest budget that
            would.
    """
    if memory_budget is not None and memory_budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes; got {memory_budget}")
    start = time.perf_counter()
    cost, mem, eq, bounds, integrality, xcol = _build(sg, machine, allowed)
    options = {"time_limit": time_limit, "mip_rel_gap": mip_gap}
    res = milp(cost, constraints=eq, integrality=integrality, bounds=bounds, options=options)
    method = "exact (time limit: best found)" if res.status == 1 else "exact"
    if res.x is not None and memory_budget is not None and res.x @ mem > memory_budget:
        # The fastest plan does not fit: solve again with the budget row.
        budget_row = LinearConstraint(mem[None, :], -np.inf, memory_budget)
        res = milp(
            cost,
            constraints=[*eq, budget_row],
            integrality=integrality,
            bounds=bounds,
            options=options,
        )
        if res.status == 1:  # time limit: not proven optimal
            found = [(res.x, "exact (time limit: best found)")] if res.x is not None else []
            x = _lagrangian(cost, mem, eq, integrality, bounds, memory_budget, options)
            if x is not None:
                found.append((x, "lagrangian"))
            if found:
                x, method = min(found, key=lambda f: f[0] @ cost)
                res = type("Result", (), {"x": x})()
        if res.x is None:
            low = milp(mem, constraints=eq, integrality=integrality, bounds=bounds, options=options)
            if low.x is not None and low.fun > memory_budget:
                raise MemoryBudgetError(memory_budget, float(low.fun))
    if res.x is None:
        raise RuntimeError(f"the solver found no plan: {getattr(res, 'message', '')}")
    plan = {}
    for (name, i), c in xcol.items():
        if res.x[c] > 0.5:
            plan[name] = i
    return Solution(plan, plan_cost(sg, machine, plan), time.perf_counter() - start, method)


def minimum_memory(sg: StrategyGraph, machine: MachineModel) -> float:
    """Predicted per-rank bytes of the plan that needs the least memory (any time)."""
    cost, mem, eq, bounds, integrality, _ = _build(sg, machine, None)
    res = milp(
        mem, constraints=eq, integrality=integrality, bounds=bounds, options={"time_limit": 60.0}
    )
    return float(res.fun)


def _lagrangian(
    cost: np.ndarray,
    mem: np.ndarray,
    eq: list[LinearConstraint],
    integrality: np.ndarray,
    bounds: Bounds,
    budget: float,
    options: dict[str, float],
    iters: int = 8,
) -> np.ndarray | None:
    """Bisect the memory price ``lam`` (log scale) for the cheapest plan of ``cost + lam*mem``
    that fits ``budget``; None if even the memory-only objective does not fit."""

    def plan_at(lam: float) -> np.ndarray | None:
        r = milp(
            cost + lam * mem,
            constraints=eq,
            integrality=integrality,
            bounds=bounds,
            options=options,
        )
        return r.x

    scale = max(cost.sum(), 1e-12) / max(mem.sum(), 1.0)
    lo, hi = -6.0, 6.0  # log10 of lam / scale
    best = plan_at(10**hi * scale)
    if best is None or best @ mem > budget:
        return None
    for _ in range(iters):
        mid = (lo + hi) / 2
        x = plan_at(10**mid * scale)
        if x is not None and x @ mem <= budget:
            best, hi = x, mid
        else:
            lo = mid
    return best
