"""
Auto-parallelism: trace, strategies, cost model, solver, runtime
================================================================

Data, tensor and pipeline parallelism each need the model rewritten by hand. *Automatic*
parallelism (Alpa, Colossal-AI's ``colossalai.auto_parallel``) starts from the ordinary,
non-distributed model and does the rewriting itself:

1. **trace** the model into a graph of ops with tensor shapes;
2. list, for every op, its legal **sharding strategies** on a device mesh, each with a compute,
   communication and memory cost, and the cost of **resharding** a tensor between layouts;
3. price those costs with a **cost model calibrated on the machine**;
4. **solve** for one strategy per op: least predicted step time under a per-device memory budget;
5. **rewrite** the graph for each rank with its shards and the collectives the plan needs, and run
   it SPMD (every rank runs the same program on its own shards), forward and backward.

Then the second half of the page does the same for memory alone: **automatic activation
checkpointing** picks which stages of the network to recompute so that activations fit a budget.

Everything runs here on 4 CPU processes arranged as a 2 x 2 mesh, on ResNet-50 (at a reduced
width) and on a GPT transformer block. What the strategies model, exactly: batch splits,
column (output-feature) and row (input-feature) splits of convolutions and linear layers, head
splits of attention, synchronised batch norm, and replication; resharding by all-gather and
slicing. Not modelled: splitting spatial or sequence dimensions, reduce-scatter outputs,
pipeline stages, overlap of communication with compute. The API docs of
:mod:`cai_labs.auto_parallel` say what each piece assumes.

**Prerequisites:** tutorial 00 (data parallel) and tutorial 01 (tensor parallel).
"""

# %%
# Set-up
# ------

import itertools
import time
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from scipy.stats import spearmanr

torch.set_num_threads(1)  # the ranks use one thread each; so does the serial reference

# %%
# The package's auto-parallel steps, one module each:

from cai_labs import build_env, device, launch
from cai_labs.auto_parallel import (
    MemoryBudgetError,
    Mesh,
    MeshGroups,
    build_strategy_graph,
    calibrate,
    minimum_memory,
    parallelize,
    plan_cost,
    profile_saved,
    solve,
    trace,
)
from cai_labs.auto_parallel.cost_model import (
    busy_latency,
    replicated_plan,
    with_busy_latency,
    with_op_seconds,
)
from cai_labs.auto_parallel.profiler import profile_ops
from cai_labs.auto_parallel.runtime import measure_step
from cai_labs.exercises import Exercises
from cai_labs.models.gpt import Block, GPTConfig
from cai_labs.models.resnet import resnet50

# %%
# The constants size everything on the page. ResNet-50 keeps its full depth (53 convolutions,
# 16 bottlenecks) at a quarter of its width and on 32 x 32 images, so that a step on a CPU rank
# takes milliseconds; raise ``RESNET_WIDTH`` to 64 for the published network.

MESH = Mesh((2, 2))  # 4 ranks: rank r sits at (r // 2, r % 2)
RESNET_WIDTH = 16  # channels of the first stage; 64 in the paper
IMAGE = 32  # input resolution
BATCH = 8  # images per step (must divide by 4 for a 4-way batch split)
GPT_CFG = GPTConfig(d_model=128, seq_len=64, n_heads=4)
GPT_BATCH = 8
MEMORY_SQUEEZE = 0.5  # budget: this far from the fastest plan's memory towards the smallest
TIMED_STEPS = {"ResNet-50": 6, "GPT block": 16}  # timed steps per plan (median reported)
CKPT_BATCH = 16  # batch for the activation-checkpointing sweep (one process)
CKPT_POINTS = 6  # budgets from the un-checkpointed activations down to the smallest feasible
SEED = 0
print(build_env.describe(ranks=MESH.size))  # where this page's numbers were measured

# %%
# Two models, each built the same way on every rank from one seed.


def make_resnet(dtype=torch.float32):
    torch.manual_seed(SEED)
    model = resnet50(width=RESNET_WIDTH, seed=SEED).to(device(), dtype)
    return model, torch.randn(BATCH, 3, IMAGE, IMAGE, dtype=dtype).to(device())


