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

**Prerequisites:** a PyTorch training loop (forward, loss, backward, optimizer step).
"""

# %%
# Set-up
# ------
# PyTorch and the usual scientific stack, then what this page uses from ``cai_labs``: the
# launcher and ledger, the data, the data-parallel code, its formula, and the report helpers.

import os
import time

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from cai_labs import Ledger, build_env, comm_totals, device, launch
from cai_labs.data import load_digits_split
from cai_labs.data_parallel import BucketedDataParallel, allreduce_gradients, shard_batch
from cai_labs.data_parallel.formulas import ring_allreduce_sent
from cai_labs.exercises import Exercises
from cai_labs.models import MLP
from cai_labs.report import bar_times, from_every_rank, loss_curves, table
from cai_labs.wire import GLOO_HEADER_BYTES

# %%
# The constants below size the run. The page was built with these values; raise them on your
# own machine (more epochs, a wider model) and re-run. The data are scikit-learn's handwritten
# digits (8 x 8 pixels), split into a training and a test set.

WORLD_SIZE = 4  # ranks for the parallel runs
EPOCHS = 10  # passes over the training set
GLOBAL_BATCH = 128  # samples per optimizer step, summed over all ranks
HIDDEN = (256, 256)  # hidden layer widths of the MLP
LR = 0.05
SEED = 0

print(build_env.describe(ranks=WORLD_SIZE))  # where this page's numbers were measured
data = load_digits_split(seed=SEED)
print(f"train: {tuple(data.x_train.shape)}, test: {tuple(data.x_test.shape)}")
print(f"parameters: {sum(p.numel() for p in MLP(hidden=HIDDEN).parameters()):,}")

# %%
# The serial baseline
# -------------------
# An ordinary training loop: shuffle each epoch, cut the data into batches, forward, loss,
# backward, step. Everything that follows must reproduce its numbers. First, three helpers that
# every run shares: the shuffled order of an epoch, its batches, and the test accuracy.


def epoch_order(epoch: int) -> torch.Tensor:
    """The same shuffled order of training samples on every rank (a seeded generator)."""
    return torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(epoch))


def batches(epoch: int):
    order = epoch_order(epoch)
    for start in range(0, len(order) - GLOBAL_BATCH + 1, GLOBAL_BATCH):
        idx = order[start : start + GLOBAL_BATCH]
        yield data.x_train[idx].to(device()), data.y_train[idx].to(device())


def accuracy(model: nn.Module) -> float:
    with torch.no_grad():
        x, y = data.x_test.to(device()), data.y_test.to(device())
        return (model(x).argmax(1) == y).float().mean().item()


# %%
# The loop itself, timed step by step (the step times are compared with the parallel runs later):

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
# The ``sync`` argument picks how gradients are averaged (``wrap``, below); the ledger records
# every collective.


def train_worker(sync: str) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = wrap(MLP(hidden=HIDDEN, seed=SEED).to(device()), sync)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    local_losses, times, calls = [], [], []
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
                calls.append(len(ledger.comm) - sum(calls))  # collectives of this step
    plain = model.module if hasattr(model, "module") else model
    return summarize(plain, local_losses, times, **ledger_counts(ledger, calls, model))


# %%
# ``wrap`` chooses how the gradients are averaged. With ``"allreduce"`` the model stays as it is
# and the worker calls ``allreduce_gradients`` after backward; the two other choices are the
# subject of the section after the check.


def ddp_comm_hook(state, bucket):
    """A DDP communication hook doing what DDP does by default (average, then all-reduce),
    through ``dist.all_reduce`` so that the ledger can see and count DDP's buckets."""
    buffer = bucket.buffer().div_(dist.get_world_size())
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda f: f.value()[0])


def wrap(model: nn.Module, sync: str) -> nn.Module:
    if sync == "bucketed":
        return BucketedDataParallel(model, bucket_mb=0.25)
    if sync == "ddp":
        model = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.25)
        model.register_comm_hook(None, ddp_comm_hook)
    return model


# %%
# What a worker hands back: the full-batch losses, the median step time, the test accuracy and
# the final parameters, plus what the ledger counted (collectives per step, and every rank's
# bytes measured on its sockets).


