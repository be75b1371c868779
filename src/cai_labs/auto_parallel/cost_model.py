"""Step 3: a cost model calibrated on this machine, predicting step time and memory of a plan.

Time. A collective of ``n`` bytes along a mesh axis costs ``alpha + beta * n`` (the alpha-beta or
Hockney model: a fixed latency per call plus bytes over bandwidth); ``alpha`` and ``beta`` are
fitted per op (all-reduce, all-gather) and per group (axis 0, axis 1, both axes) from timed
collectives on the real ranks. A node's compute costs

    t = 2 * overhead + 3 * flops / flop_rate[kind] + 3 * bytes / mem_bw

(forward + backward: backward is about twice the forward work) in the FLOP model, kept as a
fallback. Small CPU models spend most of their time in launching ops, memory-bound work and
allocation, which FLOP counts miss; so each op is also timed as a rank runs it under each
strategy (:func:`~cai_labs.auto_parallel.profiler.profile_ops`: forward and backward at the
local shapes, collectives left out), and a node's compute is that timing when there is one.
Every price is a micro-benchmark of one collective or one op; none is fitted to the step times
of the plans the model ranks. The predicted step time of a plan is
the sum over nodes of compute and of collectives (nothing overlaps in the runtime, so sums are
the right model).

Memory per rank. Parameters and their gradients (2x the local parameter bytes; the optimizer is
not part of a forward-backward step), plus activations kept for backward, from the serial
profile of who keeps what (:func:`~cai_labs.auto_parallel.trace.profile_saved`): a value at its
local size if any op keeps it; a resharded copy at its new size if the consumer that receives it
keeps its input; each op's internal saved
tensors divided by the op's split; and the model output, which the loss keeps. This is what
:class:`cai_labs.Ledger` measures as ``peak_total`` (parameters + gradients + saved
activations; the ledger counts a storage once, however many ops keep it). It errs on the safe
side: a value kept only by consumers that each receive a resharded copy is counted as well,
so the solver stays a plain linear program in its variables. Not modelled:
transient buffers that are not kept for backward (they are freed before the peak of saved
activations at the end of forward, but an allocator sees them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from cai_labs.auto_parallel.strategies import (
    FLOAT_BYTES,
    Comm,
    Edge,
    Layout,
    NodeInfo,
    Strategy,
    StrategyGraph,
    local_shape,
    numel,
    reshard_comm,
)
from cai_labs.devices import device

if TYPE_CHECKING:
    from cai_labs.auto_parallel.runtime import MeshGroups

__all__ = [
    "MachineModel",
    "calibrate",
    "with_op_seconds",
    "busy_latency",
    "with_busy_latency",
    "replicated_plan",
    "PlanCost",
    "plan_cost",
    "node_time",
    "edge_time",
    "node_memory",
    "edge_memory",
    "value_memory",
    "comm_time",
]

GROUPS = ((0,), (1,), (0, 1))


@dataclass
class MachineModel:
    """Measured prices. ``alpha[(op, axes)]`` seconds, ``beta[(op, axes)]`` seconds per byte."""

    alpha: dict[tuple[str, tuple[int, ...]], float]
    beta: dict[tuple[str, tuple[int, ...]], float]
    flop_rate: dict[str, float]  # FLOP/s of one rank while all ranks compute, per op kind
    mem_bw: float  # bytes/s of an element-wise op on one rank
    overhead: float  # seconds to launch one small op (forward or backward)
    op_seconds: dict[tuple[str, str], float] = field(default_factory=dict)  # profiled compute
    busy_alpha: dict[tuple[str, tuple[int, ...]], float] = field(default_factory=dict)
    samples: dict[str, list] = field(default_factory=dict)  # raw timings, for the page


def _sync() -> None:
    """Wait for the rank's GPU, if it has one: a CUDA call returns before the kernel ends."""
    if device().type == "cuda":
        torch.cuda.synchronize()


