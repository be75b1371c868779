"""
Large-batch training: SGD, LARS and LAMB from small to large batches
====================================================================

Tune SGD, LARS, LAMB and AdamW at a small batch, scale them to a batch 8 times larger at the
same number of epochs, and measure what each keeps of its accuracy and what the larger batch
buys in speed on 4 data-parallel CPU ranks.

Data parallelism makes the *global* batch grow with the number of ranks: 4 ranks with 32 samples
each train with a batch of 128, 1,024 GPUs with 32 each with 32,768. A larger batch makes each
step cheaper per sample (fixed costs and the gradient all-reduce are paid once per step, not per
sample), so an epoch takes less time. But a fixed number of epochs then means fewer optimizer
steps, and the usual fix, a proportionally larger learning rate, makes plain SGD unstable.
LARS (You et al. 2017) and LAMB (You et al. 2019) give each layer its own step size, scaled
by a *trust ratio*. **Published** (not run here): LARS trained ResNet-50 on ImageNet with
batches up to 32k, LAMB trained BERT with batches up to 64k.

**In this tutorial** you will

1. write down the LARS and LAMB updates and see the trust ratios of a real network;
2. check that a data-parallel large-batch step on 4 ranks equals the serial step;
3. tune each optimizer's learning rate on a small grid at the base batch, on a validation set;
4. scale each tuned rate to larger batches at a fixed epoch budget and measure the test
   accuracy each optimizer keeps, next to the seed-to-seed noise of the same measurement, and
   with the linear and the square-root scaling rule at the largest batch;
5. measure samples/s and time per epoch on 4 data-parallel CPU ranks, and the time to a
   target accuracy;
6. trace LARS's trust ratios layer by layer, and see the Colossal-AI code for the same
   optimizers.

Everything is measured on the machine that built this page, with a deliberately small budget
(see the constants below); the commentary says what such a budget can and cannot show.

**Prerequisites:** tutorial 00 (data parallelism, the gradient all-reduce), SGD with momentum
and Adam, and what a learning-rate warm-up and decay schedule are.
"""

# %%
# Set-up
# ------
# The libraries, and where this page's numbers were measured:

import math
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

import cai_labs.colossal  # noqa: F401 -- quiets Colossal-AI's notices about CUDA-only packages
from cai_labs import Ledger, build_env, comm_totals, device, launch, report
from cai_labs.data.mnist1d import load_mnist1d_split
from cai_labs.data_parallel import BucketedDataParallel, allreduce_gradients, shard_batch
from cai_labs.exercises import Exercises
from cai_labs.models.cnn1d import CNN1d
from cai_labs.optim import LAMB, LARS, linear_scaled_lr, param_groups, sqrt_scaled_lr, warmup_cosine

WORLD_SIZE = 4  # data-parallel ranks of the correctness check and the speed measurements
print(build_env.describe(ranks=WORLD_SIZE))

# %%
# The constants size the run. The comparison is at a *fixed epoch budget*: a batch :math:`B`
# gets ``EPOCHS * N_TRAIN / B`` optimizer steps, so the largest batch is chosen to keep a few
# dozen. A reader with more cores or time raises ``EPOCHS`` and the last of ``BATCH_SIZES``.

N_TRAIN, N_VAL, N_TEST = 8192, 2048, 2040  # train, choose the rate, report (sum: a multiple of 10)
BASE_BATCH = 128  # the batch at which each optimizer's rate is tuned
BATCH_SIZES = (128, 512, 1024)  # global batches of the accuracy study (the first is the base)
EPOCHS = 16  # the fixed budget, the same for every batch size
LR_GRID = {  # the rates tried at BASE_BATCH, a factor 2 apart
    "SGD+momentum": (0.025, 0.05, 0.1, 0.2),
    "LARS": (10.0, 20.0, 40.0, 80.0),  # LARS steps are lr * eta * ||w||: another scale
    "LAMB": (0.01, 0.02, 0.04, 0.08),
    "AdamW": (0.016, 0.032, 0.064, 0.128),
}

# %%
# How each tuned rate grows with the batch, and the rest of the recipe:

RULES = {"linear": linear_scaled_lr, "sqrt": sqrt_scaled_lr}  # rate at B from the rate at B_0
SCALING = {"SGD+momentum": "linear", "LARS": "linear", "LAMB": "sqrt", "AdamW": "sqrt"}
WEIGHT_DECAY = {"SGD+momentum": 5e-4, "LARS": 5e-4, "LAMB": 0.01, "AdamW": 0.01}
EXCLUDED_LR = 0.1  # LARS: SGD rate of the biases and norm tensors at BASE_BATCH (see below)
TRUST_COEFFICIENT = 0.001  # LARS's eta, the paper's value
WARMUP_EPOCHS = 1.0  # linear warm-up length, then cosine decay to 0
TARGET_ACCURACY = 0.9  # for "time to target accuracy"
CHANNELS = (8, 16, 16)  # a narrow CNN: one run of the study takes seconds
SEED = 0  # initial weights and data order of every run
SEEDS = (SEED, 1)  # the second seed repeats each tuned base run, to measure the noise
WORKERS = 2  # independent training runs at a time (one per core of the build machine)
SPEED_BATCHES = (64, 128, 256, 512, 1024, 2048, 4096)  # batches of the speed measurements
SPEED_STEPS = 12  # data-parallel steps timed per optimizer and batch