def make_gpt(dtype=torch.float32):
    torch.manual_seed(SEED)
    return Block(GPT_CFG).to(device(), dtype), torch.randn(
        GPT_BATCH, GPT_CFG.seq_len, GPT_CFG.d_model, dtype=dtype
    ).to(device())


# %%
# 1. Trace: a graph with shapes
# -----------------------------
# ``torch.fx`` records the forward as nodes; shapes come from running the graph on *fake*
# tensors (no data, no arithmetic). One real serial forward also records which values autograd
# keeps for backward: the memory model needs it.

MAKERS = {"ResNet-50": make_resnet, "GPT block": make_gpt}
graphs = {}
for name, make in MAKERS.items():
    model, x = make()
    gm = trace(model, x)
    graphs[name] = build_strategy_graph(gm, MESH, profile_saved(gm, x))
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{name}: {len(gm.graph.nodes)} nodes, {n_params:,} parameters, "
        f"ops {dict(Counter(i.op for i in graphs[name].nodes.values()).most_common(6))}"
    )

sg = graphs["GPT block"]
pd.DataFrame(
    [
        {
            "node": n,
            "op": i.op,
            "output shape": i.shape,
            "strategies": len(i.strategies),
            "kept for backward": i.value_saved,
        }
        for n, i in sg.nodes.items()
    ]
).set_index("node")

# %%
# The attention module is one node: its reshapes between ``(b, s, d)`` and ``(b, h, s, d/h)``
# are not modelled, so it gets its own strategies (batch, heads, replicate). The MLP is traced
# op by op: if the plan below pairs a column-parallel ``fc1`` with a row-parallel ``fc2``
# (Megatron's pattern), the solver found it on its own, because it avoids a reshard in between.
#
# 2. Strategies
# -------------
# A tensor's layout gives, per mesh axis, ``R`` (replicated), ``B`` (batch dim split) or ``F``
# (feature dim split). A linear layer ``y = x W^T`` can, on each axis, split the batch (``B``:
# weight replicated, its gradient all-reduced), split ``W``'s output features (``C``, column:
# ``x`` replicated, ``y`` split on features, the input gradient all-reduced in backward) or its
# input features (``W``, row: ``x`` split on features, partial ``y`` all-reduced in forward), or
# replicate (``R``). Two axes give 16 combinations; those that divide evenly are kept. Here are
# ``mlp.fc1``'s, with their per-rank forward FLOPs, parameter bytes and collectives (buffer bytes).

fc1 = sg.nodes["mlp_fc1"]
pd.DataFrame(
    [
        {
            "strategy": s.name,
            "meaning": s.describe(),
            "input layout": "".join(s.in_layouts[0]),
            "output layout": "".join(s.out_layout),
            "MFLOP/rank": s.flops / 1e6,
            "param bytes/rank": s.param_bytes,
            "collectives": "; ".join(
                f"{c.phase} {c.op} axes{c.axes} {c.nbytes:,} B" for c in s.comm
            ),
        }
        for s in fc1.strategies
    ]
).set_index("strategy").style.format({"MFLOP/rank": "{:.2f}"})

# %%
# 3. Calibrating the cost model on this machine
# ---------------------------------------------
# Every price is a micro-benchmark; none is fitted to the plans the model will rank.
# Collectives are timed on the 4 ranks for each mesh group (axis 0 = ranks ``{0, 2}``,
# ``{1, 3}``; axis 1 = ``{0, 1}``, ``{2, 3}``; both axes = all 4) and fitted to
# :math:`t(n) = \alpha + \beta n`; a small collective is also timed between bursts of compute,
# where a rank often waits for peers that share its core (the latency a step meets; the larger
# of the two latencies is used). Compute is timed op by op: each node under each of its
# strategies runs forward and backward at the local shapes that strategy gives a rank, on all 4
# ranks at once (as in training), its collectives left out
# (:func:`~cai_labs.auto_parallel.profiler.profile_ops`; ops with the same configuration and
# shapes are timed once). Small CPU models spend most of their time launching ops and in
# memory-bound work, which a FLOP count would miss.


def calibrate_worker() -> dict:
    start = time.perf_counter()
    mg = MeshGroups(MESH)
    machine = with_busy_latency(calibrate(mg), busy_latency(mg))
    op_seconds = {name: profile_ops(graphs[name]) for name in MAKERS}
    return {"machine": machine, "ops": op_seconds, "seconds": time.perf_counter() - start}


