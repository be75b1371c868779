"""Auto-parallelism, written out small: trace, strategies, cost model, solver, runtime, and
automatic activation checkpointing.

* :mod:`~cai_labs.auto_parallel.trace` — ``torch.fx`` graph with shapes (fake tensors).
* :mod:`~cai_labs.auto_parallel.strategies` — legal shardings per op on a 2 x 2 mesh, costs.
* :mod:`~cai_labs.auto_parallel.cost_model` — alpha-beta and FLOP rate measured here; predicts
  step time and per-rank memory of a plan.
* :mod:`~cai_labs.auto_parallel.solver` — integer program (``scipy.optimize.milp``).
* :mod:`~cai_labs.auto_parallel.runtime` — rewritten graph with collectives, run SPMD.
* :mod:`~cai_labs.auto_parallel.checkpoint_solver` — which chain stages to recompute.
"""

from cai_labs.auto_parallel.cost_model import MachineModel, PlanCost, calibrate, plan_cost
from cai_labs.auto_parallel.runtime import MeshGroups, SPMDModule, parallelize
from cai_labs.auto_parallel.solver import MemoryBudgetError, Solution, minimum_memory, solve
from cai_labs.auto_parallel.strategies import Mesh, StrategyGraph, build_strategy_graph
from cai_labs.auto_parallel.trace import profile_saved, trace

__all__ = [
    "trace",
    "profile_saved",
    "Mesh",
    "StrategyGraph",
    "build_strategy_graph",
    "MachineModel",
    "PlanCost",
    "calibrate",
    "plan_cost",
    "solve",
    "Solution",
    "MemoryBudgetError",
    "minimum_memory",
    "MeshGroups",
    "SPMDModule",
    "parallelize",
]