# %%
# The data: procedurally generated MNIST-1D, with a validation split that chooses the rates and
# a test split, never used for a choice, that reports the results.

data = load_mnist1d_split(N_TRAIN, N_VAL + N_TEST, seed=42)
x_val, y_val = data.x_test[:N_VAL], data.y_test[:N_VAL]
x_test, y_test = data.x_test[N_VAL:], data.y_test[N_VAL:]
n_params = sum(p.numel() for p in CNN1d(channels=CHANNELS).parameters())
print(
    f"MNIST-1D: train {tuple(data.x_train.shape)}, validation {tuple(x_val.shape)}, "
    f"test {tuple(x_test.shape)}; CNN parameters: {n_params:,}"
)
for b in BATCH_SIZES + SPEED_BATCHES:
    if b % WORLD_SIZE or N_TRAIN % b or not set(BATCH_SIZES) <= set(SPEED_BATCHES):
        raise ValueError(
            f"batch {b} must divide N_TRAIN={N_TRAIN} and be divisible by "
            f"WORLD_SIZE={WORLD_SIZE}, and SPEED_BATCHES must hold BATCH_SIZES; change "
            "BATCH_SIZES, SPEED_BATCHES or N_TRAIN"
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
# SGD's (its steps are :math:`\gamma\eta\|w\|` with :math:`\eta = 10^{-3}`; compare the two grids in
# ``LR_GRID``). So we give the excluded group an SGD rate (``EXCLUDED_LR``, scaled with the
# batch like LARS's own); a run at the end of the page measures what happens without it.

model = CNN1d(channels=CHANNELS, seed=SEED)
for g in param_groups(model, weight_decay=5e-4):
    print(f"weight_decay={g['weight_decay']:<7g} adapt={g['adapt']!s:<5} {', '.join(g['names'])}")

# %%
# One step of each on a batch of 4,096, and the trust ratio each weight tensor got (LARS's
# includes :math:`\eta = 10^{-3}`; LAMB's is :math:`\|x\|/\|r\|`), and how far apart they lie
# from layer to layer: that spread is what one global rate cannot serve.

CHECK_BATCH = SPEED_BATCHES[-1]  # 4,096: the largest batch of the page
x0, y0 = data.x_train[:CHECK_BATCH], data.y_train[:CHECK_BATCH]
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
for name, r in first_ratios.items():
    spread = max(r.values()) / min(r.values())
    print(f"{name}: largest / smallest ratio over the weight tensors {spread:.0f}x")
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
# rows show the size of the rounding effect in this run. The steps, on any number of ranks:

CHECK_STEPS = 3


def check_steps(name: str, world: int, rank: int, dtype: torch.dtype) -> list[torch.Tensor]:
    m = CNN1d(channels=CHANNELS, seed=SEED).to(device(), dtype)
    groups = param_groups(m, 5e-4, excluded_lr=0.1 if name == "LARS" else None)
    opt = LARS(groups, lr=5.0) if name == "LARS" else LAMB(groups, lr=0.02)
    for s in range(CHECK_STEPS):
        idx = torch.arange(s * CHECK_BATCH, (s + 1) * CHECK_BATCH) % N_TRAIN
        x, y = data.x_train[idx].to(device()), data.y_train[idx].to(device())
        xs, ys = shard_batch(x, y, rank=rank, world_size=world)
        opt.zero_grad()
        nn.functional.cross_entropy(m(xs.to(dtype)), ys).backward()
        if world > 1:
            allreduce_gradients(m)
        opt.step()
    return [p.detach().clone() for p in m.parameters()]


# %%
# Both optimizers in both precisions on ``WORLD_SIZE`` ranks, then each in one process:

CHECKS = [(n, dt) for n in ("LARS", "LAMB") for dt in (torch.float64, torch.float32)]


def check_worker() -> dict:
    return {c: check_steps(c[0], dist.get_world_size(), dist.get_rank(), c[1]) for c in CHECKS}


parallel = launch(check_worker, WORLD_SIZE)
serial = {(name, dtype): check_steps(name, 1, 0, dtype) for name, dtype in CHECKS}

# %%
# The largest difference of any parameter, next to the parameters' size and the dtype's epsilon
# (the float64 rows fail the build if they differ by more than :math:`10^{-10}` of the size):

check_rows = []
for (name, dtype), ref in serial.items():
    gap = max((a - b).abs().max().item() for a, b in zip(parallel[(name, dtype)], ref))
    scale = max(b.abs().max().item() for b in ref)
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
        print(
            f"{name}, float64: largest |θ_parallel - θ_serial| = {gap:.1e} (|θ| up to {scale:.2f})"
        )
pd.DataFrame(check_rows).set_index(["optimizer", "dtype"]).style.format("{:.2e}")

# %%
# A fair comparison: the protocol
# -------------------------------
# A comparison of optimizers at large batches is only as fair as its baselines: an optimizer
# whose rate was never tuned loses at *every* batch, and says nothing about large batches. So
# each optimizer gets the same protocol:
#
# 1. **Tune at the base batch.** Train at ``BASE_BATCH`` with each rate of ``LR_GRID`` and keep
#    the rate with the best *validation* accuracy after ``EPOCHS`` epochs.
# 2. **Scale, do not retune.** At batch :math:`B` use the tuned rate times the optimizer's
#    scaling rule: linear, :math:`\gamma_0 B/B_0`, for SGD (Goyal et al. 2017) and LARS (You
#    et al. 2017); square root, :math:`\gamma_0\sqrt{B/B_0}`, for LAMB (You et al. 2019) and
#    AdamW. Every run warms up linearly for ``WARMUP_EPOCHS``, then decays along a cosine:
#
#    .. math::
#
#       \gamma_s = \gamma_{\text{peak}}\cdot\begin{cases} \frac{s+1}{W} & s < W\\
#       \tfrac12\big(1+\cos\pi\frac{s-W}{S-W}\big) & s\ge W\end{cases}
#
#    with :math:`S` steps in all and :math:`W` of warm-up.
# 3. **Report on the test split**, which chose nothing, with the seed-to-seed difference of
#    the same measurement next to it.
#
# What each optimizer is (a registry: name -> constructor from parameter groups and a rate):

OPTIMIZERS = {
    "SGD+momentum": lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.9),
    "LARS": lambda groups, lr: LARS(
        groups, lr=lr, momentum=0.9, trust_coefficient=TRUST_COEFFICIENT
    ),
    "LAMB": lambda groups, lr: LAMB(groups, lr=lr),
    "AdamW": lambda groups, lr: torch.optim.AdamW(groups, lr=lr),
}