def summarize(plain: nn.Module, local_losses: list, times: list, **extra) -> dict:
    """The full-batch loss of a step is the mean of the ranks' losses (gathered after
    training, outside the ledger: it is reporting, not training)."""
    losses = torch.tensor(local_losses, device=device())
    dist.all_reduce(losses)
    return {
        "losses": (losses / dist.get_world_size()).tolist(),
        "step_time": float(np.median(times)),
        "accuracy": accuracy(plain),
        "params": [p.detach().clone() for p in plain.parameters()],
        "steps": len(local_losses),
        **extra,
    }


def ledger_counts(ledger: Ledger, calls: list[int], model: nn.Module) -> dict:
    return {
        "comm": comm_totals(ledger.report()),
        "calls_per_step": calls,
        "wire": from_every_rank(ledger.report()["wire"]),  # every rank's bytes on its sockets
        "buckets": model.bucket_sizes() if isinstance(model, BucketedDataParallel) else None,
    }


# %%
# Launch it on ``WORLD_SIZE`` ranks, gradients averaged by one all-reduce per tensor:

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
    model = MLP(hidden=HIDDEN, seed=SEED).to(device())
    x, y = x0.to(device()), y0.to(device())
    xs, ys = shard_batch(x, y, rank=dist.get_rank(), world_size=dist.get_world_size())
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
for name, r in results.items():
    c = r["calls_per_step"]
    print(f"{name}: all-reduce calls in step 1: {c[0]}, in each later step: {sorted(set(c[1:]))}")

# %%
# Colossal-AI, side by side
# -------------------------
# Colossal-AI wraps the same idea behind its ``Booster``: a plugin decides how the model is
# parallelised, and ``booster.boost`` returns the wrapped model and optimizer. Its
# ``TorchDDPPlugin`` is PyTorch DDP underneath, and it runs on CPU: the site's build installs
# ``colossalai`` 0.5.0, and the cell below trains with it: the same loop, with the Booster's
# model, optimizer and ``booster.backward``.


def colossalai_worker() -> dict:
    from colossalai.booster import Booster
    from colossalai.booster.plugin import TorchDDPPlugin

    rank, world = dist.get_rank(), dist.get_world_size()
    model = MLP(hidden=HIDDEN, seed=SEED).to(device())
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


# %%
# It runs where ``colossalai`` imports (the site's build installs it):

try:
    import colossalai  # noqa: F401

    HAVE_COLOSSALAI = True
except Exception:  # not installed, or installed against another torch
    HAVE_COLOSSALAI = False

if HAVE_COLOSSALAI:
    results["Colossal-AI TorchDDPPlugin"] = launch(colossalai_worker, WORLD_SIZE)
    print(f"Colossal-AI {colossalai.__version__}: executed on {WORLD_SIZE} CPU ranks")