cal = launch(calibrate_worker, MESH.size)
m0 = cal["machine"]
machines = {name: with_op_seconds(m0, cal["ops"][name]) for name in MAKERS}
pd.DataFrame(
    [
        {
            "op": op,
            "mesh axes": str(axes),
            "alpha (µs)": 1e6 * m0.alpha[(op, axes)],
            "bandwidth 1/beta (MB/s)": 1e-6 / m0.beta[(op, axes)],
            "between compute (µs)": 1e6 * m0.busy_alpha[(op, axes)],
        }
        for (op, axes) in m0.alpha
    ]
).set_index(["op", "mesh axes"]).style.format("{:.1f}")

# %%
# What the op timings say, next to a FLOP count at the rate of a mid-sized matrix product:

print(f"calibration took {cal['seconds']:.1f} s on each rank")
for name in MAKERS:
    rep = replicated_plan(graphs[name])
    timed = plan_cost(graphs[name], machines[name], rep).compute
    flops = sum(i.strategies[rep[n]].flops for n, i in graphs[name].nodes.items())
    at_peak = 3 * flops / m0.flop_rate["matmul"]
    print(
        f"{name}: {len(cal['ops'][name]):,} (node, strategy) pairs timed; the serial model's "
        f"ops add up to {1e3 * timed:.1f} ms per step, {timed / at_peak:.1f}x its "
        f"{3 * flops / 1e9:.2f} GFLOP at {m0.flop_rate['matmul'] / 1e9:.1f} GFLOP/s"
    )

# %%
# Note the latency of a collective over all 4 ranks compared with one over a pair: on 2 shared
# cores, four processes must all be scheduled before it completes. This is what makes the mesh
# two-dimensional in practice too (NVLink inside a node, slower links between nodes).
#
# 4. Solving: least time under a memory budget
# --------------------------------------------
# One binary variable per (node, strategy), one continuous variable per (edge, source layout,
# destination layout) tied to them by transport constraints; minimise predicted time subject to
# predicted memory per rank <= budget, solved exactly by ``scipy.optimize.milp`` (details in
# :mod:`cai_labs.auto_parallel.solver`). First without a budget (the fastest plan), then with a
# budget ``MEMORY_SQUEEZE`` of the way from the fastest plan's memory down to the smallest
# memory any plan reaches, so that the budget really binds. (A budget near the smallest feasible one
# makes the integer program slow; past a time limit the solver falls back to a Lagrangian search
# whose plan fits but is not proven optimal, and says so. On a busy machine even the ResNet
# problem without a budget can reach the limit; the method printed says when.)

solutions, budgets, fastest = {}, {}, {}
for name in MAKERS:
    sgn, mach = graphs[name], machines[name]
    rep = plan_cost(sgn, mach, replicated_plan(sgn))
    fastest[name] = solve(sgn, mach)
    least = minimum_memory(sgn, mach)
    budgets[name] = fastest[name].cost.memory - MEMORY_SQUEEZE * (fastest[name].cost.memory - least)
    solutions[name] = s = solve(sgn, mach, memory_budget=budgets[name])
    print(
        f"{name}: replicated plan {rep.memory / 2**20:.2f} MiB/rank, fastest plan "
        f"{fastest[name].cost.memory / 2**20:.2f} MiB ({1e3 * fastest[name].cost.time:.1f} ms, "
        f"{fastest[name].method}), smallest {least / 2**20:.2f} MiB. Budget "
        f"{budgets[name] / 2**20:.2f} MiB: plan predicts {s.cost.memory / 2**20:.2f} MiB and "
        f"{1e3 * s.cost.time:.1f} ms; solved in {s.seconds:.2f} s ({s.method})"
    )

# %%
# A budget no plan can meet is an error that says what would fit:

try:
    solve(graphs["GPT block"], machines["GPT block"], memory_budget=0.1 * budgets["GPT block"])
except MemoryBudgetError as err:
    print("GPT block at a tenth of that budget:", err)

# %%
# The GPT block's plan under the budget, node by node:


def plan_table(name: str, plan: dict) -> pd.DataFrame:
    rows = []
    for n, i in graphs[name].nodes.items():
        if i.op in ("placeholder", "output"):
            continue
        s = i.strategies[plan[n]]
        rows.append(
            {
                "node": n,
                "op": i.op,
                "strategy": s.name,
                "meaning": s.describe(),
                "output layout": "".join(s.out_layout),
            }
        )
    return pd.DataFrame(rows).set_index("node")


plan_table("GPT block", solutions["GPT block"].plan)

# %%
# The ResNet-50 plan, summarised: how many nodes of each op chose each strategy (the full
# 175-row table is ``plan_table("ResNet-50", solutions["ResNet-50"].plan)``).

rt = plan_table("ResNet-50", solutions["ResNet-50"].plan)
rt.groupby(["op", "strategy"]).size().unstack(fill_value=0)

# %%
# 5. The rewritten program, run SPMD
# ----------------------------------
# :func:`~cai_labs.auto_parallel.runtime.parallelize` rebuilds the graph on every rank:
# ``Reshard`` nodes where a producer's layout differs from what its consumer needs, sharded
# modules holding this rank's slice of each weight, and gradient hooks for batch-split
# parameters. Rank 0's program for the GPT block:


def show_program() -> str:
    pm = parallelize(graphs["GPT block"], solutions["GPT block"].plan, MeshGroups(MESH))
    return pm.gm.code if dist.get_rank() == 0 else ""


print(launch(show_program, MESH.size).strip())

# %%
# **Correctness.** Both models run forward and backward under their plans on the 4 ranks;
# the output is gathered whole on every rank and the gradient slices of all ranks are put back
# together into serial-shaped tensors. This check runs in float64, so that "equal" means equal to
# about 1e-9 rather than "close after 53 layers of float32 rounding".


def correctness_worker(plans: dict) -> dict:
    mg = MeshGroups(MESH)
    out = {}
    for name, make in MAKERS.items():
        model, x = make(torch.float64)
        gm = trace(model, x)
        sgn = build_strategy_graph(gm, MESH, profile_saved(gm, x))
        pm = parallelize(sgn, plans[name], mg)
        y = pm(x)
        y.square().mean().backward()
        out[name] = (y.detach(), pm.full_tensors("grad"))
    return out


# %%
# Each model's output and gradients against the serial model's, as relative errors:

parallel = launch(correctness_worker, MESH.size, {n: s.plan for n, s in solutions.items()})
rows = []
for name, make in MAKERS.items():
    model, x = make(torch.float64)
    y = model(x)
    y.square().mean().backward()
    yp, grads = parallel[name]
    out_err = (yp - y).abs().max().item() / y.abs().max().item()
    grad_err = max(
        (grads[n] - p.grad).abs().max().item() / p.grad.abs().max().item()
        for n, p in model.named_parameters()
    )
    rows.append(
        {
            "model": name,
            "max rel. error, output": out_err,
            "max rel. error, gradients": grad_err,
            "gradient tensors": len(grads),
        }
    )
    assert out_err < 1e-9 and grad_err < 1e-9, f"{name}: parallel differs from serial"
pd.DataFrame(rows).set_index("model").style.format(
    "{:.1e}", subset=pd.IndexSlice[:, ["max rel. error, output", "max rel. error, gradients"]]
)

# %%
# 6. Predicted vs measured, and the auto plan against hand-written ones
# ---------------------------------------------------------------------
# Eight plans per model: the auto plan under the budget and with no budget, **data parallel**
# across all 4 ranks, across one mesh axis only (the other axis replicated), **1D tensor
# parallel** across all 4 ranks (GPT: Megatron's heads / column / row; ResNet: every conv
# column-parallel, everything else split on channels), **2D: data parallel on axis 0, tensor
# parallel on axis 1**, and **replicated**. A rule gives a strategy name per node; a node
# without that strategy stays replicated.


def rule_plan(name: str, rule) -> dict:
    plan = {}
    for n, i in graphs[name].nodes.items():
        names = [s.name for s in i.strategies]
        want = rule(n, i)
        plan[n] = names.index(want) if want in names else names.index("RR")
    return plan


MEGATRON = {"attn": "HH", "mlp_fc1": "CC", "mlp_act": "FF", "mlp_fc2": "WW"}