def make_optimizer(job: dict, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``job`` at its batch: the base rate scaled by the optimizer's rule (or
    by the job's own ``scaling``)."""
    name, batch = job["optimizer"], job["batch"]
    excluded_lr = None
    if name == "LARS" and job.get("excluded_at_sgd_rate", True):
        excluded_lr = linear_scaled_lr(EXCLUDED_LR, batch, BASE_BATCH)
    groups = param_groups(model, WEIGHT_DECAY[name], excluded_lr=excluded_lr)
    rule = RULES[job.get("scaling", SCALING[name])]
    return OPTIMIZERS[name](groups, rule(job["base_lr"], batch, BASE_BATCH))


# %%
# One training run
# ----------------
# A *job* is a plain dict: optimizer, global batch, base rate and seed. Its run trains a fresh
# CNN from the seed's weights for ``EPOCHS`` epochs and measures validation and test accuracy
# after every epoch. The accuracy of a run depends on the global batch, not on how the batch is
# split over ranks: the check above showed the data-parallel step equal to the serial one (to
# rounding). So each run trains in one process, and the study runs ``WORKERS`` of them at once
# (one per core); the speed of data parallelism is measured separately below, on
# ``WORLD_SIZE`` ranks.


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x.to(device())).argmax(1) == y.to(device())).float().mean().item()