else:
    print(
        "colossalai is not installed where this page ran; install it as `nox -s colossalai` "
        "does to run this cell (that session runs it against cai_labs as a test)"
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
# gradient size :math:`P`, the bytes each rank really sent, *measured* from the TCP counters of
# its sockets (:mod:`cai_labs.wire`), next to the ring formula (a *model*), the median step
# time, the test accuracy after training, and how far the final parameters are from the serial
# run's. Rank 0's bytes are shown; the next cell shows every rank.

grad_bytes = sum(p.numel() * p.element_size() for p in serial_params)
formula = round(ring_allreduce_sent(grad_bytes, WORLD_SIZE))


def row(name: str, r: dict) -> dict:
    ar = r["comm"].get("all_reduce", {"calls": 0, "bytes": 0})
    wire = (r.get("wire") or [{"measured": False}])[0]
    sent = wire["sent"] / r["steps"] if wire["measured"] else None
    return {
        "variant": name,
        "all-reduce calls/step": ar["calls"] / r["steps"],
        "bytes all-reduced/step": ar["bytes"] / r["steps"],
        "gradient bytes P": grad_bytes,
        "measured sent/rank/step (B)": "not measured" if sent is None else sent,
        "modeled 2(N-1)/N·P (B)": formula,
        "measured - modeled (B)": "not measured" if sent is None else sent - formula,
        "step time (ms)": 1e3 * r["step_time"],
        "test accuracy": r["accuracy"],
        "max |θ - θ_serial|": max(
            (a - b).abs().max().item() for a, b in zip(r["params"], serial_params)
        ),
    }


# %%
# One row per run, the serial loop first. Each rank's measured bytes must be the formula's
# plus gloo's framing: at most 64 message headers per all-reduce call (asserted).

serial = {"comm": {}, "steps": 1, "wire": [{"measured": True, "sent": 0}], "params": serial_params}
serial.update(step_time=float(np.median(serial_times)), accuracy=serial_acc)
rows = [row("serial (1 process)", serial)]
rows[0].update({"modeled 2(N-1)/N·P (B)": 0, "measured - modeled (B)": 0})
for name, r in results.items():  # measured = formula + framing: at most 64 headers per call
    extra = (r["wire"][0]["sent"] - formula * r["steps"]) if r.get("wire") else 0
    calls = r["comm"].get("all_reduce", {}).get("calls", 0)
    assert 0 <= extra <= 64 * GLOO_HEADER_BYTES * calls, (name, extra, calls)
rows += [row(f"{name} ({WORLD_SIZE} ranks)", r) for name, r in results.items()]
table(
    rows,
    index="variant",
    formats={
        "all-reduce calls/step": "{:.2f}",
        "step time (ms)": "{:.2f}",
        "test accuracy": "{:.3f}",
        "max |θ - θ_serial|": "{:.1e}",
    },
)

# %%
# Bytes on the wire, per rank
# ---------------------------
# What one all-reduce of all the gradients, flattened into one buffer of :math:`P` bytes, puts
# on each rank's sockets: the ledger reads the kernel's TCP counters of the rank's sockets when
# it opens and closes (after in-flight bytes are acknowledged). Next to it, the ring formula
# :math:`2\,\frac{N-1}{N}\,P`. gloo frames each message with a 48-byte header (six 8-byte
# fields), and a buffer whose elements do not split into :math:`N` equal chunks makes some ranks
# send one element more per step of the ring, some one less.


def flat_allreduce() -> list[dict]:
    model = MLP(hidden=HIDDEN, seed=SEED).to(device())
    flat = torch.cat([p.flatten() for p in model.parameters()])
    dist.all_reduce(torch.ones(1, device=device()))  # connections up before anything is counted
    with Ledger(track_activations=False) as ledger:
        dist.all_reduce(flat)
    return from_every_rank(ledger.report()["wire"])


# %%
# Each rank's measured bytes, split into the formula, whole 48-byte headers and the uneven
# chunks (a few float32 elements at most; asserted):

wire_rows = []
for rank, w in enumerate(launch(flat_allreduce, WORLD_SIZE)):
    row_ = {"rank": rank, "modeled 2(N-1)/N·P (B)": formula}
    if w["measured"]:
        extra = w["sent"] - formula
        headers = round(extra / GLOO_HEADER_BYTES)
        uneven = extra - headers * GLOO_HEADER_BYTES  # whole float32 elements, a few at most
        assert headers >= 0 and abs(uneven) <= 2 * (WORLD_SIZE - 1) * 4, (rank, w)
        row_.update({"measured sent (B)": w["sent"], "measured received (B)": w["received"]})
        row_.update({"gloo headers": headers, "uneven chunks (B)": uneven})
    else:
        row_["measured sent (B)"] = "not measured (no TCP_INFO here)"
    wire_rows.append(row_)
print(f"P = {grad_bytes:,} B = {grad_bytes // 4:,} float32 on {WORLD_SIZE} ranks")
print(pd.DataFrame(wire_rows).set_index("rank").to_string())

# %%
# Each parallel row all-reduces exactly the gradient bytes per step, and each rank's measured bytes
# are the ring formula plus gloo's framing (column "measured - modeled"). DDP's call count per step
# is not a whole number: in its first step its first bucket may hold up to
# ``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES``, then DDP rebuilds its buckets in the order
# gradients really arrived, with ``bucket_cap_mb`` (the counts are printed below). The Colossal-AI
# row, when executed, shows no call counts: its DDP talks from C++, where the ledger does not record
# calls one by one. The parameters end within rounding of the serial run: the four-rank runs *are*
# the serial run.
#
# Step times: the serial loop runs one process; the four ranks share the machine's
# cores, one thread each, and add communication on top, so here they are slower than one
# process. The section after the figures measures data parallelism with one rank per core.

ddp = results["PyTorch DDP"]["calls_per_step"]
print(
    f"PyTorch DDP: first bucket cap {dist._DEFAULT_FIRST_BUCKET_BYTES:,} B for {grad_bytes:,} B "
    f"of gradients: {ddp[0]} all-reduce(s) in step 1; bucket_cap_mb=0.25 from step 2: {ddp[1]}; "
    f"{np.mean(ddp):.2f} on average over {len(ddp)} steps"
)
for name, r in results.items():
    gap = max(abs(a - b) for a, b in zip(r["losses"], serial_losses))
    assert gap < 1e-4, f"{name} drifted from the serial loss by {gap}"

# %%
# The loss curves on a log scale, then the median step times:

runs = {name: r["losses"] for name, r in results.items()}
title = f"Same loss curve, 1 process or {WORLD_SIZE} ranks"
fig = loss_curves(serial_losses, runs, title, ylabel="training loss (full batch)")
fig.axes[0].set_yscale("log")
step_ms = {"serial": 1e3 * float(np.median(serial_times))}
step_ms.update({name: 1e3 * r["step_time"] for name, r in results.items()})
fig = bar_times(
    step_ms,
    "median step time (ms), measured in this build",
    f"{WORLD_SIZE} CPU ranks on shared cores",
)

# %%
# A real speed-up: one rank per core
# -----------------------------------
# Data parallelism pays off when each rank has its own compute and the step is dominated by
# computation, not by the exchange. Below, a wider MLP (``SPEED_HIDDEN``) trains on a large
# batch (``SPEED_BATCH`` samples per step, the digits repeated, split over the ranks) with the
# bucketed data parallelism from above, whose all-reduces overlap backward, and each rank is
# pinned to one core: 1 rank on 1 core, then 2 ranks on 2 cores, then 4 ranks on the same 2
# cores (oversubscribed). Each rank times forward + backward (the buckets' all-reduces run
# during it) and what is left after backward (waiting for the last bucket, the step)
# separately, and reports how much of a core it really got (CPU time over wall time: other
# processes on the build machine take their share too).

SPEED_HIDDEN, SPEED_BATCH, SPEED_STEPS = (1024, 1024), 4096, 10


def speed_worker() -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[rank % len(cores)]})  # rank r on core r mod cores
    model = BucketedDataParallel(MLP(hidden=SPEED_HIDDEN, seed=SEED).to(device()), bucket_mb=1)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rows = torch.arange(SPEED_BATCH) % len(data.x_train)
    x, y = data.x_train[rows].to(device()), data.y_train[rows].to(device())
    x, y = shard_batch(x, y, rank=rank, world_size=world)
    compute, exchange, cpu, wall = [], [], 0.0, 0.0
    for step in range(SPEED_STEPS + 2):  # the first two steps warm up
        t0, c0 = time.perf_counter(), time.thread_time()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()  # all-reduces overlapped
        t1 = time.perf_counter()
        opt.step()
        t2, c2 = time.perf_counter(), time.thread_time()
        if step >= 2:
            compute.append(t1 - t0), exchange.append(t2 - t1)
            cpu, wall = cpu + c2 - c0, wall + t2 - t0
    return speed_summary(compute, exchange, cpu, wall)


