"""
Large-batch training: SGD, LARS and LAMB from small to large batches
====================================================================

Data parallelism makes the *global* batch grow with the number of ranks: 4 ranks with 32 samples
each train with a batch of 128, 1,024 GPUs with 32 each with 32,768. A larger batch makes each
step cheaper per sample (fixed costs and the gradient all-reduce are paid once per step, not per
sample), so an epoch takes less time. But a fixed number of epochs then means fewer optimizer
steps, and the usual fix, a proportionally larger learning rate, makes plain SGD unstable.
LARS (You et al. 2017) and LAMB (You et al. 2019) give each layer its own step size, scaled
by a *trust ratio*, and were how ResNet-50 and BERT were trained with batches of 32k and 64k.

**In this tutorial** you will

1. write down the LARS and LAMB updates and see the trust ratios of a real network;
2. check that a data-parallel large-batch step on 4 ranks equals the serial step;
3. train a small CNN on MNIST-1D on 4 CPU ranks with batches from 64 to 4,096, with
   SGD+momentum, LARS, LAMB and AdamW, under linear LR scaling, warm-up and cosine decay and a
   fixed epoch budget, and measure test accuracy, samples/s, time per epoch and time to a
   target accuracy;
4. trace LARS's trust ratios layer by layer;
5. see the Colossal-AI code for the same optimizers.

Everything is measured on the machine that built this page, with a deliberately small budget
(see the constants below); the commentary says what such a budget can and cannot show.
"""

# %%
# Set-up
# ------
# The constants size the run. A reader with more cores or time raises ``EPOCHS`` and
# ``N_TRAIN`` first: the whole comparison is at a *fixed epoch budget*, and with the defaults a
# batch of 4,096 gets only ``EPOCHS * N_TRAIN / 4096`` optimizer steps.

import math
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from cai_labs import Ledger, comm_totals, device, launch
from cai_labs.data.mnist1d import load_mnist1d_split
from cai_labs.data_parallel import BucketedDataParallel, allreduce_gradients, shard_batch
from cai_labs.models.cnn1d import CNN1d
from cai_labs.optim import LAMB, LARS, linear_scaled_lr, param_groups, warmup_cosine

WORLD_SIZE = 4  # data-parallel ranks
N_TRAIN, N_TEST = 8192, 2048  # MNIST-1D samples generated for this page
BATCH_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # global batches (divisible by 4)
EPOCHS = 4  # the fixed budget, the same for every batch size
BASE_BATCH = 256  # batch size at which the base learning rates below hold
BASE_LR = {  # peak rate at BASE_BATCH; at batch B the peak is BASE_LR * B / BASE_BATCH
    "SGD+momentum": 0.1,
    "LARS": 20.0,  # LARS steps are lr * eta * ||w||: its lr lives on another scale
    "LAMB": 0.02,
    "AdamW": 0.004,
}
WEIGHT_DECAY = {"SGD+momentum": 5e-4, "LARS": 5e-4, "LAMB": 0.01, "AdamW": 0.01}
TRUST_COEFFICIENT = 0.001  # LARS's eta, the paper's value
WARMUP_EPOCHS = 1.0  # linear warm-up length, then cosine decay to 0
TARGET_ACCURACY = 0.7  # for "time to target accuracy"
CHANNELS = (16, 32, 32)
SEED = 0

data = load_mnist1d_split(N_TRAIN, N_TEST, seed=42)
n_params = sum(p.numel() for p in CNN1d(channels=CHANNELS).parameters())
print(
    f"MNIST-1D: train {tuple(data.x_train.shape)}, test {tuple(data.x_test.shape)}; "
    f"CNN parameters: {n_params:,}"
)
for b in BATCH_SIZES:
    if b % WORLD_SIZE or N_TRAIN % b:
        raise ValueError(
            f"batch {b} must divide N_TRAIN={N_TRAIN} and be divisible by "
            f"WORLD_SIZE={WORLD_SIZE}; change BATCH_SIZES or N_TRAIN"
        )