def one_epoch(model, opt, sched, batch: int, order: torch.Tensor, out: dict) -> None:
    """One pass over the training set in the order ``order``, recording rate, loss, ratios."""
    for s in range(N_TRAIN // batch):
        idx = order[s * batch : (s + 1) * batch]
        x, y = data.x_train[idx].to(device()), data.y_train[idx].to(device())
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        out["lr"].append(opt.param_groups[0]["lr"])
        sched.step()
        out["loss"].append(loss.item())
        if isinstance(opt, LARS):
            out["ratios"].append(opt.trust_ratios())


# %%
# The run itself, the schedule sized from its batch:


def train_run(job: dict) -> dict:
    model = CNN1d(channels=CHANNELS, seed=job["seed"]).to(device())
    opt = make_optimizer(job, model)
    steps_per_epoch = N_TRAIN // job["batch"]
    out = {**job, "peak_lr": opt.param_groups[0]["lr"], "steps": EPOCHS * steps_per_epoch}
    warmup = max(1, round(WARMUP_EPOCHS * steps_per_epoch))
    sched = warmup_cosine(opt, EPOCHS * steps_per_epoch, warmup)  # sets lr to its first value
    out |= {"val": [], "test": [], "lr": [], "loss": [], "ratios": []}
    shuffle = torch.Generator().manual_seed(job["seed"])
    for _ in range(EPOCHS):
        one_epoch(model, opt, sched, job["batch"], torch.randperm(N_TRAIN, generator=shuffle), out)
        out["val"].append(accuracy(model, x_val, y_val))
        out["test"].append(accuracy(model, x_test, y_test))
    out["diverged"] = not all(math.isfinite(v) for v in out["loss"])
    return out


# %%
# Many runs at once: rank :math:`r` of ``WORKERS`` takes every ``WORKERS``-th job, and one
# ``all_gather_object`` (:func:`cai_labs.report.from_every_rank`) collects the results in order.
# No gradient crosses between ranks here: a sweep is *embarrassingly* parallel.


def run_jobs(jobs: list[dict]) -> list[dict]:
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {i: train_run(job) for i, job in enumerate(jobs) if i % world == rank}
    done = {i: r for part in report.from_every_rank(mine) for i, r in part.items()}
    return [done[i] for i in range(len(jobs))]


def run_label(r: dict) -> str:
    return f"{r['optimizer']:>13} B={r['batch']:>5} lr {r['peak_lr']:<8.4g} seed {r['seed']}"


# %%
# Step 1: tune each rate at the base batch
# ----------------------------------------
# Every rate of every grid, at ``BASE_BATCH``, from the same initial weights:

sweep_jobs = [
    {"optimizer": name, "batch": BASE_BATCH, "base_lr": lr, "seed": SEED}
    for name, grid in LR_GRID.items()
    for lr in grid
]
start = time.perf_counter()
sweep = launch(run_jobs, WORKERS, sweep_jobs, timeout=1800)
print(f"rate sweep: {len(sweep)} runs in {time.perf_counter() - start:.0f} s on {WORKERS} workers")
tuned = {}  # optimizer -> its run with the best final validation accuracy
for r in sweep:
    best = tuned.get(r["optimizer"])
    if best is None or r["val"][-1] > best["val"][-1]:
        tuned[r["optimizer"]] = r

# %%
# The sweep, with the rate each optimizer keeps. A chosen rate at the edge of its grid would
# mean the grid did not bracket the best rate (the line below the table counts them).

sweep_table = report.table(
    [
        {
            "optimizer": r["optimizer"],
            "lr at base batch": r["base_lr"],
            "val acc": r["val"][-1],
            "test acc": r["test"][-1],
            "diverged": "yes" if r["diverged"] else "",
            "chosen": "<- chosen" if r is tuned[r["optimizer"]] else "",
        }
        for r in sweep
    ],
    index=["optimizer", "lr at base batch"],
    formats={"val acc": "{:.3f}", "test acc": "{:.3f}"},
)
inside = [n for n, r in tuned.items() if LR_GRID[n][0] < r["base_lr"] < LR_GRID[n][-1]]
print(f"chosen rate strictly inside its grid for {len(inside)} of {len(tuned)}: {inside}")
sweep_table

# %%
# Step 2: scale each tuned rate to the larger batches
# ---------------------------------------------------
# The same protocol for every optimizer: its tuned base rate, scaled by its rule, at each larger
# batch; its tuned base run once more with the second seed (the noise of one measurement); the
# other scaling rule at the largest batch; and one LARS run at the base batch whose excluded
# tensors take LARS's own global rate (the section near the end).

ABLATION_BATCH, largest = BASE_BATCH, BATCH_SIZES[-1]
OTHER_RULE = {"linear": "sqrt", "sqrt": "linear"}


def tuned_job(name: str, batch: int, role: str, seed: int = SEED, **extra) -> dict:
    job = {"optimizer": name, "batch": batch, "base_lr": tuned[name]["base_lr"], "seed": seed}
    return job | {"role": role} | extra


follow_jobs = [tuned_job(n, b, "scaled") for n in tuned for b in BATCH_SIZES[1:]]
follow_jobs += [tuned_job(n, BASE_BATCH, "reseeded", seed=SEEDS[1]) for n in tuned]
follow_jobs += [tuned_job(n, largest, "other rule", scaling=OTHER_RULE[SCALING[n]]) for n in tuned]
follow_jobs.append(tuned_job("LARS", ABLATION_BATCH, "ablation", excluded_at_sgd_rate=False))

# %%
# All of them in one launch; the runs come back in the order of the jobs:

start = time.perf_counter()
follow = launch(run_jobs, WORKERS, follow_jobs, timeout=1800)
print(f"scaled runs: {len(follow)} in {time.perf_counter() - start:.0f} s")
by_role = {}  # role -> its runs
for r in follow:
    by_role.setdefault(r["role"], []).append(r)
for r in by_role["scaled"]:
    print(f"{run_label(r)}: {r['steps']:>4} steps, test acc {r['test'][-1]:.3f}")
(ablation,) = by_role["ablation"]

# %%
# The accuracy study
# ------------------
# Every tuned run: its peak rate after scaling, the steps the fixed budget allows
# (:math:`\text{EPOCHS}\cdot N/B`), the test accuracy after the last epoch, and how many points
# it lost against the same optimizer at the base batch. The last rows are the base runs again
# with the second seed: the size of a difference that one seed cannot resolve.

study = list(tuned.values()) + by_role["scaled"]
reseeded = {r["optimizer"]: r for r in by_role["reseeded"]}
acc = pd.DataFrame(
    {n: {r["batch"]: r["test"][-1] for r in study if r["optimizer"] == n} for n in OPTIMIZERS}
).sort_index()
lost_col = "points lost vs base batch"
study_rows = [
    {
        "optimizer": r["optimizer"],
        "batch": r["batch"],
        "seed": r["seed"],
        "peak lr": r["peak_lr"],
        "steps": r["steps"],
        "test acc": r["test"][-1],
        lost_col: 100 * (acc.loc[BASE_BATCH, r["optimizer"]] - r["test"][-1]),
        "diverged": "yes" if r["diverged"] else "",
    }
    for r in study + list(reseeded.values())
]
report.table(
    study_rows,
    index=["optimizer", "batch", "seed"],
    formats={"test acc": "{:.3f}", lost_col: "{:+.1f}"},
)

# %%
# Accuracy against batch size; the error bar at the base batch spans the two seeds.

fig, ax = plt.subplots(figsize=(7, 4))
for name in OPTIMIZERS:
    line = ax.plot(acc.index, acc[name], marker="o", label=name)[0]
    seeds = [tuned[name]["test"][-1], reseeded[name]["test"][-1]]
    ax.vlines(BASE_BATCH, min(seeds), max(seeds), color=line.get_color(), lw=3, alpha=0.5)
ax.set(
    xscale="log",
    xlabel="global batch size",
    ylabel="test accuracy after the budget",
    title=f"MNIST-1D CNN, {EPOCHS} epochs at every batch, rates tuned at B={BASE_BATCH}",
)
ax.set_xticks(BATCH_SIZES, [str(b) for b in BATCH_SIZES])
ax.minorticks_off()
ax.legend()
fig.tight_layout()

# %%
# What the table says, computed from it. The noise is the largest seed-to-seed difference of a
# tuned base run; a difference between two optimizers smaller than it is not resolved by one
# seed.

noise = {n: abs(reseeded[n]["test"][-1] - tuned[n]["test"][-1]) for n in OPTIMIZERS}
lost = 100 * (acc.loc[BASE_BATCH] - acc.loc[largest])
worst_noise = 100 * max(noise.values())
assert acc.loc[BASE_BATCH].min() > 0.9, "a tuned baseline did not train: widen LR_GRID"
for name in OPTIMIZERS:
    print(
        f"{name:>13}: {acc.loc[BASE_BATCH, name]:.3f} at B={BASE_BATCH} -> "
        f"{acc.loc[largest, name]:.3f} at B={largest} ({lost[name]:+.1f} points; seeds differ "
        f"by {100 * noise[name]:.1f} at the base)"
    )
ranked = acc.loc[largest].sort_values(ascending=False)
gap = 100 * (ranked.iloc[0] - ranked.iloc[1])
print(
    f"at B={largest}: best {ranked.index[0]} ({ranked.iloc[0]:.3f}), then {ranked.index[1]} "
    f"({ranked.iloc[1]:.3f}): {gap:.1f} points apart, "
    f"{'more' if gap > worst_noise else 'less'} than the {worst_noise:.1f} points of noise"
)

# %%
# Optimizer or scaling rule?
# --------------------------
# SGD and LARS were scaled linearly, LAMB and AdamW by the square root, so the study mixes two
# choices. At the largest batch every optimizer also ran with the other rule (same tuned base
# rate); test accuracy, one row per optimizer, one column per rule:

rule_acc = pd.DataFrame(index=list(OPTIMIZERS), columns=list(RULES), dtype=float)
for name in OPTIMIZERS:
    rule_acc.loc[name, SCALING[name]] = acc.loc[largest, name]
for r in by_role["other rule"]:
    rule_acc.loc[r["optimizer"], r["scaling"]] = r["test"][-1]
for rule in RULES:
    col = rule_acc[rule]
    print(
        f"{rule:>6} rule at B={largest}: best {col.idxmax()} ({col.max():.3f}), "
        f"worst {col.idxmin()} ({col.min():.3f})"
    )
best_name, best_rule = rule_acc.stack().idxmax()
best_acc = rule_acc.loc[best_name, best_rule]
print(f"best at B={largest}: {best_name} with the {best_rule} rule ({best_acc:.3f})")
report.table(rule_acc.rename_axis(f"B={largest}"), formats=dict.fromkeys(RULES, "{:.3f}"))

# %%
# How to read it. Two effects shape these curves. The fixed budget gives a batch :math:`B`
# only :math:`\text{EPOCHS}\cdot N/B` steps, so every optimizer loses accuracy once the steps
# run short; that loss is shared. The scaling rule multiplies the tuned rate, and past some
# batch the rate exceeds what an optimizer tolerates: that shows as one optimizer falling
# further than the others. LARS and LAMB bound each layer's step relative to its own weights,
# which is meant to push that limit to larger rates; they do not add steps, so they cannot
# undo the first effect. The printed lines above are the page's conclusions at this budget,
# one seed per run, on one small network; the papers' conclusions (ImageNet and BERT, tens of
# epochs, tuned per batch) are theirs, not this page's.
#
# Speed: what a larger batch buys
# -------------------------------
# Per epoch, a run makes :math:`N/B` steps. Each step has a fixed part (Python, launching
# kernels, optimizer bookkeeping, the all-reduce latency) and a part proportional to the
# :math:`B/4` samples each rank computes. So the time per epoch is about
# :math:`\frac{N}{B}\,t_{\text{fixed}} + N\,t_{\text{sample}}/4`: it falls with :math:`B` until
# the per-sample part dominates. Measured here on ``WORLD_SIZE`` data-parallel ranks:
# ``SPEED_STEPS`` steps of each optimizer at each batch of ``SPEED_BATCHES``, gradients averaged
# by :class:`~cai_labs.data_parallel.BucketedDataParallel` (one all-reduce bucket per step,
# overlapped with backward), timed on rank 0 (so including waits for the slowest rank).


def speed_run(name: str, batch: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = BucketedDataParallel(CNN1d(channels=CHANNELS, seed=SEED).to(device()), bucket_mb=1.0)
    opt = make_optimizer(tuned_job(name, batch, "speed"), model.module)
    times = []
    with Ledger(track_activations=False) as ledger:  # counts the training all-reduces
        for s in range(SPEED_STEPS):
            idx = torch.arange(s * batch, (s + 1) * batch) % N_TRAIN
            x, y = data.x_train[idx].to(device()), data.y_train[idx].to(device())
            xs, ys = shard_batch(x, y, rank=rank, world_size=world)
            start = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs), ys).backward()  # the all-reduce runs inside
            opt.step()
            times.append(time.perf_counter() - start)
    sent = comm_totals(ledger.report())["all_reduce"]["bytes"]
    return {"optimizer": name, "batch": batch, "step_s": float(np.median(times[2:])), "bytes": sent}