def tensor_role(name: str, n: str, i) -> str:
    """A node's 1D tensor-parallel strategy on both axes: Megatron's split for the GPT block,
    column-parallel convolutions and channel splits for ResNet; ``RR`` where there is none."""
    if name == "GPT block":
        return MEGATRON.get(n, "RR")
    return "CC" if i.op in ("Conv2d", "Linear") else "FF"


# %%
# The eight plans of each model:

plans = {}
for name in MAKERS:
    plans[name] = {
        "auto (budget)": solutions[name].plan,
        "auto (no budget)": fastest[name].plan,
        "data parallel": rule_plan(name, lambda n, i: "BB"),
        "data parallel, axis 0": rule_plan(name, lambda n, i: "BR"),
        "data parallel, axis 1": rule_plan(name, lambda n, i: "RB"),
        "1D tensor parallel": rule_plan(name, lambda n, i, m=name: tensor_role(m, n, i)),
        "DP x TP": rule_plan(name, lambda n, i, m=name: "B" + tensor_role(m, n, i)[1]),
        "replicated": replicated_plan(graphs[name]),
    }

# %%
# Each plan runs on the 4 ranks: the median of several timed steps (the GPT block's plans
# differ by milliseconds, so it gets more), then one step under the ledger for memory
# (parameters + gradients + activations saved for backward, the largest over ranks) and for
# the time spent in collectives.


def measure_worker(plans: dict) -> dict:
    mg = MeshGroups(MESH)
    out = {}
    for name, make in MAKERS.items():
        _, x = make()
        for label, plan in plans[name].items():
            r = measure_step(parallelize(graphs[name], plan, mg), x, steps=TIMED_STEPS[name])
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, r)
            out[(name, label)] = {
                "seconds": float(np.median([e["seconds"] for e in every])),
                "comm seconds": float(np.median([e["comm_seconds"] for e in every])),
                "peak": max(e["peak_total"] for e in every),
                "calls": r["comm_calls"],
            }
    return out


measured = launch(measure_worker, MESH.size, plans)

# %%
# Predicted against measured, plan by plan:

rows = []
for (name, label), m in measured.items():
    c = plan_cost(graphs[name], machines[name], plans[name][label])
    rows.append(
        {
            "model": name,
            "plan": label,
            "predicted step (ms)": 1e3 * c.time,
            "measured step (ms)": 1e3 * m["seconds"],
            "predicted comm (ms)": 1e3 * c.comm,
            "measured comm (ms)": 1e3 * m["comm seconds"],
            "collectives/step": m["calls"],
            "predicted MiB/rank": c.memory / 2**20,
            "measured MiB/rank": m["peak"] / 2**20,
        }
    )
results = pd.DataFrame(rows)
results.set_index(["model", "plan"]).style.format(precision=2)

# %%
# Rank correlation between predicted and measured step time across the plans (Spearman's
# :math:`\rho`: 1 means the model orders the plans exactly as the stopwatch does), and the
# memory check of the auto plan against its budget:

rho = {}
for name in MAKERS:
    r = results[results.model == name]
    rho[name] = spearmanr(r["predicted step (ms)"], r["measured step (ms)"]).statistic
    auto = r[r.plan == "auto (budget)"].iloc[0]
    print(
        f"{name}: Spearman rho(predicted, measured step time) = {rho[name]:.2f} over {len(r)} "
        f"plans; auto plan measured {auto['measured MiB/rank']:.2f} MiB/rank vs budget "
        f"{budgets[name] / 2**20:.2f} MiB"
    )
    assert auto["measured MiB/rank"] <= budgets[name] / 2**20 * 1.02, "auto plan over budget"

# %%
# The same as a picture: each point a plan, the dotted line where prediction equals
# measurement.

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
for name, marker in zip(MAKERS, "os"):
    r = results[results.model == name]
    ax1.scatter(r["predicted step (ms)"], r["measured step (ms)"], marker=marker, label=name)
    ax2.scatter(r["predicted MiB/rank"], r["measured MiB/rank"], marker=marker, label=name)