# %%
# The two optimizers
# ------------------
# **LARS** (You, Gitman, Ginsburg 2017, Algorithm 1). For each layer :math:`l` (one weight
# tensor) with weights :math:`w^l`, gradient :math:`g^l`, global rate :math:`\gamma_t`, trust
# coefficient :math:`\eta`, weight decay :math:`\beta`, momentum :math:`m`:
#
# .. math::
#
#    \lambda^l = \eta\,\frac{\|w^l\|}{\|g^l\| + \beta\|w^l\|},\qquad
#    v^l \leftarrow m\,v^l + \gamma_t\,\lambda^l\,(g^l + \beta w^l),\qquad
#    w^l \leftarrow w^l - v^l .
#
# The step of each layer is about :math:`\gamma_t\eta\|w^l\|` long: a fixed *fraction* of the
# layer's size, however large or small its gradient. That is what lets the rate grow with the
# batch without the layers with large gradients blowing up.
#
# **LAMB** (You et al. 2019, Algorithm 2) does the same to Adam's direction:
#
# .. math::
#
#    m_t = \beta_1 m_{t-1} + (1-\beta_1)g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2)g_t^2,\quad
#    r_t = \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)}+\epsilon} + \lambda x_t,\quad
#    x_{t+1} = x_t - \eta_t\,\frac{\|x_t\|}{\|r_t\|}\,r_t .
#
# Biases and normalisation scales and shifts are usually left out of both weight decay
# (decaying a GroupNorm gain to zero switches its channels off) and the trust ratio (their norm
# says nothing about a useful step; a GroupNorm shift starts at exactly zero, where the ratio
# is undefined and falls back to 1). :func:`~cai_labs.optim.param_groups` builds the two groups;
# here they are for our CNN. One more choice matters for LARS: an excluded tensor takes plain
# SGD steps at the group's rate, and LARS's global rate is orders of magnitude larger than
# SGD's (its steps are :math:`\gamma\eta\|w\|` with :math:`\eta = 10^{-3}`; compare the two in
# ``BASE_LR``). So we give the excluded group the SGD rate (``excluded_lr``); the run at the
# end of the sweep measures what happens without it.

model = CNN1d(channels=CHANNELS, seed=SEED)
for g in param_groups(model, weight_decay=5e-4):
    print(f"weight_decay={g['weight_decay']:<7g} adapt={g['adapt']!s:<5} {', '.join(g['names'])}")

# %%
# One step of each on a batch of 4,096, and the trust ratio each weight tensor got (LARS's
# includes :math:`\eta = 10^{-3}`; LAMB's is :math:`\|x\|/\|r\|`). They differ between layers
# by an order of magnitude: that spread is what one global rate cannot serve.

x0, y0 = data.x_train[: BATCH_SIZES[-1]], data.y_train[: BATCH_SIZES[-1]]
first_ratios = {}
for name, cls, kw in (
    ("LARS", LARS, {"lr": 1.0, "trust_coefficient": TRUST_COEFFICIENT}),
    ("LAMB", LAMB, {"lr": 0.01}),
):
    m = CNN1d(channels=CHANNELS, seed=SEED)
    opt = cls(param_groups(m, 5e-4), **kw)
    nn.functional.cross_entropy(m(x0), y0).backward()
    opt.step()
    first_ratios[name] = opt.trust_ratios()
pd.DataFrame(first_ratios).style.format("{:.3g}").set_caption("trust ratio of the first step")

# %%
# Check: the data-parallel large-batch step equals the serial step
# ----------------------------------------------------------------
# After the gradient all-reduce every rank holds the full-batch gradient, so it computes the same
# norms, the same ratios and the same step: LARS and LAMB need no change for data parallelism
# (the norms are of whole tensors, which each rank holds; under ZeRO or tensor parallelism,
# where a rank holds a shard, the norms would need an all-reduce of their own). Three steps
# with a batch of 4,096 on ``WORLD_SIZE`` ranks against one process. The all-reduce sums in
# another order than the serial backward, so the results agree to rounding, not bit for bit.
# Rounding is then amplified by the training itself (Adam-type updates divide by
# :math:`\sqrt{v}`, and a slightly different step changes the next gradient), so after a few
# float32 steps the difference is well above float32's epsilon. The check that fails the build
# therefore runs in float64, where a real error would stand out far above rounding; the float32
# rows show the size of the rounding effect in this run:

CHECK_STEPS = 3


def check_steps(name: str, world: int, rank: int, dtype: torch.dtype) -> list[torch.Tensor]:
    m = CNN1d(channels=CHANNELS, seed=SEED).to(device(), dtype)
    groups = param_groups(m, 5e-4, excluded_lr=0.1 if name == "LARS" else None)
    opt = LARS(groups, lr=5.0) if name == "LARS" else LAMB(groups, lr=0.02)
    for s in range(CHECK_STEPS):
        b = BATCH_SIZES[-1]
        idx = torch.arange(s * b, (s + 1) * b) % N_TRAIN
        x, y = data.x_train[idx].to(device()), data.y_train[idx].to(device())
        xs, ys = shard_batch(x, y, rank=rank, world_size=world)
        opt.zero_grad()
        nn.functional.cross_entropy(m(xs.to(dtype)), ys).backward()
        if world > 1:
            allreduce_gradients(m)
        opt.step()
    return [p.detach().clone() for p in m.parameters()]