# %%
# Every optimizer at every batch, in one launch:


def speed_worker() -> list[dict]:
    return [speed_run(name, b) for b in SPEED_BATCHES for name in OPTIMIZERS]


start = time.perf_counter()
speed_runs = launch(speed_worker, WORLD_SIZE, timeout=900)
print(f"speed: {len(speed_runs)} runs in {time.perf_counter() - start:.0f} s")

# %%
# The ledger's all-reduced bytes equal the formula in every run: one bucket of all :math:`P`
# gradient bytes per step, whatever the optimizer. LARS and LAMB add no communication in data
# parallelism.

grad_bytes = n_params * 4
for r in speed_runs:
    assert r["bytes"] == SPEED_STEPS * grad_bytes, (r["optimizer"], r["batch"], r["bytes"])
print(f"all-reduce bytes per step == P = {grad_bytes:,} B in all {len(speed_runs)} speed runs")

# %%
# Samples per second and seconds per epoch from the median step, per optimizer and batch:

speed = pd.DataFrame(
    [
        {
            "batch": r["batch"],
            "optimizer": r["optimizer"],
            "step (ms)": 1e3 * r["step_s"],
            "samples / s": r["batch"] / r["step_s"],
            "s / epoch": N_TRAIN / r["batch"] * r["step_s"],
        }
        for r in speed_runs
    ]
).set_index(["batch", "optimizer"])
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
for name in OPTIMIZERS:
    sub = speed.xs(name, level="optimizer")
    ax1.plot(sub.index, sub["samples / s"], marker="o", label=name)
    ax2.plot(sub.index, sub["s / epoch"], marker="o", label=name)