def _typical_time(fn: Callable[[], object], reps: int) -> float:
    """Median of ``reps`` timed calls after one warm-up. With more ranks than cores a call
    waits for its peers to be scheduled; the median prices that wait as a step meets it."""
    fn()
    times = []
    for _ in range(reps):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def calibrate(
    mesh_groups: MeshGroups,
    sizes: tuple[int, ...] = (1 << 8, 1 << 12, 1 << 16, 1 << 18),
    reps: int = 7,
) -> MachineModel:
    """Measure the machine on every rank (call inside ``launch``); all ranks get rank 0's model.

    ``mesh_groups`` is a :class:`~cai_labs.auto_parallel.runtime.MeshGroups`. Collectives are
    timed for ``sizes`` float32 elements on each mesh group, each after a barrier, keeping the
    median of ``reps`` calls, and ``alpha + beta * n`` is fitted by least squares (``beta`` is
    floored at 1e-12 s/byte if noise makes the fitted slope negative); compute rates are timed
    while every rank computes at once, as it will during training. Everything runs on
    :func:`cai_labs.device`.
    """
    dev = device()
    alpha, beta, samples = {}, {}, {}
    for axes in GROUPS:
        group = mesh_groups.group(axes)
        n = len(mesh_groups.ranks(axes))
        for op in ("all_reduce", "all_gather"):
            pts = []
            for size in sizes:
                x = torch.randn(size, device=dev)
                outs = [torch.empty(size, device=dev) for _ in range(n)]

                def call(
                    x: torch.Tensor = x,
                    outs: list[torch.Tensor] = outs,
                    op: str = op,
                    group: dist.ProcessGroup = group,
                ) -> None:
                    if op == "all_reduce":
                        dist.all_reduce(x, group=group)
                    else:
                        dist.all_gather(outs, x, group=group)

                dist.barrier()
                call()
                nbytes = size * FLOAT_BYTES * (n if op == "all_gather" else 1)
                pts.append((nbytes, _typical_time(call, reps)))
            b, a = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)
            alpha[(op, axes)], beta[(op, axes)] = max(float(a), 1e-6), max(float(b), 1e-12)
            samples[f"{op} {axes}"] = pts
    dist.barrier()
    flop_rate = {}
    lin, xs = torch.nn.Linear(256, 256).to(dev), torch.randn(512, 256, device=dev)
    flop_rate["matmul"] = (
        3 * 2 * 512 * 256 * 256 / _typical_time(lambda: lin(xs).sum().backward(), reps)
    )
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, bias=False).to(dev)
    xc = torch.randn(8, 32, 8, 8, device=dev)
    flop_rate["conv"] = (
        3 * 2 * xc.numel() * 32 * 9 / _typical_time(lambda: conv(xc).sum().backward(), reps)
    )
    big = torch.randn(1 << 20, device=dev)
    mem_bw = 3 * big.numel() * FLOAT_BYTES / _typical_time(lambda: big + big, reps)
    lin = torch.nn.Linear(4, 4).to(dev)
    xs = torch.randn(2, 4, device=dev)
    overhead = _typical_time(lambda: lin(xs).sum().backward(), reps) / 6  # 3 ops, fwd + bwd
    model = MachineModel(alpha, beta, flop_rate, mem_bw, overhead, samples=samples)
    box = [model]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def busy_latency(
    mesh_groups: MeshGroups, reps: int = 15, work: int = 256
) -> dict[tuple[str, tuple[int, ...]], float]:
    """Latency of a small collective between bursts of compute, per op and mesh group.

    In a training step a rank reaches a collective after computing, and with more ranks than
    cores its peers may be descheduled then: the call waits for them. Here every rank
    alternates a matrix product (``work`` x ``work``) and a small collective, and the median
    time inside the collective is that latency. A micro-benchmark, like the fits above.
    """
    dev = device()
    a, b = torch.randn(2 * work, work, device=dev), torch.randn(work, work, device=dev)
    out = {}
    for axes in GROUPS:
        group = mesh_groups.group(axes)
        n = len(mesh_groups.ranks(axes))
        x = torch.randn(256, device=dev)
        outs = [torch.empty(256, device=dev) for _ in range(n)]
        for op in ("all_reduce", "all_gather"):
            dist.barrier()
            times = []
            for _ in range(reps + 1):
                a @ b
                _sync()
                start = time.perf_counter()
                if op == "all_reduce":
                    dist.all_reduce(x, group=group)
                else:
                    dist.all_gather(outs, x, group=group)
                _sync()
                times.append(time.perf_counter() - start)
            out[(op, axes)] = float(np.median(times[1:]))
    box = [out]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def with_busy_latency(
    m: MachineModel, latency: dict[tuple[str, tuple[int, ...]], float]
) -> MachineModel:
    """A copy of ``m`` whose collectives cost at least ``latency`` (see :func:`busy_latency`)."""
    return replace(m, busy_alpha=dict(latency))