# %%
# Each rank reports the median of its timed steps, and the share of a core it got. Each
# configuration runs ``SPEED_RUNS`` times and its fastest run counts, as benchmarks do: the
# run least disturbed by whatever else the machine was doing.


def speed_summary(compute: list, exchange: list, cpu: float, wall: float) -> dict:
    step_s = float(np.median(np.add(compute, exchange)))
    return {
        "samples/s": SPEED_BATCH / step_s,
        "backward ms": 1e3 * float(np.median(compute)),
        "after backward ms": 1e3 * float(np.median(exchange)),
        "core share": cpu / wall,
    }


SPEED_RUNS = 3
cores = len(os.sched_getaffinity(0))
speed = {
    n: max((launch(speed_worker, n) for _ in range(SPEED_RUNS)), key=lambda r: r["samples/s"])
    for n in (1, min(2, cores), 4)
}
print(pd.DataFrame(speed).T.rename_axis("ranks").round(2).to_string())

# %%
# The ratio of throughputs, from the table above:

one = speed[1]["samples/s"]
print(
    f"{min(2, cores)} ranks on {min(2, cores)} cores: "
    f"{speed[min(2, cores)]['samples/s'] / one:.2f}x the throughput of 1 rank on 1 core"
)
print(
    f"4 ranks on {cores} cores: {speed[4]['samples/s'] / one:.2f}x; each rank got "
    f"{speed[4]['core share']:.2f} of a core and spent {speed[4]['backward ms']:.0f} ms per step "
    f"in forward + backward, against {speed[min(2, cores)]['backward ms']:.0f} ms with 2 ranks"
)