ax1.set(ylabel="training samples / s", title=f"Throughput, {WORLD_SIZE} CPU ranks (measured)")
ax2.set(ylabel="seconds per epoch", title="Time per epoch (measured)")
for a in (ax1, ax2):
    a.set(xscale="log", yscale="log", xlabel="global batch size")
    a.set_xticks(SPEED_BATCHES, [str(b) for b in SPEED_BATCHES])
    a.minorticks_off()
    a.legend()
fig.tight_layout()

# %%
# The gain over the range, and how much the optimizers differ at one batch size:

mean = speed["samples / s"].groupby(level="batch").mean()
per_batch = speed["samples / s"].groupby(level="batch")
spread = float((per_batch.max() / per_batch.min()).max())
print(
    f"throughput, mean over optimizers: {mean.iloc[0]:,.0f} samples/s at B={SPEED_BATCHES[0]}, "
    f"{mean.iloc[-1]:,.0f} at B={SPEED_BATCHES[-1]} ({mean.iloc[-1] / mean.iloc[0]:.1f}x); "
    f"largest spread between optimizers at one batch size: {spread:.1f}x"
)

# %%
# The throughput printed above is the "acceleration from a larger batch": the same epoch of
# data, processed in fewer, larger steps. Here it comes from amortising per-step overheads
# over more samples (the CNN is tiny, so at the smallest batch each rank computes only a few
# samples per step), and from fewer all-reduces.
#
# At one batch size the optimizers do the same forward, backward and all-reduce; what differs
# is the optimizer step itself (LARS and LAMB here are readable Python loops over tensors,
# PyTorch's SGD and AdamW use fused multi-tensor kernels) and the noise of short wall-clock
# measurements on a machine that other jobs may share during the build. Compare the spread
# printed above with the trend over batch sizes before reading anything into one row.
#
# Time to a target accuracy
# -------------------------
# Speed only matters if the model still learns. For each tuned run of the accuracy study: the
# epochs until its test accuracy first reached ``TARGET_ACCURACY`` (measured, checked after
# each epoch), times the seconds per epoch of the same optimizer and batch on ``WORLD_SIZE``
# data-parallel ranks (measured above). The product is **estimated** from those two
# measurements; "not reached" where the budget ran out first.


def epochs_to_target(r: dict) -> float:
    hit = [e + 1 for e, a in enumerate(r["test"]) if a >= TARGET_ACCURACY]
    return float(hit[0]) if hit else float("nan")


ttt = pd.DataFrame(
    [
        {
            "optimizer": r["optimizer"],
            "batch": r["batch"],
            f"epochs to {TARGET_ACCURACY:.0%}": epochs_to_target(r),
            f"s / epoch ({WORLD_SIZE} ranks)": speed.loc[(r["batch"], r["optimizer"]), "s / epoch"],
        }
        for r in study
    ]
).set_index(["optimizer", "batch"])
ttt["estimated s to target"] = ttt.iloc[:, 0] * ttt.iloc[:, 1]

# %%
# The fastest batch to the target, per optimizer:

target_col = f"epochs to {TARGET_ACCURACY:.0%}"
for name in OPTIMIZERS:
    col = ttt.loc[name, "estimated s to target"].dropna()
    if len(col):
        print(
            f"{name:>13}: fastest to {TARGET_ACCURACY:.0%} at B={col.idxmin()} "
            f"({col.min():.2f} s estimated); reached at B in {list(col.index)}"
        )
    else:
        print(f"{name:>13}: never reached {TARGET_ACCURACY:.0%} within {EPOCHS} epochs")
report.table(ttt, formats={target_col: "{:.0f}", "estimated s to target": "{:.2f}"})

# %%
# LARS's trust ratios, layer by layer
# -----------------------------------
# The ratio :math:`\lambda^l = \eta\|w^l\|/(\|g^l\|+\beta\|w^l\|)` of every weight tensor at
# every step of the tuned LARS runs, at the base and the largest batch (the dashed line, right
# axis, is the global rate :math:`\gamma_t` of the schedule). A layer's effective rate is
# :math:`\gamma_t\lambda^l`. Layers whose gradients are small relative to their weights get
# large ratios, and the other way round. A larger batch averages more samples, so its gradient
# is less noisy and usually smaller, which should raise the ratios; the numbers below the figure
# say whether it did here.