CHECKS = [(n, dt) for n in ("LARS", "LAMB") for dt in (torch.float64, torch.float32)]


def check_worker() -> dict:
    return {c: check_steps(c[0], dist.get_world_size(), dist.get_rank(), c[1]) for c in CHECKS}


parallel = launch(check_worker, WORLD_SIZE)
check_rows = []
for name, dtype in CHECKS:
    serial = check_steps(name, 1, 0, dtype)
    gap = max((a - b).abs().max().item() for a, b in zip(parallel[(name, dtype)], serial))
    scale = max(b.abs().max().item() for b in serial)
    check_rows.append(
        {
            "optimizer": name,
            "dtype": str(dtype).replace("torch.", ""),
            "max |θ_parallel - θ_serial|": gap,
            "max |θ|": scale,
            "machine epsilon": torch.finfo(dtype).eps,
        }
    )
    if dtype == torch.float64:
        assert gap < 1e-10 * scale, f"data-parallel {name} differs from the serial step"
pd.DataFrame(check_rows).set_index(["optimizer", "dtype"]).style.format("{:.2e}")

# %%
# The sweep
# ---------
# One function runs on every rank. For each optimizer and global batch :math:`B`, it trains a
# fresh CNN from the same seed for ``EPOCHS`` epochs; each rank takes :math:`B/4` samples of
# every batch; gradients are averaged by :class:`~cai_labs.data_parallel.BucketedDataParallel`
# (one all-reduce bucket per step, overlapped with backward). The learning rate follows the
# recipe of Goyal et al. (2017):
#
# .. math::
#
#    \gamma_{\text{peak}}(B) = \gamma_{\text{base}}\,\frac{B}{256},\qquad
#    \gamma_s = \gamma_{\text{peak}}\cdot\begin{cases} \frac{s+1}{W} & s < W\\
#    \tfrac12\big(1+\cos\pi\frac{s-W}{S-W}\big) & s\ge W\end{cases}
#
# with :math:`S` steps in all and :math:`W` = one epoch of warm-up. After every epoch the ranks
# evaluate a quarter of the test set each and sum the correct counts. The timer covers only
# training steps (forward, backward, all-reduce, optimizer), measured on rank 0.


def make_optimizer(name: str, model: nn.Module, batch: int, sgd_rate_for_excluded: bool = True):
    lr = linear_scaled_lr(BASE_LR[name], batch, BASE_BATCH)
    excluded_lr = None
    if name == "LARS" and sgd_rate_for_excluded:
        excluded_lr = linear_scaled_lr(BASE_LR["SGD+momentum"], batch, BASE_BATCH)
    groups = param_groups(model, WEIGHT_DECAY[name], excluded_lr=excluded_lr)
    if name == "SGD+momentum":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if name == "LARS":
        return LARS(groups, lr=lr, momentum=0.9, trust_coefficient=TRUST_COEFFICIENT)
    if name == "LAMB":
        return LAMB(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def evaluate(model: nn.Module, rank: int, world: int) -> float:
    x, y = data.x_test.to(device()), data.y_test.to(device())
    xs, ys = shard_batch(x, y, rank=rank, world_size=world)
    with torch.no_grad():
        hits = (model(xs).argmax(1) == ys).sum().item()
        correct = torch.tensor([hits], dtype=torch.float64, device=device())
    dist.all_reduce(correct)
    return correct.item() / N_TEST


def train_one(name: str, batch: int, sgd_rate_for_excluded: bool = True) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = BucketedDataParallel(CNN1d(channels=CHANNELS, seed=SEED).to(device()), bucket_mb=1.0)
    opt = make_optimizer(name, model.module, batch, sgd_rate_for_excluded)
    peak = opt.param_groups[0]["lr"]
    steps_per_epoch = N_TRAIN // batch
    total = EPOCHS * steps_per_epoch
    sched = warmup_cosine(opt, total, max(1, round(WARMUP_EPOCHS * steps_per_epoch)))
    record_ratios = isinstance(opt, LARS)
    out = {
        "optimizer": name,
        "batch": batch,
        "peak_lr": peak,
        "steps": total,
        "acc": [],
        "epoch_time": [],
        "ratios": [],
        "lr": [],
        "loss": [],
    }
    sent = buffer = 0
    for epoch in range(EPOCHS):
        order = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(epoch))
        elapsed = 0.0
        with Ledger(track_activations=False) as ledger:  # counts the training all-reduces
            for s in range(steps_per_epoch):
                idx = order[s * batch : (s + 1) * batch]
                x, y = data.x_train[idx].to(device()), data.y_train[idx].to(device())
                xs, ys = shard_batch(x, y, rank=rank, world_size=world)
                start = time.perf_counter()
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xs), ys)
                loss.backward()  # the bucket's all-reduce runs inside backward
                opt.step()
                elapsed += time.perf_counter() - start
                out["lr"].append(opt.param_groups[0]["lr"])
                sched.step()
                out["loss"].append(loss.item())
                if record_ratios:
                    out["ratios"].append(opt.trust_ratios())
        totals = comm_totals(ledger.report())["all_reduce"]
        buffer, sent = buffer + totals["bytes"], sent + totals["modeled_sent_bytes"]
        out["epoch_time"].append(elapsed)
        out["acc"].append(evaluate(model.module, rank, world))
    out["diverged"] = not all(math.isfinite(v) for v in out["loss"])
    out["allreduce_bytes"], out["modeled_sent_bytes"] = buffer, sent
    return out