times = results[["predicted step (ms)", "measured step (ms)"]]
lim = [times.min().min() * 0.8, times.max().max() * 1.2]
ax1.plot(lim, lim, "k:", lw=1)
ax1.set(xscale="log", yscale="log", xlabel="predicted step time (ms)")
ax1.set(ylabel="measured step time (ms)", title="Time: cost model vs stopwatch")
mlim = [0, results[["predicted MiB/rank", "measured MiB/rank"]].max().max() * 1.1]
ax2.plot(mlim, mlim, "k:", lw=1)
ax2.set(xlabel="predicted MiB per rank", ylabel="measured MiB per rank (ledger)")
ax2.set(title="Memory: cost model vs ledger")
ax1.legend()
fig.tight_layout()

# %%
# Which plan won on the stopwatch, which the model picked, and, where they differ, which cost
# term the model got wrong: the measured step splits into time in collectives (timed by the
# ledger) and the rest (compute), each next to its prediction.

for name in MAKERS:
    r = results[results.model == name].set_index("plan")
    fast, pick = r["measured step (ms)"].idxmin(), r["predicted step (ms)"].idxmin()
    print(
        f"{name}: fastest measured plan '{fast}' ({r.loc[fast, 'measured step (ms)']:.1f} ms); "
        f"the model's pick '{pick}' ({r.loc[pick, 'measured step (ms)']:.1f} ms measured)"
    )
    for plan in dict.fromkeys((fast, pick)):
        row = r.loc[plan]
        comp_p = row["predicted step (ms)"] - row["predicted comm (ms)"]
        comp_m = row["measured step (ms)"] - row["measured comm (ms)"]
        print(
            f"    {plan}: compute predicted {comp_p:.1f} ms, measured {comp_m:.1f} ms; "
            f"collectives predicted {row['predicted comm (ms)']:.1f} ms, "
            f"measured {row['measured comm (ms)']:.1f} ms"
        )

# %%
# How to read this. The prices decide the plan: compare the latency of a collective over all
# 4 ranks with one over a pair in the calibration table, and the compute of a step. Where
# communication is dear next to compute, the unconstrained plan replicates, and data
# parallelism, which all-reduces every parameter's gradient across the ranks, pays one latency
# per parameter tensor. Under the budget the solver shards just enough, and a mesh axis (a pair
# of ranks) is cheaper than the whole mesh. Plans whose predicted times differ by less than the
# step-to-step spread of the stopwatch on shared cores can be ordered either way. The memory
# prediction, which is deterministic, errs on the safe side (see
# :mod:`cai_labs.auto_parallel.cost_model`). On GPUs with NVLink the prices change and so does
# the plan; the solver is the same.
#
# 7. Automatic activation checkpointing
# -------------------------------------
# The ResNet-50 as a chain of 18 stages (stem, 16 bottlenecks, head). Each stage is measured
# once: bytes it saves for backward ``m_i``, bytes of its input ``in_i``, forward time ``t_i``.
# For each budget, the chain DP of :mod:`cai_labs.auto_parallel.checkpoint_solver` picks the
# stages to recompute (least extra time whose predicted peak fits), and the chain runs with
# ``torch.utils.checkpoint``; the ledger measures the peak of activations saved for backward.

from cai_labs.auto_parallel.checkpoint_solver import (
    CheckpointedChain,
    measure_peak,
    minimum_budget,
    profile_chain,
    solve_checkpoint,
)

torch.manual_seed(SEED)
ckpt_model = resnet50(width=RESNET_WIDTH, seed=SEED)
stages = ckpt_model.chain()
x_ck = torch.randn(CKPT_BATCH, 3, IMAGE, IMAGE)
profiles = profile_chain(stages, x_ck)
full_act = sum(p.saved_bytes for p in profiles)
baseline = measure_peak(CheckpointedChain(stages, [False] * len(stages)), x_ck, reps=3)
least = minimum_budget(profiles)
print(
    f"activations saved without checkpointing (sum of m_i): {full_act / 2**20:.2f} MiB; "
    f"smallest budget any plan fits: {least / 2**20:.2f} MiB"
)

# %%
# Six budgets from no checkpointing down to the smallest that fits, each solved, run and
# measured:

rows = []
for budget in np.linspace(full_act, 1.02 * least, CKPT_POINTS):
    plan = solve_checkpoint(profiles, budget)
    meas = measure_peak(CheckpointedChain(stages, plan.checkpointed), x_ck, reps=3)
    rows.append(
        {
            "budget (MiB)": budget / 2**20,
            "stages recomputed": sum(plan.checkpointed),
            "predicted peak (MiB)": plan.predicted_peak / 2**20,
            "measured peak (MiB)": meas["peak_activations"] / 2**20,
            "relative step time": meas["seconds"] / baseline["seconds"],
            "predicted relative time": 1
            + plan.recompute_seconds / (3 * sum(p.fwd_seconds for p in profiles)),
        }
    )
    assert meas["peak_activations"] <= budget, "checkpointing plan exceeded its budget"