lars_runs = {r["batch"]: r for r in study if r["optimizer"] == "LARS"}
shown = [BASE_BATCH, largest]
layers = [
    n
    for n in lars_runs[BASE_BATCH]["ratios"][0]
    if n.endswith("weight") and not n.startswith(("features.1", "features.4", "features.7"))
]
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for ax, b in zip(axes, shown):
    r = lars_runs[b]
    steps = np.arange(1, len(r["ratios"]) + 1)
    for n in layers:
        ax.plot(steps, [d[n] for d in r["ratios"]], label=n)
    ax.set(yscale="log", xlabel="optimizer step", ylabel="trust ratio λ (η included)")
    ax.set_title(f"LARS, B={b}, {len(steps)} steps")
    twin = ax.twinx()
    twin.plot(steps, r["lr"], color="black", ls="--", lw=1)
    twin.set_ylabel("global lr γ (dashed)")
axes[0].legend(fontsize=8)
fig.tight_layout()

# %%
# The first and last ratio of each weight tensor, in numbers:

for b in shown:
    first, last = lars_runs[b]["ratios"][0], lars_runs[b]["ratios"][-1]
    print(f"B={b}: " + ", ".join(f"{n} {first[n]:.2e}->{last[n]:.2e}" for n in layers))
typical = {
    b: float(np.median([d[n] for d in lars_runs[b]["ratios"] for n in layers])) for b in shown
}
print(
    f"median ratio over all steps and weight tensors: {typical[BASE_BATCH]:.2e} at "
    f"B={BASE_BATCH}, {typical[largest]:.2e} at B={largest} "
    f"({'larger' if typical[largest] > typical[BASE_BATCH] else 'not larger'} at B={largest}); "
    f"the ceiling η/β = {TRUST_COEFFICIENT / WEIGHT_DECAY['LARS']:g} is reached where ‖g‖ ≪ β‖w‖"
)

# %%
# Which rate for the excluded tensors?
# ------------------------------------
# In the study, LARS's biases and GroupNorm parameters took plain SGD steps at an SGD rate.
# Many LARS implementations give them the optimizer's own global rate instead (one group rate
# for all). LARS's global rate, orders of magnitude above SGD's, makes that a very different
# step:

sgd_rate = linear_scaled_lr(EXCLUDED_LR, ABLATION_BATCH, BASE_BATCH)
print(
    f"LARS at B={ABLATION_BATCH}, peak lr {ablation['peak_lr']:.4g} "
    f"({ablation['peak_lr'] / sgd_rate:.0f}x the SGD rate {sgd_rate:.4g}): excluded tensors at the "
    f"SGD rate -> test acc {acc.loc[ABLATION_BATCH, 'LARS']:.3f}; at the LARS rate -> "
    f"{ablation['test'][-1]:.3f}{' (the loss became NaN)' if ablation['diverged'] else ''}"
)

# %%
# What these measurements allow concluding
# ----------------------------------------
# * **Correctness** is established: the data-parallel LARS and LAMB steps equal the serial ones
#   (float64, asserted), and the gradient traffic equals the formula in every speed run.
# * **Speed**: the throughput gain from a larger batch is measured, on ``WORLD_SIZE`` ranks
#   sharing the cores of one machine. On this tiny CNN the fixed cost per step dominates at
#   small batches, so the gain is large; on GPUs with a large model, where one step of a small
#   batch already keeps the device busy, the gain comes mostly from fewer all-reduces per
#   epoch, and is smaller.
# * **Accuracy**: every optimizer was tuned the same way, at the same base batch, and scaled by
#   a published rule; the lines printed under the accuracy study give each one's loss at the
#   largest batch and whether the best two are further apart than the seed-to-seed noise. That
#   is one small network, one data set, ``EPOCHS`` epochs and one seed per run: a measurement of
#   this setting, not a ranking of optimizers in general.
# * **Published, not measured here**: You et al. (2017) trained ResNet-50 with LARS at batches
#   up to 32k, and You et al. (2019) BERT with LAMB at batches up to 64k, both with budgets of
#   tens of epochs, warm-up tuned per batch, and (for LARS) rates tuned per batch size.
#
# Colossal-AI's optimizers, side by side
# --------------------------------------
# Colossal-AI ships ``colossalai.nn.optimizer.Lars`` and ``Lamb`` (and ``FusedLAMB`` and
# ``DistributedLamb`` for CUDA and sharded models). Its ``Lars`` and ``Lamb`` are plain PyTorch
# and run on CPU. Their conventions differ from the papers in two places, which the cells below
# (and ``nox -s colossalai``) match explicitly: ``Lamb`` has **no bias correction** (arXiv v3 of
# the paper) and gives every tensor a trust ratio; ``Lars`` keeps the **raw gradient in the
# momentum buffer** and scales the whole buffer by :math:`\gamma\lambda` (like PyTorch's SGD),
# clips the ratio at 50 and gradients at :math:`\pm 10`, and excludes a group with ``lars=False``.

try:
    import colossalai

    HAVE_COLOSSALAI = True
except Exception:  # not installed, or installed against another torch
    HAVE_COLOSSALAI = False

# %%
# cai_labs's LARS with those conventions next to Colossal-AI's, from the same weights:


