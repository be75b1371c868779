"""Auto-parallel: solved plans equal serial; memory within budget; checkpointing within budget.

Prices do not change correctness, so most tests use a fixed synthetic machine model instead of
calibrating (the tutorial calibrates). Correctness runs use float64 so that "equal" means equal
up to 1e-9, not "close after 53 layers of float32 rounding".
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from cai_labs import launch
from cai_labs.auto_parallel import (
    MachineModel,
    MemoryBudgetError,
    Mesh,
    MeshGroups,
    build_strategy_graph,
    calibrate,
    parallelize,
    profile_saved,
    solve,
    trace,
)
from cai_labs.auto_parallel import runtime as rt
from cai_labs.auto_parallel.checkpoint_solver import (
    CheckpointedChain,
    measure_peak,
    profile_chain,
    solve_checkpoint,
)
from cai_labs.auto_parallel.runtime import measure_step
from cai_labs.models.gpt import Block, GPTConfig
from cai_labs.models.resnet import resnet50

MESH = Mesh((2, 2))
# One thread in this process too: on a shared 2-core machine OpenMP threads of small ops spin
# against each other (measured: a ResNet step 6x slower with 2 threads under load).
torch.set_num_threads(1)
GROUPS = ((0,), (1,), (0, 1))


def synthetic_machine(alpha: float = 2e-4) -> MachineModel:
    keys = [(op, ax) for op in ("all_reduce", "all_gather") for ax in GROUPS]
    return MachineModel(
        {k: alpha for k in keys}, {k: 1e-9 for k in keys}, {"matmul": 2e10, "conv": 5e9}, 5e9, 2e-5
    )


def make(kind: str, dtype=torch.float64):
    torch.manual_seed(0)
    if kind == "gpt":
        model, x = Block(GPTConfig(d_model=32, seq_len=8, n_heads=4)), torch.randn(4, 8, 32)
    else:  # ResNet-50 depth at width 4 on 16x16 images: every layer, tiny tensors
        model, x = resnet50(width=4, seed=0), torch.randn(4, 3, 16, 16)
    return model.to(dtype), x.to(dtype)


def graph(kind: str, dtype=torch.float64):
    model, x = make(kind, dtype)
    gm = trace(model, x)
    return model, x, build_strategy_graph(gm, MESH, profile_saved(gm, x))


def _run_plans(sg, x, plans: list[dict], broken: bool = False) -> list:
    """On each rank: build the plan's program from the (forked) strategy graph and run it."""
    if broken:  # a runtime that forgets the gradient all-reduce of batch-split parameters
        rt._sync_grad = lambda *a, **k: None
    mg = MeshGroups(MESH)
    out = []
    for plan in plans:
        pm = parallelize(sg, plan, mg)
        y = pm(x)
        y.square().mean().backward()
        out.append((y.detach(), pm.full_tensors("grad")))
    return out


def _serial(kind: str):
    model, x = make(kind)
    y = model(x)
    y.square().mean().backward()
    return y.detach(), {n: p.grad for n, p in model.named_parameters()}


def _max_rel_err(grads, ref) -> float:
    assert set(grads) == set(ref)
    return max(
        (grads[n] - ref[n]).abs().max().item() / (ref[n].abs().max().item() + 1e-30) for n in ref
    )


def _budget_plans(sg, machine) -> list[dict]:
    """The unconstrained plan and one squeezed to halfway between it and the smallest plan."""
    free = solve(sg, machine)
    with pytest.raises(MemoryBudgetError) as info:
        solve(sg, machine, memory_budget=1.0)
    mid = 0.5 * (free.cost.memory + info.value.minimum)
    squeezed = solve(sg, machine, memory_budget=mid)
    assert squeezed.cost.memory <= mid
    return [free.plan, squeezed.plan]


@pytest.mark.parametrize("kind", ["gpt", "resnet"])
def test_solved_plans_equal_serial(kind):
    """Solved plans (free and memory-squeezed) on a 2 x 2 mesh: outputs and gradients = serial."""
    _, x, sg = graph(kind)
    plans = _budget_plans(sg, synthetic_machine())
    if kind == "gpt":  # any plan must be correct, not only the ones the solver likes
        rng = random.Random(0)
        plans += [
            {k: rng.randrange(len(n.strategies)) for k, n in sg.nodes.items()} for _ in range(3)
        ]
    y_ref, g_ref = _serial(kind)
    for y, grads in launch(_run_plans, 4, sg, x, plans):
        assert (y - y_ref).abs().max().item() < 1e-9 * max(1.0, y_ref.abs().max().item())
        assert _max_rel_err(grads, g_ref) < 1e-9


def test_resnet_data_parallel_plan_and_broken_runtime_is_caught():
    """The pure batch-split plan is exact; without the gradient all-reduce it is not."""
    _, x, sg = graph("resnet")
    dp = {
        k: next((i for i, s in enumerate(n.strategies) if s.roles == ("B", "B")), 0)
        for k, n in sg.nodes.items()
    }
    y_ref, g_ref = _serial("resnet")
    ((y, grads),) = launch(_run_plans, 4, sg, x, [dp])
    assert _max_rel_err(grads, g_ref) < 1e-9
    ((y, grads),) = launch(_run_plans, 4, sg, x, [dp], broken=True)
    assert (y - y_ref).abs().max().item() < 1e-9  # the forward pass is still right...
    assert _max_rel_err(grads, g_ref) > 1e-2  # ...but gradients are partial sums


MARGIN = 0.02  # measured peak may exceed the budget by at most 2 % (allocator-free accounting)