def sweep_worker(jobs: list[tuple]) -> list[dict]:
    results = []
    for job in jobs:
        r = train_one(*job)
        results.append(r)
        if dist.get_rank() == 0:  # (rank 0's prints are the ones shown on the page)
            print(
                f"{r['optimizer']:>13} B={r['batch']:>5}: lr {r['peak_lr']:8.4g}, "
                f"{r['steps']:>4} steps, test acc {r['acc'][-1]:.3f}, "
                f"{sum(r['epoch_time']):6.2f} s"
            )
    return results


OPTIMIZERS = list(BASE_LR)
jobs = [(name, b) for b in BATCH_SIZES for name in OPTIMIZERS]
ABLATION_BATCH = 512  # LARS with the excluded tensors at LARS's own global rate
jobs.append(("LARS", ABLATION_BATCH, False))
sweep_start = time.perf_counter()
runs = launch(sweep_worker, WORLD_SIZE, jobs, timeout=1800)
print(f"sweep: {len(runs)} runs in {time.perf_counter() - sweep_start:.0f} s of wall time")
ablation = runs.pop()

# %%
# Results table
# -------------
# Every number below comes from the sweep that just ran. Columns: the peak learning rate after
# linear scaling; the number of optimizer steps the fixed budget allows
# (:math:`\text{EPOCHS}\cdot N/B`); test accuracy after the last epoch and the best over epochs;
# measured training time per epoch and samples per second (rank 0's clock, so including waits
# for the slowest rank); the measured time until the test accuracy first reached
# ``TARGET_ACCURACY`` (checked after each epoch, so it is a sum of epoch times; "not reached"
# if never); and the all-reduced gradient bytes per training sample, from the ledger, next to the
# formula :math:`P/B` (one all-reduce of all :math:`P` gradient bytes per step of :math:`B`
# samples).

grad_bytes = n_params * 4


def time_to_target(r: dict) -> float:
    elapsed = np.cumsum(r["epoch_time"])
    hit = [t for t, a in zip(elapsed, r["acc"]) if a >= TARGET_ACCURACY]
    return float(hit[0]) if hit else float("nan")


rows = []
for r in runs:
    rows.append(
        {
            "batch": r["batch"],
            "optimizer": r["optimizer"],
            "peak lr": r["peak_lr"],
            "steps": r["steps"],
            "test acc (last)": r["acc"][-1],
            "test acc (best)": max(r["acc"]),
            "diverged": "yes" if r["diverged"] else "",
            "s / epoch": float(np.mean(r["epoch_time"])),
            "samples / s": EPOCHS * N_TRAIN / sum(r["epoch_time"]),
            f"s to {TARGET_ACCURACY:.0%}": time_to_target(r),
            "all-reduce B/sample": r["allreduce_bytes"] / (EPOCHS * N_TRAIN),
            "formula P/B": grad_bytes / r["batch"],
        }
    )
results = pd.DataFrame(rows).set_index(["batch", "optimizer"])
pd.set_option("display.width", 220)
results.style.format(
    {
        "peak lr": "{:.4g}",
        "test acc (last)": "{:.3f}",
        "test acc (best)": "{:.3f}",
        "s / epoch": "{:.2f}",
        "samples / s": "{:,.0f}",
        f"s to {TARGET_ACCURACY:.0%}": "{:.2f}",
        "all-reduce B/sample": "{:,.1f}",
        "formula P/B": "{:,.1f}",
    },
    na_rep="not reached",
).background_gradient(subset=["test acc (last)"], cmap="RdYlGn", vmin=0.1, vmax=1.0)

# %%
# The ledger's bytes equal the formula in every row: one bucket of all gradients per step,
# whatever the optimizer. LARS and LAMB add no communication in data parallelism.

for r in runs:
    assert r["allreduce_bytes"] == r["steps"] * grad_bytes, (r["optimizer"], r["batch"])