def colossalai_lars_pair() -> tuple:
    """cai_labs's LARS and Colossal-AI's ``Lars``, set to the same conventions."""
    from colossalai.nn.optimizer import Lars

    ours_model, theirs_model = (CNN1d(channels=CHANNELS, seed=SEED) for _ in range(2))
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
    return (ours_model, ours), (theirs_model, theirs)


# %%
# The same for LAMB, then a few steps of each pair on the same batch:


def colossalai_lamb_pair() -> tuple:
    """cai_labs's LAMB without bias correction and Colossal-AI's ``Lamb``."""
    from colossalai.nn.optimizer import Lamb

    ours_model, theirs_model = (CNN1d(channels=CHANNELS, seed=SEED) for _ in range(2))
    groups = param_groups(ours_model, 0.01, exclude_from_adaptation=False)
    ours = LAMB(groups, lr=0.01, bias_correction=False)
    groups = param_groups(theirs_model, 0.01, exclude_from_adaptation=False)
    theirs = Lamb(groups, lr=0.01, weight_decay=0.01)
    return (ours_model, ours), (theirs_model, theirs)


def largest_gap(pair: tuple, steps: int = 5) -> float:
    x, y = data.x_train[:256], data.y_train[:256]
    for _ in range(steps):
        for model, opt in pair:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    (ours_model, _), (theirs_model, _) = pair
    params = zip(ours_model.parameters(), theirs_model.parameters())
    return max((a - b).abs().max().item() for a, b in params)


# %%
# The largest difference of any parameter after 5 steps:

if HAVE_COLOSSALAI:
    gaps = {
        "LARS": largest_gap(colossalai_lars_pair()),
        "LAMB": largest_gap(colossalai_lamb_pair()),
    }
    print(
        f"Colossal-AI {colossalai.__version__}: executed; largest |parameter difference| "
        f"after 5 steps vs cai_labs: {gaps}"
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
# from 256 to 32,768 (the LARS paper's range). **Modeled** (model states and FLOPs; whether a
# batch still converges is what the accuracy study measures, at its own small scale). The
# efficiency constant comes from transformer runs; convolutions reach less of the peak, so
# read the times as a lower bound and the columns relative to each other.

from cai_labs.scale import ScaleLayout, predict

IMAGENET, IMAGENET_EPOCHS = 1_281_167, 90
hours = f"{IMAGENET_EPOCHS} epochs (h)"
big = []
for batch in (256, 1024, 4096, 8192, 32768):
    gpus = batch // 32
    layout = ScaleLayout(dp=gpus, micro_batch_size=32, global_batch=batch)
    p = predict("resnet-50", "a100-80gb", layout)
    big.append(
        {
            "global batch": batch,
            "GPUs": gpus,
            "step (ms)": 1e3 * p.step_time_s,
            "images/s/GPU": p.tokens_per_s_per_gpu,
            hours: IMAGENET_EPOCHS * IMAGENET / batch * p.step_time_s / 3600,
            "bound": p.bound,
        }
    )
report.table(big, index="global batch", formats={"images/s/GPU": "{:,.0f}", hours: "{:.2f}"})

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
        model, optimizer, nn.CrossEntropyLoss().to(device()), lr_scheduler=scheduler
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

# %%
# Predict, then check
# -------------------
# Answer each question before opening its answer; the answers are this build's numbers.

exercises = Exercises()
sgd_big = next(r for r in study if r["optimizer"] == "SGD+momentum" and r["batch"] == largest)
exercises.add(
    f"SGD's rate tuned at B={BASE_BATCH} is {tuned['SGD+momentum']['base_lr']:g}. Under linear "
    f"scaling, what is its peak rate at B={largest}, and how many steps does that run get?",
    f"{sgd_big['peak_lr']:.4g} (x{largest // BASE_BATCH}) and {sgd_big['steps']} steps, against "
    f"{tuned['SGD+momentum']['steps']} at the base; test accuracy "
    f"{acc.loc[largest, 'SGD+momentum']:.3f} against {acc.loc[BASE_BATCH, 'SGD+momentum']:.3f}.",
)
exercises.add(
    f"Which optimizer loses the fewest points of test accuracy from B={BASE_BATCH} to "
    f"B={largest}, and is its lead larger than the seed-to-seed noise?",
    f"{lost.idxmin()} ({lost.min():+.1f} points; the others: "
    + ", ".join(f"{n} {v:+.1f}" for n, v in lost.drop(lost.idxmin()).items())
    + f"); the largest seed-to-seed difference at the base was {worst_noise:.1f} points.",
)
small, big_b = SPEED_BATCHES[0], SPEED_BATCHES[-1]  # for the next two
epoch_time = speed["s / epoch"].groupby(level="batch").mean()

# %%
# Two more, on what the batch does to communication and time:

exercises.add(
    f"How many bytes does each step all-reduce with LAMB at B={big_b}, and with SGD at B={small}?",
    f"The same, P = {grad_bytes:,} B (asserted in every speed run): the all-reduce carries "
    f"the gradients, the model's size. Per training sample that is {grad_bytes / small:,.0f} B "
    f"at B={small} and {grad_bytes / big_b:,.1f} B at B={big_b}.",
)
exercises.add(
    f"On {WORLD_SIZE} ranks here, how many times faster is an epoch at B={big_b} than at "
    f"B={small}?",
    f"{epoch_time[small] / epoch_time[big_b]:.1f}x: {epoch_time[small]:.2f} s against "
    f"{epoch_time[big_b]:.3f} s per epoch (mean over optimizers, measured).",
)
exercises
