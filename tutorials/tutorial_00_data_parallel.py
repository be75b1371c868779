"""
From PyTorch to data parallel
=============================

Data parallelism is the first tool of large-scale training and the base every other technique
builds on: every rank (process, usually one per GPU) holds a whole copy of the model, takes a
different slice of each batch, and the ranks average their gradients before the optimizer step.

**In this tutorial** you will

1. train a small network on real handwritten digits with an ordinary PyTorch loop;
2. run the same training on 4 ranks with data parallelism written out by hand, and check that
   its gradients equal the single-process gradient of the full batch;
3. make the gradient exchange faster with buckets that overlap backward, as production engines do;
4. run PyTorch's ``DistributedDataParallel`` and Colossal-AI's ``Booster`` side by side;
5. measure what each variant sends over the network and how long its steps take, next to the
   formula for ring all-reduce.

All ranks here are CPU processes on the machine that built this page, talking through the
``gloo`` backend. On GPUs the same code runs with NCCL (see the end of the page).
"""

# %%
# Set-up
# ------
# The constants below size the run. The page was built with these values; raise them on your
# own machine (more epochs, a wider model) and re-run.

import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from cai_labs import Ledger, comm_totals, launch, report
from cai_labs.data import load_digits_split
from cai_labs.data_parallel import BucketedDataParallel, allreduce_gradients, shard_batch
from cai_labs.models import MLP

WORLD_SIZE = 4  # ranks for the parallel runs
EPOCHS = 10  # passes over the training set
GLOBAL_BATCH = 128  # samples per optimizer step, summed over all ranks
HIDDEN = (256, 256)  # hidden layer widths of the MLP
LR = 0.05
SEED = 0

data = load_digits_split(seed=SEED)
print(f"train: {tuple(data.x_train.shape)}, test: {tuple(data.x_test.shape)}")
print(f"parameters: {sum(p.numel() for p in MLP(hidden=HIDDEN).parameters()):,}")

# %%
# The serial baseline
# -------------------
# An ordinary training loop: shuffle each epoch, cut the data into batches, forward, loss,
# backward, step. Everything that follows must reproduce its numbers.


def epoch_order(epoch: int) -> torch.Tensor:
    """The same shuffled order of training samples on every rank (a seeded generator)."""
    return torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(epoch))


def batches(epoch: int):
    order = epoch_order(epoch)
    for start in range(0, len(order) - GLOBAL_BATCH + 1, GLOBAL_BATCH):
        idx = order[start : start + GLOBAL_BATCH]
        yield data.x_train[idx], data.y_train[idx]


def accuracy(model: nn.Module) -> float:
    with torch.no_grad():
        return (model(data.x_test).argmax(1) == data.y_test).float().mean().item()


# %%
# The loop, each step timed:

model = MLP(hidden=HIDDEN, seed=SEED)
optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
serial_losses, serial_times = [], []
for epoch in range(EPOCHS):
    for x, y in batches(epoch):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        serial_times.append(time.perf_counter() - start)
        serial_losses.append(loss.item())
serial_params = [p.detach().clone() for p in model.parameters()]
serial_acc = accuracy(model)
print(
    f"serial: {len(serial_losses)} steps, final loss {serial_losses[-1]:.4f}, "
    f"test accuracy {serial_acc:.3f}"
)

# %%
# Data parallel, by hand
# ----------------------
# Why averaging gradients is exact: the loss of a batch of :math:`B` samples is the mean of
# per-sample losses, so its gradient is
#
# .. math::
#
#    \nabla L = \frac{1}{B}\sum_{i=1}^{B} \nabla \ell_i
#    = \frac{1}{N}\sum_{r=1}^{N} \Big(\frac{N}{B}\sum_{i \in \text{slice}_r} \nabla \ell_i\Big)
#    = \frac{1}{N}\sum_{r=1}^{N} \nabla L_r ,
#
# the mean over the :math:`N` ranks of each rank's gradient on its own slice of :math:`B/N`
# samples. One all-reduce (a sum that every rank receives) then a division by :math:`N` gives
# every rank the full-batch gradient, so every replica takes the identical step.
#
# The function below is what runs on **each rank**. ``launch`` forks ``WORLD_SIZE`` processes,
# gives them a process group, runs the function on all of them and returns rank 0's result.
# The ``sync`` argument picks how gradients are averaged; the ledger records every collective.