ckpt = pd.DataFrame(rows)
ckpt.style.format(precision=2)

# %%
# A budget below the smallest is refused with what would fit:

try:
    solve_checkpoint(profiles, 0.9 * least)
except ValueError as err:
    print("a budget below the smallest:", err)

# %%
# The predicted relative time assumes backward costs twice the forward, so a step is ``3 sum
# t_i`` and recomputing stage ``i`` adds ``t_i``. The model counts a tensor kept by two stages
# twice, so it errs on the safe side; the table shows by how much. The measured relative times
# come from single steps on shared cores and are noisy; the trend, more recomputation for less
# memory, is the point.

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
ax1.plot(ckpt["budget (MiB)"], ckpt["budget (MiB)"], "k:", lw=1, label="budget")
ax1.plot(ckpt["budget (MiB)"], ckpt["predicted peak (MiB)"], "o--", label="predicted peak")
ax1.plot(ckpt["budget (MiB)"], ckpt["measured peak (MiB)"], "s-", label="measured peak (ledger)")
ax1.set(
    xlabel="activation budget (MiB)",
    ylabel="peak saved activations (MiB)",
    title=f"ResNet-50, batch {CKPT_BATCH}: peak vs budget",
)
ax1.legend()
ax2.plot(ckpt["budget (MiB)"], ckpt["relative step time"], "s-", label="measured")
ax2.plot(ckpt["budget (MiB)"], ckpt["predicted relative time"], "o--", label="predicted")
ax2.set(
    xlabel="activation budget (MiB)",
    ylabel="step time / without checkpointing",
    title="The price: recomputation",
)
ax2.legend()
fig.tight_layout()

# %%
# **The largest batch that fits.** Activations grow linearly with the batch, so the profile at
# ``CKPT_BATCH`` scaled by ``b / CKPT_BATCH`` predicts any batch ``b``. For a fixed budget (the
# un-checkpointed activations of batch ``CKPT_BATCH``), the largest batch without checkpointing
# and with the solver's plan, each then run and measured:

BUDGET = full_act
fits = {}
for label, use_ckpt in (("without checkpointing", False), ("with checkpointing", True)):
    best = None
    for b in range(4, 16 * CKPT_BATCH + 1, 4):
        scaled = [p.scaled(b / CKPT_BATCH) for p in profiles]
        if use_ckpt:
            try:
                best = (b, solve_checkpoint(scaled, BUDGET).checkpointed)
            except ValueError:
                break
        elif sum(p.saved_bytes for p in scaled) <= BUDGET:
            best = (b, [False] * len(stages))
        else:
            break
    b, flags = best
    meas = measure_peak(CheckpointedChain(stages, flags), torch.randn(b, 3, IMAGE, IMAGE))
    fits[label] = {
        "largest batch": b,
        "stages recomputed": sum(flags),
        "measured peak (MiB)": meas["peak_activations"] / 2**20,
        "budget (MiB)": BUDGET / 2**20,
    }
    assert meas["peak_activations"] <= BUDGET * 1.02
pd.DataFrame(fits).T.style.format(precision=2)

# %%
# At real scale
# -------------
# The solver above chooses a strategy per operator from a cost model on CPU ranks. The same
# question at cluster scale, answered by brute force over :mod:`cai_labs.scale`: every
# data x tensor x pipeline split of 64 A100 80 GB for GPT-3 175B (1,024 sequences per step,
# tensor parallelism inside a node), each recomputation policy, keeping the layouts whose memory
# per GPU fits. **Modeled**; the five fastest:


from cai_labs.scale import ScaleLayout, predict

