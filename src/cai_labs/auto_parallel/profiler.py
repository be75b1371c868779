"""Step 3b: every op's compute, timed at the local shapes each of its strategies gives a rank.

FLOP counts miss what dominates small models on CPUs (the fixed cost of launching an op,
memory-bound element-wise work, allocation). So the cost model times each op as a rank runs it
under each strategy: the op's local module or function, forward and backward, on random inputs
of the local shapes, on every rank at once (as in training). The op's own collectives run on
groups of one rank (no communication), so a timing is compute only; collectives are priced by
the alpha-beta fits of :func:`~cai_labs.auto_parallel.cost_model.calibrate`. These are
micro-benchmarks of single ops: the plans the model ranks are never timed for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import fx

from cai_labs.auto_parallel.runtime import MeshGroups, _local_module
from cai_labs.auto_parallel.strategies import Mesh, NodeInfo, Strategy, StrategyGraph, local_shape
from cai_labs.auto_parallel.trace import node_shape
from cai_labs.devices import device

__all__ = ["LocalGroups", "op_key", "profile_ops"]

OpKey = tuple


class LocalGroups(MeshGroups):
    """A mesh's groups in which every rank is alone: shapes and chunks of the mesh, and
    collectives that do nothing (``cai_labs.comm`` skips a group of one)."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh, self.rank = mesh, dist.get_rank()
        alone = [dist.new_group([r]) for r in range(dist.get_world_size())]
        self._alone = alone[self.rank]

    def group(self, axes: tuple[int, ...]) -> dist.ProcessGroup:
        return self._alone


def op_key(sg: StrategyGraph, info: NodeInfo, s: Strategy) -> OpKey:
    """What an op's timing depends on: the op, its configuration, its local input shapes."""
    node = info.node
    if node.op == "call_module":
        what = repr(sg.gm.get_submodule(node.target))
    else:
        what = f"{getattr(node.target, '__name__', node.target)}{node.args[1:]}{node.kwargs}"
    shapes = tuple(
        local_shape(node_shape(a), lay, sg.mesh) if node_shape(a) else None
        for a, lay in zip(node.all_input_nodes, s.in_layouts)
    )
    return (node.op, what, shapes, s.roles)


def _runner(
    sg: StrategyGraph,
    info: NodeInfo,
    s: Strategy,
    groups: MeshGroups,
    needs_grad: dict[tuple[str, int], bool],
) -> Callable[[], None]:
    """A callable running the op's forward and backward once on fresh local-shaped inputs."""
    node, dev = info.node, device()
    inputs = {
        a.name: torch.randn(shape, device=dev, requires_grad=needs_grad[(node.name, pos)])
        for pos, (a, shape) in enumerate(zip(node.all_input_nodes, op_key(sg, info, s)[2]))
    }
    if node.op == "call_module":
        fn = _local_module(sg.gm.get_submodule(node.target), s, groups).to(dev)
    else:
        fn = node.target
    args = fx.node.map_arg(node.args, lambda a: inputs[a.name])
    kwargs = fx.node.map_arg(node.kwargs, lambda a: inputs[a.name])
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    backward = any(t.requires_grad for t in inputs.values()) or bool(params)

    def run() -> None:
        for t in [*inputs.values(), *params]:
            t.grad = None
        out = fn(*args, **kwargs)
        if backward:
            out.backward(torch.ones_like(out))

    return run


def _time(run: Callable[[], None], reps: int) -> float:
    """Median of ``reps`` calls after one warm-up, as the collectives are priced."""
    run()
    times = []
    for _ in range(reps):
        if device().type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device().type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def profile_ops(sg: StrategyGraph, reps: int = 5) -> dict[tuple[str, str], float]:
    """Seconds of forward + backward of every (node, strategy) on one rank, all ranks timing
    at once (call inside ``launch`` on the mesh's ranks). Ops with the same key are timed once.
    Returns ``{(node name, strategy name): seconds}``, the median over ranks."""
    groups = LocalGroups(sg.mesh)
    needs_grad = {(e.dst, e.pos): e.needs_grad for e in sg.edges}
    keys: dict[OpKey, tuple[NodeInfo, Strategy]] = {}
    owners: dict[tuple[str, str], OpKey] = {}
    for name, info in sg.nodes.items():
        if info.node.op in ("placeholder", "output"):
            continue
        for s in info.strategies:
            key = op_key(sg, info, s)
            keys.setdefault(key, (info, s))
            owners[(name, s.name)] = key
    mine = []
    dist.barrier()  # then no more: the ranks compute at once throughout, as in a step
    for info, s in keys.values():
        mine.append(_time(_runner(sg, info, s, groups, needs_grad), reps))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    seconds = dict(zip(keys, np.median(np.array(every), axis=0).tolist()))
    return {owner: seconds[key] for owner, key in owners.items()}