def comm_time(c: Comm, m: MachineModel) -> float:
    key = (c.op, c.axes)
    return max(m.alpha[key], m.busy_alpha.get(key, 0.0)) + m.beta[key] * c.nbytes


def with_op_seconds(m: MachineModel, op_seconds: dict[tuple[str, str], float]) -> MachineModel:
    """A copy of ``m`` that prices compute by the profiled ``{(node, strategy): seconds}``."""
    return replace(m, op_seconds=dict(op_seconds))


def node_time(s: Strategy, m: MachineModel, op: str = "", node: str = "") -> dict[str, float]:
    """Predicted seconds of one node per step: ``{"compute": ..., "comm": ...}``; compute is the
    profiled time of ``(node, s.name)`` if ``m`` has one, else the FLOP model's."""
    if op in ("placeholder", "output"):
        return {"compute": 0.0, "comm": 0.0}
    compute = m.op_seconds.get((node, s.name))
    if compute is None:
        compute = 2 * m.overhead + 3 * s.flops / m.flop_rate[s.kind] + 3 * s.bytes_moved / m.mem_bw
    return {"compute": compute, "comm": sum(comm_time(c, m) for c in s.comm)}


def edge_time(sg: StrategyGraph, e: Edge, src: Layout, dst: Layout, m: MachineModel) -> float:
    return sum(comm_time(c, m) for c in reshard_comm(e.shape, src, dst, sg.mesh, e.needs_grad))


def _bytes(shape: tuple[int, ...] | None, layout: Layout, sg: StrategyGraph) -> int:
    return numel(local_shape(shape, layout, sg.mesh)) * FLOAT_BYTES if shape else 0


def node_memory(info: NodeInfo, s: Strategy, sg: StrategyGraph) -> dict[str, float]:
    """Bytes per rank of node ``info`` under ``s``: params+grads, saved activations (its internal
    ones, and its output at local size if any op keeps it)."""
    act = info.internal_saved / s.split
    if info.value_saved:
        act += value_memory(info, s, sg)
    return {"params": 2.0 * s.param_bytes, "activations": act}


def value_memory(info: NodeInfo, s: Strategy, sg: StrategyGraph) -> float:
    """Bytes of the node's output at its local size (counted once if anyone keeps it as is)."""
    return float(_bytes(info.shape, s.out_layout, sg)) if info.shape is not None else 0.0


def edge_memory(sg: StrategyGraph, e: Edge, src: Layout, dst: Layout) -> float:
    """A resharded copy kept by its consumer (an unchanged value is counted by its producer)."""
    if src == dst or not e.consumer_saves:
        return 0.0
    return float(_bytes(e.shape, dst, sg))


@dataclass
class PlanCost:
    """Predicted per-step seconds and per-rank bytes of one plan, with a per-node breakdown."""

    time: float
    compute: float
    comm: float
    memory: float
    params: float
    activations: float
    rows: list[dict] = field(default_factory=list)


def plan_cost(sg: StrategyGraph, m: MachineModel, plan: dict[str, int]) -> PlanCost:
    """Predict a plan (``{node name: strategy index}``) with the model above."""
    compute = comm = params = acts = 0.0
    rows = []
    for name, info in sg.nodes.items():
        s = info.strategies[plan[name]]
        t = node_time(s, m, info.op, name)
        mem = node_memory(info, s, sg)
        compute += t["compute"]
        comm += t["comm"]
        params += mem["params"]
        acts += mem["activations"]
        rows.append({"node": name, "op": info.op, "strategy": s.name, **t, **mem})
    for e in sg.edges:
        src = sg.strategy(plan, e.src).out_layout
        dst = sg.strategy(plan, e.dst).in_layouts[e.pos]
        comm += edge_time(sg, e, src, dst, m)
        acts += edge_memory(sg, e, src, dst)
    return PlanCost(compute + comm, compute, comm, params + acts, params, acts, rows)


def replicated_plan(sg: StrategyGraph) -> dict[str, int]:
    """Every node replicated on every rank: the serial program run four times."""
    plan = {}
    for name, info in sg.nodes.items():
        plan[name] = next(i for i, s in enumerate(info.strategies) if set(s.roles) == {"R"})
    return plan