def ddp_comm_hook(state, bucket):
    """A DDP communication hook doing what DDP does by default (average, then all-reduce),
    through ``dist.all_reduce`` so that the ledger can see and count DDP's buckets."""
    buffer = bucket.buffer().div_(dist.get_world_size())
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda f: f.value()[0])


# %%
# What a worker hands back to the page:


def summarize(plain: nn.Module, local_losses: list, times: list, **extra) -> dict:
    """What a worker hands back. The full-batch loss of a step is the mean of the ranks' losses
    (gathered after training, outside the ledger: it is reporting, not training)."""
    losses = torch.tensor(local_losses)
    dist.all_reduce(losses)
    return {
        "losses": (losses / dist.get_world_size()).tolist(),
        "step_time": float(np.median(times)),
        "accuracy": accuracy(plain),
        "params": [p.detach().clone() for p in plain.parameters()],
        "steps": len(local_losses),
        **extra,
    }


# %%
# The worker. ``sync`` picks how gradients are averaged: ``"allreduce"`` after backward,
# ``"bucketed"`` or ``"ddp"`` during it (the wrapper does it).


def wrap(model: nn.Module, sync: str) -> nn.Module:
    if sync == "bucketed":
        return BucketedDataParallel(model, bucket_mb=0.25)
    if sync == "ddp":
        model = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.25)
        model.register_comm_hook(None, ddp_comm_hook)
    return model


# %%
# Each rank trains on its ``B/N`` samples of every global batch, under the ledger:


def train_worker(sync: str) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = wrap(MLP(hidden=HIDDEN, seed=SEED), sync)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    local_losses, times = [], []
    with Ledger(model=model, optimizer=optimizer, track_activations=False) as ledger:
        for epoch in range(EPOCHS):
            for x, y in batches(epoch):
                x, y = shard_batch(x, y, rank=rank, world_size=world)  # my B/N samples
                start = time.perf_counter()
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()  # bucketed / DDP: gradients are averaged during backward
                if sync == "allreduce":
                    allreduce_gradients(model)  # one all-reduce per tensor, after backward
                optimizer.step()
                times.append(time.perf_counter() - start)
                local_losses.append(loss.item())
        ledger.snapshot("end")
    plain = model.module if hasattr(model, "module") else model
    buckets = model.bucket_sizes() if sync == "bucketed" else None
    comm = comm_totals(ledger.report())
    return summarize(plain, local_losses, times, comm=comm, buckets=buckets)


# %%
# Data parallel with one all-reduce per gradient tensor, after backward:

results = {"cai_labs all-reduce": launch(train_worker, WORLD_SIZE, "allreduce")}
first = results["cai_labs all-reduce"]
print(
    f"data parallel on {WORLD_SIZE} ranks: final loss {first['losses'][-1]:.4f}, "
    f"test accuracy {first['accuracy']:.3f}"
)

# %%
# Check: the same gradients as one process on the full batch
# ----------------------------------------------------------
# Take one batch, compute its gradient serially, and compute it again on ``WORLD_SIZE`` ranks
# with each rank holding a quarter of it. The averaged gradient must match to floating-point
# rounding (the sums are done in a different order, so not bit for bit).

x0, y0 = next(batches(0))
reference = MLP(hidden=HIDDEN, seed=SEED)
nn.functional.cross_entropy(reference(x0), y0).backward()
reference_grads = [p.grad.clone() for p in reference.parameters()]


def one_gradient() -> list[torch.Tensor]:
    model = MLP(hidden=HIDDEN, seed=SEED)
    xs, ys = shard_batch(x0, y0, rank=dist.get_rank(), world_size=dist.get_world_size())
    nn.functional.cross_entropy(model(xs), ys).backward()
    allreduce_gradients(model)
    return [p.grad for p in model.parameters()]


parallel_grads = launch(one_gradient, WORLD_SIZE)
grad_error = max((a - b).abs().max().item() for a, b in zip(parallel_grads, reference_grads))
grad_scale = max(g.abs().max().item() for g in reference_grads)
print(
    f"largest gradient entry: {grad_scale:.3e}; largest difference parallel vs serial: "
    f"{grad_error:.3e}"
)
assert grad_error < 1e-6 * max(1.0, grad_scale), "data-parallel gradient differs from serial"