# %%
# Accuracy against batch size
# ---------------------------

acc = results["test acc (last)"].unstack("optimizer")[OPTIMIZERS]
fig, ax = plt.subplots(figsize=(7, 4))
for name in OPTIMIZERS:
    ax.plot(acc.index, acc[name], marker="o", label=name)
ax.axhline(TARGET_ACCURACY, color="gray", ls=":", lw=1, label=f"target {TARGET_ACCURACY:.0%}")
ax.axhline(0.1, color="gray", ls="--", lw=1, label="chance")
ax.set(
    xscale="log",
    xlabel="global batch size (4 ranks)",
    ylabel="test accuracy after budget",
    title=f"MNIST-1D CNN, {EPOCHS} epochs at every batch size",
)
ax.set_xticks(BATCH_SIZES, [str(b) for b in BATCH_SIZES])
ax.legend()
fig.tight_layout()

# %%
# How to read it. Two effects shape these curves. The fixed budget gives a batch :math:`B`
# only :math:`\text{EPOCHS}\cdot N/B` steps, so every optimizer declines once the steps run
# short; that decline is shared and gradual. Linear scaling multiplies the peak rate by
# :math:`B/256`, and past some batch the rate exceeds what an optimizer tolerates: that shows as
# a *cliff* between two neighbouring batch sizes for one optimizer only. LARS and LAMB bound each
# layer's step relative to its own weights, which is meant to push the cliff to larger rates;
# they do not add steps, so they cannot undo the first effect. The lines below are computed
# from this run:

for b in BATCH_SIZES:
    row = acc.loc[b]
    print(
        f"B={b:>5}: best {row.idxmax():>13} {row.max():.3f}, worst {row.idxmin():>13} "
        f"{row.min():.3f}; {int(results.loc[b, 'steps'].iloc[0])} steps"
    )
for name in OPTIMIZERS:
    ref = acc[name].iloc[0]
    kept = [b for b in BATCH_SIZES if acc.loc[b, name] >= ref - 0.02]
    print(
        f"{name:>13}: within 2 points of its B={BATCH_SIZES[0]} accuracy ({ref:.3f}) "
        f"up to B={max(kept)}"
    )

# %%
# Speed: what a larger batch buys
# -------------------------------
# Per epoch, a run makes :math:`N/B` steps. Each step has a fixed part (Python, launching
# kernels, optimizer bookkeeping, the all-reduce latency) and a part proportional to the
# :math:`B/4` samples each rank computes. So the time per epoch is about
# :math:`\frac{N}{B}\,t_{\text{fixed}} + N\,t_{\text{sample}}/4`: it falls with :math:`B` until
# the per-sample part dominates, and the samples per second saturate. The gradient bytes sent
# per epoch, :math:`\frac{N}{B}\cdot 2\frac{n-1}{n}P`, fall as :math:`1/B` (last table column).

speed = results[["s / epoch", "samples / s"]].groupby(level="batch").mean()
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
for name in OPTIMIZERS:
    sub = results.xs(name, level="optimizer")
    ax1.plot(sub.index, sub["samples / s"], marker="o", label=name)
    ax2.plot(sub.index, sub["s / epoch"], marker="o", label=name)
ax1.set(
    xscale="log",
    yscale="log",
    xlabel="global batch size",
    ylabel="training samples / s",
    title="Throughput, 4 CPU ranks (measured)",
)
ax2.set(
    xscale="log",
    yscale="log",
    xlabel="global batch size",
    ylabel="seconds per epoch",
    title="Time per epoch (measured)",
)
for a in (ax1, ax2):
    a.set_xticks(BATCH_SIZES, [str(b) for b in BATCH_SIZES])
    a.legend()
fig.tight_layout()
print(
    f"throughput, mean over optimizers: {speed['samples / s'].iloc[0]:,.0f} samples/s at "
    f"B={BATCH_SIZES[0]}, {speed['samples / s'].iloc[-1]:,.0f} at B={BATCH_SIZES[-1]} "
    f"({speed['samples / s'].iloc[-1] / speed['samples / s'].iloc[0]:.1f}x)"
)
per_batch = results["samples / s"].groupby(level="batch")
spread = float((per_batch.max() / per_batch.min()).max())
print(f"largest spread between optimizers at one batch size: {spread:.1f}x")