# %%
# What the machine itself allows: the same kind of matrix product (half the batch through the
# widest layer) on each rank's pinned core for a second, with no exchange at all. The ratio of
# the total throughput of 2 such ranks to 1 is the most any technique can gain here; cores
# that are hyper-threads of one physical core, or that other processes share, give less than 2.


def matmul_worker(seconds: float = 1.0) -> float:
    rank = dist.get_rank()
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[rank % len(cores)]})
    a = torch.randn(SPEED_BATCH // 2, SPEED_HIDDEN[0], device=device())
    b = torch.randn(SPEED_HIDDEN[0], SPEED_HIDDEN[1], device=device())
    a @ b  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
    flops = 2.0 * a.shape[0] * a.shape[1] * b.shape[1] * done
    rate = torch.tensor([flops / (time.perf_counter() - start)], device=device())
    dist.all_reduce(rate)  # the ranks' FLOP/s, added up
    return rate.item()


capacity = {n: launch(matmul_worker, n) for n in (1, min(2, cores))}
print(
    f"matrix products alone: 1 rank {capacity[1] / 1e9:.1f} GFLOP/s, {min(2, cores)} ranks on "
    f"{min(2, cores)} cores {capacity[min(2, cores)] / 1e9:.1f} GFLOP/s in total: "
    f"{capacity[min(2, cores)] / capacity[1]:.2f}x; data parallel reached "
    f"{speed[min(2, cores)]['samples/s'] / one:.2f}x of its 1-rank throughput"
)

# %%
# With one rank per core, each rank computes half the batch on its own core; where the
# exchange (:math:`2\,\frac{N-1}{N}P` bytes per rank) hides behind backward, the speed-up
# approaches what the cores deliver (the matrix-product ratio above). With 4 ranks on 2 cores,
# two ranks take turns on each core: a quarter of the batch at half a core takes as long as half
# the batch at a whole one, and the ring all-reduce waits, at each of its :math:`2(N-1)` steps,
# for a peer that may be descheduled. Oversubscribing cores adds communication without adding
# compute. Where the core share is well under 1, other processes shared the build machine.

two = min(2, cores)
print(
    f"forward + backward per step: 1 rank {speed[1]['backward ms']:.0f} ms, {two} ranks "
    f"{speed[two]['backward ms']:.0f} ms, 4 ranks {speed[4]['backward ms']:.0f} ms; after "
    f"backward: {two} ranks {speed[two]['after backward ms']:.0f} ms, 4 ranks "
    f"{speed[4]['after backward ms']:.0f} ms"
)

# %%
# At real scale
# -------------
# The ring formula the ledger confirmed above, :math:`2\,\frac{N-1}{N}\,P`, is the one
# :mod:`cai_labs.scale` uses for a data-parallel step on GPUs. Here OPT-1.3B in bf16 with plain
# data parallelism (the gradient all-reduce overlapped with the last backward, as DDP does), 8
# sequences of 2,048 tokens per GPU, on 8 to 512 A100 80 GB. Every number below is **modeled**
# from datasheet bandwidths and one efficiency constant per GPU type (the scale model is checked
# against published runs on the site's "Published runs" page), not measured in this build.

from cai_labs.scale import ScaleLayout, get_model, params_per_gpu, predict

opt = get_model("opt-1.3b")
real = []
for gpus in (8, 64, 512):
    layout = ScaleLayout(dp=gpus, micro_batch_size=8, global_batch=8 * gpus, recompute="selective")
    p = predict(opt, "a100-80gb", layout)
    sent = ring_allreduce_sent(2 * params_per_gpu(opt, layout), gpus)  # bf16 gradients
    real.append(
        {
            "GPUs": gpus,
            "sent per GPU per step (GB)": sent / 1e9,
            "step (s)": p.step_time_s,
            "exposed all-reduce (s)": p.times_s["data-parallel communication"],
            "tokens/s/GPU": p.tokens_per_s_per_gpu,
            "MFU": p.mfu,
            "bound": p.bound,
        }
    )
real = pd.DataFrame(real).set_index("GPUs")
change = real["tokens/s/GPU"].iloc[-1] / real["tokens/s/GPU"].iloc[0]
print(f"modeled tokens/s per GPU, 512 GPUs / 8 GPUs: {change:.3f}")
real.style.format("{:.3g}", subset=list(real.columns[:-1]))

# %%
# Running it on GPUs, or on several machines
# ------------------------------------------
# ``launch`` picks NCCL when as many GPUs as ranks are visible, and ``torchrun`` is supported:
# under ``torchrun`` it joins the process group from the environment and runs the worker in
# place, so this very script runs on a node with 4 GPUs as::
#
#     torchrun --nproc-per-node=4 tutorial_00_data_parallel.py
#
# (the workers already put their model and batches on ``cai_labs.device()``, the rank's GPU
# there and the CPU here). Colossal-AI's
# launch of the same Booster code on a GPU cluster is::
#
#     colossalai run --nproc_per_node 4 train.py   # train.py calls colossalai.launch_from_torch()
#
# Only the CPU runs on this page were executed for this build.
#
# **Next:** data parallelism keeps a full copy of model, gradients and optimizer state on every
# rank. The following tutorials split those up: tensor and pipeline parallelism split the model,
# ZeRO splits the optimizer state, gradients and parameters.

# %%
# Predict, then check
# -------------------
# Answer each question before opening its answer; the answers are this build's numbers.

bucketed = results["cai_labs bucketed"]
exercises = Exercises()
w0 = wire_rows[0]
seen = (
    f"its sockets counted {w0['measured sent (B)']:,} B with {w0['gloo headers']} headers of 48 B"
    if "gloo headers" in w0
    else "this build could not read socket counters"
)
exercises.add(
    f"Rank 0 all-reduces P = {grad_bytes:,} bytes of gradients on N = {WORLD_SIZE} ranks with "
    "the ring algorithm. How many bytes does it send, before gloo's message headers?",
    f"2(N-1)/N·P = {formula:,} B; {seen} (table 'Bytes on the wire').",
)

# %%
# Then bucketing, and ranks on cores:

exercises.add(
    f"BucketedDataParallel with bucket_mb=0.25 on this {grad_bytes:,}-byte model: how many "
    "all-reduce calls per step, and what does bucketing change in the bytes sent?",
    f"{bucketed['calls_per_step'][1]} calls (buckets of {bucketed['buckets']} bytes); the "
    "bytes stay 2(N-1)/N·P: only the number of messages changes.",
)
faster = speed[4]["samples/s"] > speed[two]["samples/s"]
exercises.add(
    f"Would 4 ranks on {cores} cores train faster than {two} ranks on {two} cores?",
    f"{'Yes' if faster else 'No'}: measured {speed[4]['samples/s']:,.0f} against "
    f"{speed[two]['samples/s']:,.0f} samples/s, with {speed[4]['backward ms']:.0f} against "
    f"{speed[two]['backward ms']:.0f} ms per step in forward + backward.",
)
exercises
