"""Auto-parallel's op profiler: every (node, strategy) timed at its local shapes, with no
communication in the timing, and the cost model pricing compute by it (no fitted factor)."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from cai_labs import Ledger, launch
from cai_labs.auto_parallel import (
    MachineModel,
    Mesh,
    build_strategy_graph,
    cost_model,
    plan_cost,
    profiler,
    trace,
)
from cai_labs.auto_parallel.cost_model import replicated_plan, with_op_seconds
from cai_labs.auto_parallel.strategies import local_shape
from cai_labs.auto_parallel.trace import node_shape, profile_saved
from cai_labs.models.gpt import Block, GPTConfig

MESH = Mesh((2, 2))
GROUPS = ((0,), (1,), (0, 1))
torch.set_num_threads(1)


def _gpt_graph():
    torch.manual_seed(0)
    model, x = Block(GPTConfig(d_model=32, seq_len=8, n_heads=4)), torch.randn(4, 8, 32)
    gm = trace(model, x)
    return build_strategy_graph(gm, MESH, profile_saved(gm, x))


def _machine() -> MachineModel:
    keys = [(op, ax) for op in ("all_reduce", "all_gather") for ax in GROUPS]
    return MachineModel(
        {k: 2e-4 for k in keys}, {k: 1e-9 for k in keys}, {"matmul": 2e10, "conv": 5e9}, 5e9, 2e-5
    )


def _profile_recording(sg):
    """Profile on this rank, recording the input shapes of every timed call and the collectives."""
    seen = []
    real_runner = profiler._runner

    def runner(sg_, info, s, groups, needs_grad):
        run = real_runner(sg_, info, s, groups, needs_grad)
        return lambda: (seen.append((info.name, s.name)), run())[1]

    profiler._runner = runner
    with Ledger(track_activations=False) as ledger:
        seconds = profiler.profile_ops(sg, reps=2)
    ops = {c["op"] for c in ledger.report()["comm"]}
    return seconds, sorted(set(seen)), ops


def test_every_strategy_is_timed_once_per_key_without_communication():
    sg = _gpt_graph()
    seconds, timed, ops = launch(_profile_recording, 4, sg)
    ops_nodes = {n: i for n, i in sg.nodes.items() if i.node.op not in ("placeholder", "output")}
    pairs = {(n, s.name) for n, i in ops_nodes.items() for s in i.strategies}
    assert set(seconds) == pairs and all(v > 0 for v in seconds.values())
    keys = {profiler.op_key(sg, i, s) for i in ops_nodes.values() for s in i.strategies}
    # One timing per key (the two layer norms share theirs), shared by every pair with that key.
    assert len(timed) == len(keys) < len(pairs)
    assert seconds[("ln1", "RR")] == seconds[("ln2", "RR")]
    # Only the profiler's own bookkeeping talks: no op's collective runs while it is timed.
    assert ops <= {"barrier", "all_gather_object"}, ops


def test_the_key_holds_the_local_shapes_of_the_strategy():
    sg = _gpt_graph()
    fc1 = sg.nodes["mlp_fc1"]
    for s in fc1.strategies:
        (shape,) = profiler.op_key(sg, fc1, s)[2]
        assert shape == local_shape(node_shape(fc1.node.all_input_nodes[0]), s.in_layouts[0], MESH)
    cc = next(s for s in fc1.strategies if s.name == "CC")
    ww = next(s for s in fc1.strategies if s.name == "WW")
    assert profiler.op_key(sg, fc1, cc)[2] == ((4, 8, 32),)  # column: the whole input
    assert profiler.op_key(sg, fc1, ww)[2] == ((4, 8, 8),)  # row: a quarter of the features


def test_profiled_compute_replaces_the_flop_model():
    sg = _gpt_graph()
    m = _machine()
    plan = replicated_plan(sg)
    flop = plan_cost(sg, m, plan)
    timed = {(n, i.strategies[plan[n]].name): 1e-3 for n, i in sg.nodes.items()}
    profiled = plan_cost(sg, with_op_seconds(m, timed), plan)
    compute_nodes = sum(1 for i in sg.nodes.values() if i.op not in ("placeholder", "output"))
    assert abs(profiled.compute - 1e-3 * compute_nodes) < 1e-12
    assert profiled.compute != flop.compute and profiled.comm == flop.comm


def test_no_fitted_factor_in_the_cost_model():
    assert not hasattr(cost_model, "fit_compute_scale")
    assert "compute_scale" not in {f.name for f in dataclasses.fields(MachineModel)}


def _alone_group_size():
    groups = profiler.LocalGroups(MESH)
    return [dist.get_world_size(groups.group(ax)) for ax in GROUPS], groups.ways((0, 1))


def test_local_groups_keep_the_mesh_shape_but_hold_one_rank():
    sizes, ways = launch(_alone_group_size, 4)
    assert sizes == [1, 1, 1] and ways == 4


def _profile_with_real_groups(sg):
    from cai_labs.auto_parallel.runtime import MeshGroups

    profiler.LocalGroups = MeshGroups  # a profiler that times the ops' collectives too
    return _profile_recording(sg)[2]


def test_the_check_sees_a_profiler_that_communicates():
    ops = launch(_profile_with_real_groups, 4, _gpt_graph())
    assert "all_reduce" in ops, ops


def test_a_collective_costs_at_least_its_latency_between_compute():
    from cai_labs.auto_parallel.cost_model import comm_time, with_busy_latency
    from cai_labs.auto_parallel.strategies import Comm

    m = _machine()
    c = Comm("all_reduce", (0, 1), 4096, "bwd")
    assert comm_time(c, m) == 2e-4 + 1e-9 * 4096
    slow = with_busy_latency(m, {("all_reduce", (0, 1)): 5e-3})
    assert comm_time(c, slow) == 5e-3 + 1e-9 * 4096
    assert comm_time(Comm("all_reduce", (0,), 4096, "bwd"), slow) == comm_time(
        Comm("all_reduce", (0,), 4096, "bwd"), m
    )


def _busy(mesh):
    from cai_labs.auto_parallel.cost_model import busy_latency
    from cai_labs.auto_parallel.runtime import MeshGroups

    return busy_latency(MeshGroups(mesh), reps=3, work=64)


def test_busy_latency_is_measured_for_every_op_and_group():
    lat = launch(_busy, 4, MESH)
    assert set(lat) == {(op, ax) for op in ("all_reduce", "all_gather") for ax in GROUPS}
    assert all(v > 0 for v in lat.values())