found = []
for tp, pp, rec in itertools.product((1, 2, 4, 8), (1, 2, 4, 8, 16), ("none", "selective", "full")):
    dp = 64 // (tp * pp)
    if dp < 1 or tp * pp * dp != 64:
        continue
    layout = ScaleLayout(dp=dp, tp=tp, pp=pp, zero=1, recompute=rec, global_batch=1024)
    p = predict("gpt-3-175b", "a100-80gb", layout)
    if p.fits:
        found.append(
            {
                "dp x tp x pp": f"{dp} x {tp} x {pp}",
                "recompute": rec,
                "step (s)": p.step_time_s,
                "MFU": p.mfu,
                "memory (GB)": p.memory_per_gpu_bytes["total"] / 1e9,
                "bound": p.bound,
            }
        )
best = pd.DataFrame(found).sort_values("step (s)").head(5).set_index("dp x tp x pp")
print(f"{len(found)} layouts fit; fastest: {best.index[0]}, {best['recompute'].iloc[0]}")
best.style.format({"step (s)": "{:.2f}", "MFU": "{:.3f}", "memory (GB)": "{:.1f}"})

# %%
# Running it with Colossal-AI on GPUs
# -----------------------------------
# Colossal-AI's auto-parallel (``colossalai.auto_parallel``) does the same five steps with a
# richer strategy space (sharding specs over every dimension, reduce-scatter, more ops), a
# profiler-based cost model, and activation checkpointing solved jointly (rotor). Its entry
# point takes the model, the input shapes as ``meta`` tensors keyed by ``forward``'s argument
# names, and the logical mesh. **Checked against colossalai 0.5.0, needs CUDA**: the cell
# defines the function and checks it against the installed release; it does not run it.

from cai_labs.colossal import checked_here


def colossalai_autoparallel(steps: int = 10) -> None:
    """Colossal-AI 0.5.0 on 4 GPUs: ``colossalai run --nproc_per_node 4 train.py``."""
    import colossalai
    from colossalai.auto_parallel.tensor_shard.initialize import autoparallelize

    colossalai.launch_from_torch()
    model = resnet50(width=64, seed=SEED).cuda()
    meta_args = {"x": torch.empty(128, 3, 224, 224, device="meta")}  # shapes, no data
    gm = autoparallelize(model, meta_args, logical_mesh_shape=(2, 2), memory_budget=8 * 1024**3)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    for _ in range(steps):
        x = torch.randn(128, 3, 224, 224, device="cuda")
        y = torch.randint(0, 10, (128,), device="cuda")
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(gm(x), y).backward()
        optimizer.step()


print(checked_here(colossalai_autoparallel))

# %%
# The same page runs under ``torchrun --nproc-per-node=4`` with cai_labs: ``launch`` joins the
# process group from the environment, and the calibration then measures NCCL instead of gloo.

# %%
# Predict, then check
# -------------------

from cai_labs.auto_parallel.profiler import op_key

rn = graphs["ResNet-50"]
ops = [i for i in rn.nodes.values() if i.node.op not in ("placeholder", "output")]
distinct = {op_key(rn, i, st) for i in ops for st in i.strategies}
gpt_plan = plan_table("GPT block", solutions["GPT block"].plan)
most = ckpt.iloc[-1]

# %%
# Open an answer once you have your own.

exercises = Exercises()
exercises.add(
    f"ResNet-50 has {len(cal['ops']['ResNet-50']):,} (node, strategy) pairs. Its 16 "
    "bottlenecks repeat a few shapes: how many distinct op timings does the profiler need?",
    f"{len(distinct):,}: pairs with the same op, configuration and local shapes share one.",
)
exercises.add(
    "Under the memory budget, which strategies did the solver give the GPT block's two MLP "
    "linear layers, and does the pair need a reshard between them?",
    f"fc1 {gpt_plan.loc['mlp_fc1', 'strategy']} (output layout "
    f"{gpt_plan.loc['mlp_fc1', 'output layout']}), fc2 {gpt_plan.loc['mlp_fc2', 'strategy']}; "
    f"the activation between them is laid out {gpt_plan.loc['mlp_act', 'output layout']}.",
)
exercises.add(
    f"At the smallest budget of the sweep ({most['budget (MiB)']:.2f} MiB), how many of the "
    f"{len(stages)} stages are recomputed, and what does the step cost relative to none?",
    f"{int(most['stages recomputed'])} stages; measured {most['relative step time']:.2f}x, "
    f"predicted {most['predicted relative time']:.2f}x.",
)
exercises