def _measure(sg, x, plans: list[dict]) -> list[float]:
    mg = MeshGroups(MESH)
    peaks = []
    for plan in plans:
        r = measure_step(parallelize(sg, plan, mg), x, steps=1)
        # The peak is not only the snapshot of parameters and gradients: the activations saved
        # in the step are in it (their count is checked against an independent one in
        # tests/test_ledger.py), so a ledger that under-counts cannot pass the budget check.
        assert r["peak_total"] == r["static"] + r["peak_activations"] > r["static"], r
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, r["peak_total"])
        peaks.append(max(every))
    return peaks


def test_plan_respects_memory_budget_and_impossible_budget_raises():
    _, x, sg = graph("gpt", torch.float32)
    machine = synthetic_machine()
    free = solve(sg, machine)
    with pytest.raises(ValueError, match="smallest plan the strategies allow needs"):
        solve(sg, machine, memory_budget=free.cost.memory * 0.05)
    with pytest.raises(MemoryBudgetError) as info:
        solve(sg, machine, memory_budget=1.0)
    budgets = [
        free.cost.memory,
        0.5 * (free.cost.memory + info.value.minimum),
        1.02 * info.value.minimum,
    ]
    plans = [solve(sg, machine, memory_budget=b).plan for b in budgets]
    for budget, peak in zip(budgets, launch(_measure, 4, sg, x, plans)):
        assert peak <= budget * (1 + MARGIN), (peak, budget)


def test_calibration_gives_positive_prices():
    m = launch(lambda: calibrate(MeshGroups(MESH), sizes=(256, 4096), reps=2), 4)
    assert all(v > 0 for v in m.alpha.values()) and all(v > 0 for v in m.beta.values())
    assert m.flop_rate["conv"] > 0 and m.flop_rate["matmul"] > 0 and m.overhead > 0


# Calibration against known prices: a virtual clock and collectives that "take" exactly
# alpha + beta * bytes on it. Every clock read also advances it by TICK, so a timed call lasts
# its price plus one TICK: the fit must recover alpha + TICK and beta.
TICK = 1e-7
TRUE_ALPHA = {"all_reduce": 3e-5, "all_gather": 7e-5}
TRUE_BETA = {"all_reduce": 4e-10, "all_gather": 9e-10}


class _VirtualMachine:
    """``time`` and ``torch.distributed`` for :func:`calibrate`, on one process, with prices
    per op and group size (the ``(0, 1)`` group has 4 ranks, axis groups 2)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += TICK
        return self.now

    def price(self, op: str, n: int) -> tuple[float, float]:
        return TRUE_ALPHA[op] * n / 2, TRUE_BETA[op] * n / 2

    def all_reduce(self, x, group):
        a, b = self.price("all_reduce", group)
        self.now += a + b * x.numel() * x.element_size()

    def all_gather(self, outs, x, group):
        a, b = self.price("all_gather", group)
        self.now += a + b * sum(o.numel() * o.element_size() for o in outs)

    def barrier(self, group=None):
        pass

    def broadcast_object_list(self, objs, src=0):
        pass


class _FakeMesh:
    def group(self, axes):
        return len(self.ranks(axes))  # the fake collectives read the size off the "group"

    def ranks(self, axes):
        return [0, 1, 2, 3] if len(axes) == 2 else [0, 1]


def _calibrate_on_virtual_machine(monkeypatch) -> MachineModel:
    from cai_labs.auto_parallel import cost_model

    vm = _VirtualMachine()
    monkeypatch.setattr(cost_model, "time", vm)
    monkeypatch.setattr(cost_model, "dist", vm)
    return calibrate(_FakeMesh(), sizes=(256, 4096, 65536), reps=2)


def test_calibration_recovers_known_alpha_and_beta(monkeypatch):
    m = _calibrate_on_virtual_machine(monkeypatch)
    assert set(m.alpha) == {(op, ax) for op in TRUE_ALPHA for ax in GROUPS}
    for (op, axes), alpha in m.alpha.items():
        a, b = _VirtualMachine().price(op, 4 if len(axes) == 2 else 2)
        # float64 least squares on 3 exact points: error a few ulps of the largest time.
        assert alpha == pytest.approx(a + TICK, rel=1e-9, abs=1e-15), (op, axes)
        assert m.beta[(op, axes)] == pytest.approx(b, rel=1e-9), (op, axes)


def test_broken_calibration_fit_is_caught(monkeypatch):
    """The audit's break: the least-squares fit replaced by a = b = -1 (then floored)."""
    from cai_labs.auto_parallel import cost_model

    monkeypatch.setattr(cost_model.np, "polyfit", lambda x, y, deg: (-1.0, -1.0))
    with pytest.raises(AssertionError):
        test_calibration_recovers_known_alpha_and_beta(monkeypatch)


def test_checkpoint_solver_peak_within_budget_across_sweep():
    torch.manual_seed(0)
    model = resnet50(width=4, seed=0)
    x = torch.randn(4, 3, 16, 16)
    stages = model.chain()
    prof = profile_chain(stages, x, reps=1)
    full = sum(p.saved_bytes for p in prof)
    plans = []
    for frac in (1.0, 0.6, 0.4):
        plan = solve_checkpoint(prof, frac * full)
        measured = measure_peak(CheckpointedChain(stages, plan.checkpointed), x)
        assert measured["peak_activations"] <= plan.predicted_peak <= frac * full
        plans.append(sum(plan.checkpointed))
    assert plans[0] < plans[-1]  # a tighter budget checkpoints more stages
    with pytest.raises(ValueError, match="needs at least"):
        solve_checkpoint(prof, 0.05 * full)