# %%
# The throughput printed above is the "acceleration from a larger batch": the same epoch of
# data, processed in fewer, larger steps. Here it comes from amortising per-step overheads
# over more samples (the CNN is tiny, so at :math:`B=64` each rank computes only 16 samples per
# step), and from fewer all-reduces.
#
# At one batch size the optimizers do the same forward, backward and all-reduce; what differs
# is the optimizer step itself (LARS and LAMB here are readable Python loops over tensors,
# PyTorch's SGD and AdamW use fused multi-tensor kernels) and the noise of single wall-clock
# measurements on a machine that other jobs may share during the build. Compare the spread
# printed above with the trend over batch sizes before reading anything into one row.
#
# Time to a target accuracy
# -------------------------
# Speed only matters if the model still learns. Test accuracy after each epoch against the
# training time spent so far; the dotted line is ``TARGET_ACCURACY``. A point to the left is a
# faster run; a curve that never crosses the line never got there within the budget.

fig, axes = plt.subplots(1, len(OPTIMIZERS), figsize=(13, 3.6), sharey=True)
for ax, name in zip(axes, OPTIMIZERS):
    for r in runs:
        if r["optimizer"] == name:
            ax.plot(np.cumsum(r["epoch_time"]), r["acc"], marker=".", label=f"B={r['batch']}")
    ax.axhline(TARGET_ACCURACY, color="gray", ls=":", lw=1)
    ax.set(xscale="log", title=name, xlabel="training seconds (measured)")
axes[0].set_ylabel("test accuracy")
axes[-1].legend(fontsize=8)
fig.tight_layout()
ttt = results[f"s to {TARGET_ACCURACY:.0%}"].unstack("optimizer")[OPTIMIZERS]
for name in OPTIMIZERS:
    col = ttt[name].dropna()
    if len(col):
        print(
            f"{name:>13}: fastest to {TARGET_ACCURACY:.0%} at B={col.idxmin()} "
            f"({col.min():.2f} s); reached at B in {list(col.index)}"
        )
    else:
        print(f"{name:>13}: never reached {TARGET_ACCURACY:.0%} within {EPOCHS} epochs")

# %%
# LARS's trust ratios, layer by layer
# -----------------------------------
# The ratio :math:`\lambda^l = \eta\|w^l\|/(\|g^l\|+\beta\|w^l\|)` of every weight tensor at
# every step, for the smallest and the largest batch (the dashed line, right axis, is the global
# rate :math:`\gamma_t` of the schedule). A layer's effective rate is :math:`\gamma_t\lambda^l`.
# Layers whose gradients are small relative to their weights get large ratios, and the other
# way round; a larger batch has a less noisy gradient, a smaller :math:`\|g\|`, so larger
# ratios.

lars_runs = {r["batch"]: r for r in runs if r["optimizer"] == "LARS"}
shown = [BATCH_SIZES[0], BATCH_SIZES[-1]]
layers = [
    n
    for n in lars_runs[shown[0]]["ratios"][0]
    if n.endswith("weight") and not n.startswith(("features.1", "features.4", "features.7"))
]
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for ax, b in zip(axes, shown):
    r = lars_runs[b]
    steps = np.arange(1, len(r["ratios"]) + 1)
    for n in layers:
        ax.plot(steps, [d[n] for d in r["ratios"]], label=n)
    ax.set(
        yscale="log",
        xlabel="optimizer step",
        ylabel="trust ratio λ (η included)",
        title=f"LARS, B={b}, {len(steps)} steps",
    )
    twin = ax.twinx()
    twin.plot(steps, r["lr"], color="black", ls="--", lw=1)
    twin.set_ylabel("global lr γ (dashed)")
axes[0].legend(fontsize=8)
fig.tight_layout()
for b in shown:
    first, last = lars_runs[b]["ratios"][0], lars_runs[b]["ratios"][-1]
    print(f"B={b}: " + ", ".join(f"{n} {first[n]:.2e}->{last[n]:.2e}" for n in layers))

# %%
# Which rate for the excluded tensors?
# ------------------------------------
# In the sweep, LARS's biases and GroupNorm parameters took plain SGD steps at the SGD rate.
# Many LARS implementations give them the optimizer's own global rate instead (one group rate
# for all). LARS's global rate, orders of magnitude above SGD's, makes that a very different
# step:

base = results.loc[(ABLATION_BATCH, "LARS")]
print(
    f"LARS at B={ABLATION_BATCH}, peak lr {ablation['peak_lr']:.4g}: excluded tensors at the "
    f"SGD rate -> test acc {base['test acc (last)']:.3f}; at the LARS rate -> "
    f"{ablation['acc'][-1]:.3f}{' (the loss became NaN)' if ablation['diverged'] else ''}"
)