# %%
# Buckets that overlap backward
# -----------------------------
# ``allreduce_gradients`` waits until backward has finished and then sends one message per
# parameter tensor. :class:`~cai_labs.data_parallel.BucketedDataParallel` instead groups
# gradients into buckets in the order backward produces them (last layer first), and starts a
# bucket's all-reduce, asynchronously, as soon as its last gradient is ready, while backward
# keeps computing earlier layers. PyTorch's ``DistributedDataParallel`` (DDP) works this way, in
# C++; we run it too, with a communication hook so the ledger can count its buckets.

results["cai_labs bucketed"] = launch(train_worker, WORLD_SIZE, "bucketed")
results["PyTorch DDP"] = launch(train_worker, WORLD_SIZE, "ddp")
print(
    "cai_labs buckets (bucket_mb=0.25) in launch order, bytes:",
    results["cai_labs bucketed"]["buckets"],
)
print(
    "all-reduce calls per step:",
    {k: r["comm"]["all_reduce"]["calls"] // r["steps"] for k, r in results.items()},
)

# %%
# Colossal-AI, side by side
# -------------------------
# Colossal-AI wraps the same idea behind its ``Booster``: a plugin decides how the model is
# parallelised, and ``booster.boost`` returns the wrapped model and optimizer. Its
# ``TorchDDPPlugin`` is PyTorch DDP underneath, and it runs on CPU. If ``colossalai`` is
# installed where this page is built, the cell below trains with it; otherwise it is shown only.

try:
    import colossalai  # noqa: F401

    HAVE_COLOSSALAI = True
except Exception:  # not installed, or installed against another torch
    HAVE_COLOSSALAI = False


def colossalai_worker() -> dict:
    from colossalai.booster import Booster
    from colossalai.booster.plugin import TorchDDPPlugin

    rank, world = dist.get_rank(), dist.get_world_size()
    model = MLP(hidden=HIDDEN, seed=SEED)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    booster = Booster(plugin=TorchDDPPlugin())
    model, optimizer, *_ = booster.boost(model, optimizer)
    local_losses, times = [], []
    for epoch in range(EPOCHS):
        for x, y in batches(epoch):
            x, y = shard_batch(x, y, rank=rank, world_size=world)
            start = time.perf_counter()
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            booster.backward(loss, optimizer)
            optimizer.step()
            times.append(time.perf_counter() - start)
            local_losses.append(loss.item())
    plain = model.unwrap() if hasattr(model, "unwrap") else model
    return summarize(plain, local_losses, times, comm={})  # its DDP talks from C++: not counted


if HAVE_COLOSSALAI:
    results["Colossal-AI TorchDDPPlugin"] = launch(colossalai_worker, WORLD_SIZE)
    print(f"Colossal-AI {colossalai.__version__}: executed on {WORLD_SIZE} CPU ranks")
else:
    print(
        "colossalai is not installed in this build: the Colossal-AI cell was shown, not run "
        "(`nox -s colossalai` runs it against cai_labs)"
    )

# %%
# What was sent, and how long it took
# -----------------------------------
# For :math:`P` bytes of gradients on :math:`N` ranks, ring all-reduce makes every rank send
# :math:`2\,\frac{N-1}{N}\,P` bytes per step (a reduce-scatter then an all-gather, each moving
# :math:`\frac{N-1}{N}P`). Bucketing does not change that volume; it changes the number of
# messages (each pays a fixed latency) and lets communication overlap backward.
#
# The table is computed from this build's ledger: buffer bytes all-reduced per step, the
# gradient size :math:`P`, the bytes each rank sent under the ring algorithm next to the
# formula, the median step time, the test accuracy after training, and how far the final
# parameters are from the serial run's.

grad_bytes = sum(p.numel() * p.element_size() for p in serial_params)
formula = round(2 * (WORLD_SIZE - 1) / WORLD_SIZE * grad_bytes)
rows = [
    {
        "variant": "serial (1 process)",
        "all-reduce calls/step": 0,
        "bytes all-reduced/step": 0,
        "gradient bytes P": grad_bytes,
        "sent/rank/step": 0,
        "formula 2(N-1)/N·P": 0,
        "step time (ms)": 1e3 * float(np.median(serial_times)),
        "test accuracy": serial_acc,
        "max |θ - θ_serial|": 0.0,
    }
]

# %%
# One row per variant, from its ledger (the formula column is the ring's
# :math:`2\,\frac{N-1}{N}\,P`):

for name, r in results.items():
    ar = r["comm"].get("all_reduce", {"calls": 0, "bytes": 0, "sent_bytes": 0})
    rows.append(
        {
            "variant": f"{name} ({WORLD_SIZE} ranks)",
            "all-reduce calls/step": ar["calls"] / r["steps"],
            "bytes all-reduced/step": ar["bytes"] / r["steps"],
            "gradient bytes P": grad_bytes,
            "sent/rank/step": ar["sent_bytes"] / r["steps"],
            "formula 2(N-1)/N·P": formula,
            "step time (ms)": 1e3 * r["step_time"],
            "test accuracy": r["accuracy"],
            "max |θ - θ_serial|": max(
                (a - b).abs().max().item() for a, b in zip(r["params"], serial_params)
            ),
        }
    )
# %%
# Measured next to the formula, with each variant's largest distance from the serial weights:

table = pd.DataFrame(rows).set_index("variant")
report.table(
    table,
    formats={
        "all-reduce calls/step": "{:.2f}",
        "sent/rank/step": "{:,.0f}",
        "test accuracy": "{:.3f}",
        "max |θ - θ_serial|": "{:.1e}",
    },
)

# %%
# Each parallel row all-reduces exactly the gradient bytes once per step. (DDP averages slightly
# under two calls per step: its very first step uses one bucket per parameter order it guessed,
# then it rebuilds its buckets in the order gradients really arrived.) (The Colossal-AI row,
# when executed, shows no counts: its DDP talks from C++ where the ledger cannot see). The
# parameters end within rounding of the serial run: the four-rank runs *are* the serial run.
#
# Step times: the serial loop uses every core of the machine; the ranks share the same cores, one
# thread each, and add communication on top. On a CPU with two cores, four ranks cannot be
# faster than one process: data parallelism pays off when each rank has its own device. What the
# measurement does show is the cost of the exchange and how bucketing reduces the message count.

for name, r in results.items():
    gap = max(abs(a - b) for a, b in zip(r["losses"], serial_losses))
    assert gap < 1e-4, f"{name} drifted from the serial loss by {gap}"

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
ax1.plot(serial_losses, lw=4, alpha=0.35, color="black", label="serial")
for name, r in results.items():
    ax1.plot(r["losses"], lw=1.2, label=name)
ax1.set(
    xlabel="optimizer step",
    ylabel="training loss (full batch)",
    yscale="log",
    title="Same loss curve, 1 process or 4 ranks",
)
ax1.legend()
names = ["serial"] + list(results)
step_ms = [1e3 * float(np.median(serial_times))] + [1e3 * r["step_time"] for r in results.values()]
ax2.barh(names, step_ms, color=["gray"] + ["C0", "C1", "C2", "C3"][: len(results)])
ax2.invert_yaxis()
ax2.set(
    xlabel="median step time (ms), measured in this build",
    title=f"{WORLD_SIZE} CPU ranks on shared cores",
)
fig.tight_layout()

# %%
# Running it on GPUs, or on several machines
# ------------------------------------------
# ``launch`` picks NCCL when as many GPUs as ranks are visible, and ``torchrun`` is supported:
# under ``torchrun`` it joins the process group from the environment and runs the worker in
# place, so this very script runs on a node with 4 GPUs as::
#
#     torchrun --nproc-per-node=4 tutorial_00_data_parallel.py
#
# (move the batch and model to ``cai_labs.launcher.device()`` for GPU speed). Colossal-AI's
# launch of the same Booster code on a GPU cluster is::
#
#     colossalai run --nproc_per_node 4 train.py   # train.py calls colossalai.launch_from_torch()
#
# Only the CPU runs on this page were executed for this build.
#
# **Next:** data parallelism keeps a full copy of model, gradients and optimizer state on every
# rank. The following tutorials split those up: tensor and pipeline parallelism split the model,
# ZeRO splits the optimizer state, gradients and parameters.