# %%
# What these measurements allow concluding
# ----------------------------------------
# * **Correctness** is established: the data-parallel LARS and LAMB steps equal the serial ones,
#   and the gradient traffic equals the formula in every run.
# * **Speed**: the throughput gain from a larger batch is measured, on 4 ranks sharing the
#   cores of one machine. On this tiny CNN the fixed cost per step dominates at small batches,
#   so the gain is large; on GPUs with a large model, where one step of a small batch already
#   keeps the device busy, the gain comes mostly from fewer all-reduces per epoch, and is smaller.
# * **Accuracy**: with ``EPOCHS`` epochs, one seed, one base rate per optimizer and one
#   small network, the accuracy table is a single noisy sample, not a ranking of optimizers.
#   What it does show robustly is the mechanism: at a fixed epoch budget a batch of 4,096 gets
#   only a handful of steps, and neither a layer-wise ratio nor a scaled rate turns a handful
#   of steps into a trained network. Where LARS or LAMB beat SGD in the rows above, that is
#   consistent with the papers' claim (they keep the per-layer step bounded while the global rate
#   grows), but a claim like "LAMB trains at 4k without loss" needs the budgets of the papers:
#   tens of epochs, a tuned warm-up per batch size, and several seeds.
# * **Tuning**: the base rates were chosen once at ``BASE_BATCH`` and scaled linearly. The
#   papers tune the peak rate per batch size (LARS) or scale it with :math:`\sqrt{B}` (LAMB,
#   :func:`~cai_labs.optim.sqrt_scaled_lr`); raise ``EPOCHS`` and try both.
#
# Colossal-AI's optimizers, side by side
# --------------------------------------
# Colossal-AI ships ``colossalai.nn.optimizer.Lars`` and ``Lamb`` (and ``FusedLAMB`` and
# ``DistributedLamb`` for CUDA and sharded models). Its ``Lars`` and ``Lamb`` are plain PyTorch
# and run on CPU. Their conventions differ from the papers in two places, which the cell below
# (and ``nox -s colossalai``) matches explicitly: ``Lamb`` has **no bias correction** (arXiv v3 of
# the paper) and gives every tensor a trust ratio; ``Lars`` keeps the **raw gradient in the
# momentum buffer** and scales the whole buffer by :math:`\gamma\lambda` (like PyTorch's SGD),
# clips the ratio at 50 and gradients at :math:`\pm 10`, and excludes a group with ``lars=False``.

try:
    import colossalai  # noqa: F401

    HAVE_COLOSSALAI = True
except Exception:  # not installed, or installed against another torch
    HAVE_COLOSSALAI = False


def colossalai_side_by_side(steps: int = 5) -> dict:
    from colossalai.nn.optimizer import Lamb, Lars

    gaps = {}
    x, y = data.x_train[:256], data.y_train[:256]
    for name in ("LARS", "LAMB"):
        ours_model = CNN1d(channels=CHANNELS, seed=SEED)
        theirs_model = CNN1d(channels=CHANNELS, seed=SEED)
        if name == "LARS":
            ours = LARS(
                param_groups(ours_model, 5e-4, excluded_lr=0.1),
                lr=2.0,
                momentum=0.9,
                max_trust_ratio=50.0,
                lr_in_momentum=False,
            )
            groups = param_groups(theirs_model, 5e-4, excluded_lr=0.1)
            for g in groups:
                g["lars"] = g["adapt"]  # Colossal-AI's exclusion flag
            theirs = Lars(groups, lr=2.0, momentum=0.9, eeta=1e-3, weight_decay=5e-4)
        else:
            ours = LAMB(
                param_groups(ours_model, 0.01, exclude_from_adaptation=False),
                lr=0.01,
                bias_correction=False,
            )
            theirs = Lamb(
                param_groups(theirs_model, 0.01, exclude_from_adaptation=False),
                lr=0.01,
                weight_decay=0.01,
            )
        for _ in range(steps):
            for model, opt in ((ours_model, ours), (theirs_model, theirs)):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        gaps[name] = max(
            (a - b).abs().max().item()
            for a, b in zip(ours_model.parameters(), theirs_model.parameters())
        )
    return gaps


if HAVE_COLOSSALAI:
    print(
        f"Colossal-AI {colossalai.__version__}: executed; largest |parameter difference| "
        f"after 5 steps vs cai_labs: {colossalai_side_by_side()}"
    )
else:
    print(
        "colossalai is not installed where this page ran; install it as `nox -s colossalai` "
        "does to run the Colossal-AI cells (that session runs the same comparison as a test)"
    )

# %%
# At real scale
# -------------
# Large batches matter because each step's gradient all-reduce is paid once per batch: with
# more GPUs at a fixed 32 images per GPU, the step time stays nearly flat while the epoch takes
# fewer steps. :mod:`cai_labs.scale` on ResNet-50 (ImageNet-1k, 1,281,167 training images, 90
# epochs as in Goyal et al. 2017), data parallel in bf16 on A100 80 GB, for global batches
# from 256 to 32,768 (the LARS and LAMB papers' range). **Modeled** (model states and FLOPs;
# the page's measured accuracy per batch size is what says whether a batch still converges).
# The efficiency constant comes from transformer runs; convolutions reach less of the peak, so
# read the times as a lower bound and the columns relative to each other.

from cai_labs.scale import ScaleLayout, predict

IMAGENET, EPOCHS = 1_281_167, 90
big = []
for batch in (256, 1024, 4096, 8192, 32768):
    gpus = batch // 32
    p = predict(
        "resnet-50", "a100-80gb", ScaleLayout(dp=gpus, micro_batch_size=32, global_batch=batch)
    )
    hours = EPOCHS * IMAGENET / batch * p.step_time_s / 3600
    big.append(
        {
            "global batch": batch,
            "GPUs": gpus,
            "step (ms)": 1e3 * p.step_time_s,
            "images/s/GPU": p.tokens_per_s_per_gpu,
            f"{EPOCHS} epochs (h)": hours,
            "bound": p.bound,
        }
    )
big = pd.DataFrame(big).set_index("global batch")
big.style.format(
    {"step (ms)": "{:.1f}", "images/s/GPU": "{:,.0f}", f"{EPOCHS} epochs (h)": "{:.2f}"}
)

# %%
# Running it on GPUs
# ------------------
# ``launch`` uses ``cpu:gloo,cuda:nccl`` when as many GPUs as ranks are visible, and runs on
# torchrun's processes under ``torchrun``, so this page runs on a 4-GPU node as
# ``torchrun --nproc-per-node=4 tutorial_04_large_batch.py`` (the workers already put data and
# model on ``cai_labs.device()``: the rank's GPU there, the CPU here). With Colossal-AI the
# training loop of a GPU cluster is the function below; its ``TorchDDPPlugin`` and optimizers
# run on CPU too, so this build runs it on ``WORLD_SIZE`` CPU ranks and once on one rank with
# the whole batch: data parallelism must not change the trajectory. On a GPU cluster, start it
# with ``colossalai run --nproc_per_node 4`` and call ``colossalai.launch_from_torch()`` before
# it (here ``launch`` made the group).


def colossalai_large_batch(name: str = "LARS", steps: int = 6, batch: int = 512) -> list:
    from colossalai.booster import Booster
    from colossalai.booster.plugin import TorchDDPPlugin
    from colossalai.nn.optimizer import Lamb, Lars

    model = CNN1d(channels=CHANNELS, seed=SEED).to(device())
    optimizer = (
        Lars(model.parameters(), lr=2.0, momentum=0.9, eeta=TRUST_COEFFICIENT)
        if name == "LARS"
        else Lamb(model.parameters(), lr=0.01, weight_decay=0.01)
    )
    scheduler = warmup_cosine(optimizer, total_steps=steps, warmup_steps=2)
    booster = Booster(plugin=TorchDDPPlugin())
    model, optimizer, loss_fn, _, scheduler = booster.boost(
        model, optimizer, nn.CrossEntropyLoss(), lr_scheduler=scheduler
    )
    for s in range(steps):  # each rank: its batch / world_size samples
        x, y = data.x_train[s * batch : (s + 1) * batch], data.y_train[s * batch : (s + 1) * batch]
        x, y = shard_batch(x, y, rank=dist.get_rank(), world_size=dist.get_world_size())
        booster.backward(loss_fn(model(x.to(device())), y.to(device())), optimizer)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return [p.detach().cpu() for p in model.unwrap().parameters()]


# %%
# Both optimizers normalise each tensor's update, so a gradient that differs in its last bits
# (the all-reduce sums the ranks' means in another order) moves each weight by an amount that
# differs by a few float32 epsilons of the update, per step.

if HAVE_COLOSSALAI:
    import colossalai.booster.plugin  # noqa: F401 -- imported once, inherited by forked ranks

    ddp_gaps = {}
    for name in ("LARS", "LAMB"):
        many, one = (launch(colossalai_large_batch, n, name) for n in (WORLD_SIZE, 1))
        ddp_gaps[name] = max((a - b).abs().max().item() for a, b in zip(many, one))
    tol = 6 * 64 * torch.finfo(torch.float32).eps  # steps x 64 eps
    print(f"Booster + TorchDDPPlugin on {WORLD_SIZE} ranks vs 1 rank, max |difference|:", ddp_gaps)
    assert max(ddp_gaps.values()) < tol, (ddp_gaps, tol)

# %%
# For models sharded with ZeRO or tensor parallelism, a rank holds only part of a tensor, and the
# trust ratio's norms must be all-reduced over the shards; that is what Colossal-AI's
# ``DistributedLamb`` does.
