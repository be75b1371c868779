"""
Stable Diffusion with Lightning, and a ZeRO strategy
====================================================

Train a toy text-to-image diffusion model with a Lightning ``Trainer`` on 2 CPU ranks, under
DDP and a ZeRO strategy with offload, and judge whether its samples show the prompted digit.

Stable Diffusion generates an image from a prompt by removing noise step by step, steered by a
text encoder. Its training loop is usually written with PyTorch Lightning, and Colossal-AI reached
those users through a Lightning *strategy* (``lightning_colossalai.ColossalAIStrategy``) that swaps
data parallelism for its ZeRO and memory-management engine without touching the model code.

**In this tutorial** you will

1. build a text-to-image diffusion model from the real classes (diffusers' ``UNet2DConditionModel``,
   ``DDPMScheduler`` / ``DDIMScheduler``, ``AutoencoderKL``; transformers' ``CLIPTextModel`` with a
   tokenizer built offline), at toy size, and decide whether it needs the autoencoder;
2. train it on captioned handwritten digits with a Lightning ``Trainer`` on 2 CPU ranks, first with
   Lightning's own DDP, then with :class:`~cai_labs.lightning.zero_strategy.ZeroStrategy`, a
   Lightning strategy built on :mod:`cai_labs.zero` the way the Colossal-AI strategy was built;
3. measure per-rank peak memory and step time for DDP, ZeRO-1/2/3, ZeRO with the Adam moments
   offloaded to host memory, bf16 autocast and activation checkpointing;
4. generate digits for the prompts "digit 0" ... "digit 9" and have a classifier trained on real
   digits judge whether each sample shows the digit it was asked for.

**Prerequisites:** ZeRO's three stages and offload from :doc:`tutorial_05_opt_zero_offload`,
data parallelism from :doc:`tutorial_00_data_parallel`, and a first look at a ``LightningModule``.

All ranks are CPU processes on the machine that built this page (``gloo``).
"""

# %%
# Set-up
# ------
# The constants size the run; the page was built with these values. Raise ``TRAIN_STEPS`` and the
# widths in ``CONFIG`` on your own machine for better samples.

import os
import tempfile
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from cai_labs import build_env, device, gather_reports, launch
from cai_labs.diffusion.data import CAPTION_TEMPLATES, load_captioned_digits, prompt_for
from cai_labs.diffusion.judge import classify, train_digit_classifier
from cai_labs.diffusion.lightning_module import DiffusionModule, collate
from cai_labs.diffusion.model import (
    TinyDiffusionConfig,
    build_components,
    load_components,
    save_components,
)
from cai_labs.diffusion.sampling import encode_prompts, generate
from cai_labs.exercises import Exercises
from cai_labs.lightning.measure import LedgerCallback
from cai_labs.lightning.trainer import rank_trainer

# %%
# The sizes of the run (raise ``TRAIN_STEPS`` for better samples):

WORLD_SIZE = 2  # ranks
CONFIG = TinyDiffusionConfig(image_size=16, block_channels=(16, 32), text_dim=32)
BATCH_PER_RANK = 32  # images per rank per step (global batch = WORLD_SIZE x this)
TRAIN_STEPS = 300  # optimizer steps of the one real training run (raise for better samples)
LR = 3e-3
MEASURE_STEPS = 4  # steps of each variant in the memory / time table
OFFLOAD_SHARE = 0.25  # share of a rank's Adam moments that may be on the "device" at once
SAMPLE_STEPS = 20  # DDIM steps at generation
GUIDANCE = 3.0  # classifier-free guidance scale
SAMPLES_PER_DIGIT = 8
SEED = 0
page_start = time.perf_counter()

# One intra-op thread here too, like the ranks: the page's serial work (the digit judge, sampling)
# is small, and the ranks forked from this process each compute on one thread (a forked child
# that asked OpenMP for more threads than the parent's pool left it would hang: see the
# docstring of cai_labs.launcher).
torch.set_num_threads(1)
print(build_env.describe(ranks=WORLD_SIZE))  # where this page's numbers were measured

# %%
# The data: scikit-learn's handwritten digits, upscaled to ``CONFIG.image_size`` pixels and
# captioned from a few templates (:func:`~cai_labs.diffusion.data.load_captioned_digits`):

train_set, test_set = load_captioned_digits(size=CONFIG.image_size, seed=SEED)
print(
    f"{len(train_set)} training images of {tuple(train_set.images.shape[1:])}, "
    f"pixels in [{train_set.images.min():.0f}, {train_set.images.max():.0f}]"
)
for i in range(4):
    print(f"  sample {i}: label {train_set[i][2]}, caption {train_set[i][1]!r}")
print(f"caption templates: {CAPTION_TEMPLATES}")

# %%
# The model: four parts of Stable Diffusion
# -----------------------------------------
# :func:`~cai_labs.diffusion.model.build_components` builds each part from a small config, with no
# download: a ``CLIPTextModel`` (prompt ids ``(B, L)`` to states ``(B, L, text_dim)``), a
# ``UNet2DConditionModel`` whose cross-attention blocks read those states, a ``DDPMScheduler``
# that noises images for training and a ``DDIMScheduler`` that samples in a few steps. The
# tokenizer is a word-level tokenizer over a generated vocabulary, wrapped as a
# ``PreTrainedTokenizerFast`` (:mod:`cai_labs.diffusion.tokenizer`).
#
# **Pixel space or latent space?** Stable Diffusion runs its UNet on the latent of an
# ``AutoencoderKL``: a 512x512x3 image (786,432 numbers) becomes 64x64x4 (16,384), 48 times
# fewer, and the UNet's cost shrinks about as much. The autoencoder is trained first, then frozen.
# Build the same autoencoder for our 16x16 digits and look at what it would buy:

parts = build_components(CONFIG, seed=SEED)
latent_parts = build_components(TinyDiffusionConfig(latent_channels=4), seed=SEED)
with torch.no_grad():
    latent = latent_parts.vae.encode(train_set.images[:8]).latent_dist.mean
pixels = train_set.images[0].numel()
print(
    f"pixel image {tuple(train_set.images.shape[1:])} = {pixels} numbers; "
    f"AutoencoderKL latent {tuple(latent.shape[1:])} = {latent[0].numel()} numbers "
    f"(compression {pixels / latent[0].numel():.1f}x)"
)
for name, module in [
    ("UNet2DConditionModel", parts.unet),
    ("CLIPTextModel", parts.text_encoder),
    ("AutoencoderKL (unused)", latent_parts.vae),
]:
    print(f"  {name:24s} {sum(p.numel() for p in module.parameters()):>9,} parameters")

# %%
# The latent has exactly as many numbers as the image: for a 16x16 digit the autoencoder
# compresses nothing, would cost a training stage of its own, and would add its reconstruction
# error to every sample. So this page trains the UNet **in pixel space**. The code keeps the
# latent path (``TinyDiffusionConfig(latent_channels=4)`` puts a frozen ``AutoencoderKL`` in front
# of the UNet, as Stable Diffusion does): it pays from about 64x64 images up.
#
# The training step
# -----------------
# :class:`~cai_labs.diffusion.lightning_module.DiffusionModule` is an ordinary ``LightningModule``.
# For images :math:`x_0` and captions it drops 10% of the captions (the empty prompt teaches the
# unconditional model that guidance needs), draws :math:`t` and :math:`\epsilon \sim N(0, I)`,
# forms :math:`x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon` and minimises
#
# .. math::
#
#    L = \big\| v - v_\theta(x_t,\ t,\ \text{text}) \big\|^2, \qquad
#    v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1-\bar\alpha_t}\,x_0 .
#
# This is the *v-prediction* objective of Stable Diffusion 2 rather than the original
# :math:`\|\epsilon - \epsilon_\theta\|^2`. It is the same model (each of :math:`v`,
# :math:`\epsilon`, :math:`x_0` follows from the others and :math:`x_t`: an error :math:`\delta` in
# :math:`v` is an error :math:`\sqrt{\bar\alpha_t}\,\delta` in :math:`\epsilon`), but it weighs
# the noise levels differently, and that decides whether the model learns to follow its prompt in
# a few hundred steps. Which digit a sample becomes is settled in the first, noisiest sampling
# steps, where :math:`\bar\alpha_t \approx 0`: there :math:`\epsilon \approx x_t` is free to
# predict and an :math:`\epsilon` loss charges a wrong digit only :math:`\bar\alpha_t` times what
# the :math:`v` loss charges. Trained on :math:`\epsilon`, the prompt gets almost no gradient where
# it matters. The last section measures this on the trained model. The UNet also receives the
# prompt twice: through its cross-attention blocks, and pooled into the timestep embedding that
# every ResNet block reads (diffusers' ``addition_embed_type="text"``, DeepFloyd IF's design), and
# the text encoder trains with the UNet (from random weights, there is no pre-trained CLIP here).
#
# Its randomness comes from a generator seeded by ``(seed, step, rank)``, so two strategies that
# see the same data see the same noise, and their losses can be compared exactly.
#
# Lightning on ranks that already exist
# -------------------------------------
# ``launch`` forks the ranks and initialises the process group (forking is what lets a worker
# defined on this page run in child processes). Inside, every rank builds the same ``Trainer``
# with ``devices=1, num_nodes=WORLD_SIZE`` and a
# :class:`~cai_labs.lightning.environment.ProcessGroupEnvironment` that reads rank and world size
# from ``torch.distributed``: Lightning's DDP set-up finds the group initialised and joins it
# (:func:`~cai_labs.lightning.trainer.rank_trainer`). Lightning inserts a ``DistributedSampler``,
# so each rank trains on its half of every epoch.


def loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        train_set, batch_size=BATCH_PER_RANK, shuffle=True, collate_fn=collate, drop_last=True
    )


def mean_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, device=device())
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


# %%
# Memory and time: DDP, ZeRO, offload, bf16, checkpointing
# ---------------------------------------------------------
# :class:`~cai_labs.lightning.zero_strategy.ZeroStrategy` subclasses Lightning's ``DDPStrategy``
# and changes what ``setup`` does, like ``ColossalAIStrategy``: the module is wrapped in
# :class:`~cai_labs.zero.Zero1`, :class:`~cai_labs.zero.Zero2` or :class:`~cai_labs.zero.Zero3`
# (parameters become views into one flat buffer per UNet block, see
# :meth:`~cai_labs.diffusion.lightning_module.DiffusionModule.zero_units`) and the AdamW from
# ``configure_optimizers`` is replaced by a
# :class:`~cai_labs.zero.ZeroOptimizer` holding only this rank's :math:`1/N` of the Adam moments.
# Lightning's loop is untouched. Checkpoints gather the shards so that rank 0 writes an ordinary
# checkpoint, and loading cuts each rank's shard back out (tested in
# ``tests/test_diffusion_lightning.py``).
#
# ``ZeroStrategy(offload=True, device_budget=B)`` adds the other half of what Colossal-AI's
# strategy brought, placement of model state between GPU and CPU memory. The sharded Adam moments
# are chunks of a :class:`~cai_labs.offload.manager.ChunkManager` homed in its host pool; the
# optimizer step fetches each shard's two moment chunks into a device pool of at most ``B``
# bytes, updates them and leaves them there until room is needed (least recently used first, a
# changed chunk copied back to host before it is dropped):
# :class:`~cai_labs.offload.offloaded_adamw.OffloadedAdamW`. On this CPU both pools are RAM and
# the device pool is an enforced account, so the row shows what would sit on the GPU and what
# would cross PCIe. ``OFFLOAD_SHARE`` sets ``B`` as a share of the rank's moments.
#
# Two options of the module are orthogonal to the strategy: ``precision="bf16-mixed"`` runs
# forward and backward under autocast (activations and matmuls in bfloat16, weights and optimizer
# state stay fp32), and ``gradient_checkpointing=True`` calls the UNet's
# ``enable_gradient_checkpointing()``: each block's inner activations are recomputed during
# backward instead of stored. Each variant trains ``MEASURE_STEPS`` steps from the same weights;
# a :class:`~cai_labs.lightning.measure.LedgerCallback` opens a
# :class:`~cai_labs.ledger.Ledger` on every rank and records its memory by category.

VARIANTS = {
    "Lightning DDP": ("ddp", "32-true", False),
    "cai_labs ZeRO-1": ("zero1", "32-true", False),
    "cai_labs ZeRO-2": ("zero2", "32-true", False),
    "cai_labs ZeRO-3": ("zero3", "32-true", False),
    "ZeRO-2 + offloaded Adam": ("zero2+offload", "32-true", False),
    "DDP + bf16 autocast": ("ddp", "bf16-mixed", False),
    "DDP + checkpointing": ("ddp", "32-true", True),
    "ZeRO-2 + bf16 + checkpointing": ("zero2", "bf16-mixed", True),
}


# %%
# The offloaded variant's device budget:


def offload_budget(module: DiffusionModule) -> int:
    """OFFLOAD_SHARE of this rank's Adam moments (8 Psi / N bytes), but at least the two moment
    chunks of the largest unit's shard, which one update needs on the device at once."""
    units = [sum(p.numel() for p in u.parameters()) for u in module.zero_units()]
    psi = sum(p.numel() for p in module.parameters())
    largest = max(*units, psi - sum(units))
    n = dist.get_world_size()
    return max(int(OFFLOAD_SHARE * 8 * psi / n), 8 * (largest // n + 1))


# %%
# The worker trains each variant for ``MEASURE_STEPS`` steps under the ledger:


def measure_worker() -> dict:
    out = {}
    for name, (strategy, precision, checkpointing) in VARIANTS.items():
        module = DiffusionModule(CONFIG, lr=LR, seed=SEED, gradient_checkpointing=checkpointing)
        probe = LedgerCallback()
        strategy, _, offload = strategy.partition("+")
        options = {"offload": True, "device_budget": offload_budget(module)} if offload else None
        trainer = rank_trainer(
            strategy,
            max_steps=MEASURE_STEPS,
            precision=precision,
            callbacks=[probe],
            strategy_options=options,
        )
        trainer.fit(module, loader())
        reports = gather_reports(probe.report())
        out[name] = {"losses": mean_over_ranks(module.loss_history), "reports": reports}
        if offload:
            out[name]["offload"] = trainer.strategy.optimizers[0].inner.manager.stats()
    return out


measured = launch(measure_worker, WORLD_SIZE)

# %%
# Rank 0's memory by kind at its peak, every rank's peak, the step time and the host traffic:

MiB = 2**20
rows = []
for name, r in measured.items():
    row = {"variant": name}
    for rep in r["reports"]:
        peak = max(rep["memory"]["snapshots"], key=lambda s: s["total"])
        row[f"rank {rep['rank']} peak (MiB)"] = rep["memory"]["peak_total"] / MiB
        if rep["rank"] == 0:
            row["params"] = (peak["params"] + peak.get("param_shards", 0)) / MiB
            row["grads"] = (peak["grads"] + peak.get("grad_shards", 0)) / MiB
            row["optimizer"] = (peak["optimizer"] + peak.get("optimizer_resident", 0)) / MiB
            row["activations (peak)"] = rep["memory"]["peak_activations"] / MiB
    times = [t for rep in r["reports"] for t in rep["step_times"][1:]]  # first step warms up
    row["step time (ms)"] = 1e3 * float(np.median(times))
    off = r.get("offload", {})
    row["optimizer on host"] = off.get("host_bytes", 0) / MiB
    row["host<->device per step"] = (
        (off.get("h2d_demand", 0) + off.get("h2d_prefetch", 0) + off.get("d2h", 0))
        / MEASURE_STEPS
        / MiB
    )
    row["final loss"] = r["losses"][-1]
    rows.append(row)
# %%
# In MiB per rank:

table = pd.DataFrame(rows).set_index("variant")
table.style.format(
    {c: "{:.2f}" for c in table.columns} | {"final loss": "{:.4f}", "step time (ms)": "{:.0f}"}
)

# %%
# How to read it. With :math:`\Psi` parameters in fp32 and Adam's two moments, data parallel
# keeps :math:`4\Psi` bytes of weights, :math:`4\Psi` of gradients and :math:`8\Psi` of optimizer
# state on every rank. ZeRO-1 keeps :math:`8\Psi/N` of optimizer state, ZeRO-2 also
# :math:`4\Psi/N` of gradients, ZeRO-3 also :math:`4\Psi/N` of parameters between uses (a unit's
# full parameters exist only while its forward or backward runs). Compare with the formula:

psi = sum(p.numel() for p in DiffusionModule(CONFIG).parameters())
formula = (
    pd.DataFrame(
        {
            "params": [4 * psi] * 3 + [4 * psi / WORLD_SIZE],
            "grads": [4 * psi, 4 * psi, 4 * psi / WORLD_SIZE, 4 * psi / WORLD_SIZE],
            "optimizer": [8 * psi] + [8 * psi / WORLD_SIZE] * 3,
        },
        index=["Lightning DDP", "cai_labs ZeRO-1", "cai_labs ZeRO-2", "cai_labs ZeRO-3"],
    )
    / MiB
)
print(f"Psi = {psi:,} parameters, N = {WORLD_SIZE}; formula (MiB):")
print(formula.round(2).to_string())
for name in formula.index:
    got = table.loc[name, "optimizer"]
    want = formula.loc[name, "optimizer"]
    assert abs(got - want) <= 0.05 * want, f"{name}: optimizer state {got:.3f} MiB vs {want:.3f}"

# %%
# The optimizer column follows the formula (flat buffers are padded to a multiple of N, a few
# bytes). On this toy model the activations dominate the peak, which is why the two options
# matter as much as the strategy: bf16 autocast stores activations in half the bytes (plus a bf16
# copy of the weights), checkpointing stores a fraction of them and pays with recomputation (see
# the step time). On a real Stable Diffusion UNet (860 M parameters: 13.8 GB of fp32 weights,
# gradients and Adam state) the ZeRO columns are what decides whether training fits on a GPU.
#
# With offload the optimizer column is what is resident on the device, at most the budget; the
# rank's full :math:`8\Psi/N` bytes of moments sit in host memory, and every step moves them
# in and out once (the budget holds only a share, so least-recently-used eviction cycles
# through all of them): host-device traffic of about :math:`2 \times 8\Psi/N` per step, the
# price of the freed device memory.

step_ms = table["step time (ms)"]
bf16_ratio = step_ms["DDP + bf16 autocast"] / step_ms["Lightning DDP"]
native_bf16 = build_env.cpu_flags("avx512_bf16", "amx_bf16") or ["none"]
print(
    f"bf16 autocast step / fp32 step: {bf16_ratio:.2f}; bf16 instructions of this CPU: "
    f"{', '.join(native_bf16)}"
)

# %%
# Autocast is a memory technique first; its speed depends on the hardware and the op sizes. It
# casts every weight to bf16 at each op (and back for the gradients), and on a toy model whose
# ops are small those casts and the extra dispatch can cost more than the bf16 products save,
# which is what a ratio above 1 shows (the CPU's bf16 instructions are listed above). On GPUs
# with bf16 tensor cores and real layer sizes, the products dominate and bf16 is the faster.

off = measured["ZeRO-2 + offloaded Adam"]["offload"]
print(
    f"offload: device budget {off['device_budget'] / MiB:.3f} MiB, device peak "
    f"{off['device_peak'] / MiB:.3f} MiB (accounted), "
    f"{off['device_storage_peak'] / MiB:.3f} MiB (measured: allocated storage), "
    f"host {off['host_bytes'] / MiB:.3f} MiB "
    f"(8 Psi / N = {8 * psi / WORLD_SIZE / MiB:.3f} MiB); {off['fetch']} fetches, "
    f"{off['evict']} evictions in {MEASURE_STEPS} steps"
)
assert off["device_peak"] <= off["device_budget"]
assert off["device_storage_peak"] <= off["device_budget"]
assert abs(off["host_bytes"] - 8 * psi / WORLD_SIZE) <= 0.05 * 8 * psi / WORLD_SIZE

# %%
# Correctness: neither ZeRO nor offload may change training. The loss of every step equals
# Lightning DDP's:

for name in ("cai_labs ZeRO-1", "cai_labs ZeRO-2", "cai_labs ZeRO-3", "ZeRO-2 + offloaded Adam"):
    gap = max(
        abs(a - b) for a, b in zip(measured[name]["losses"], measured["Lightning DDP"]["losses"])
    )
    print(f"{name}: largest loss difference to Lightning DDP over {MEASURE_STEPS} steps: {gap:.1e}")
    assert gap < 1e-4, f"{name} drifted from DDP by {gap}"

# %%
# Training the model, once
# ------------------------
# Now the real run: ``TRAIN_STEPS`` steps with the ZeRO-2 strategy on ``WORLD_SIZE`` ranks. Rank 0
# returns the trained weights; everything below (sampling, judging) uses this one model.


def train_worker() -> dict:
    module = DiffusionModule(CONFIG, lr=LR, seed=SEED)
    start = time.perf_counter()
    rank_trainer("zero2", max_steps=TRAIN_STEPS).fit(module, loader())
    seconds = time.perf_counter() - start
    return {
        "losses": mean_over_ranks(module.loss_history),
        "seconds": seconds,
        "state": {k: v.clone() for k, v in module.state_dict().items()},
    }


trained = launch(train_worker, WORLD_SIZE)
model = DiffusionModule(CONFIG, lr=LR, seed=SEED)
model.load_state_dict(trained["state"])
print(
    f"trained {len(trained['losses'])} steps (global batch {WORLD_SIZE * BATCH_PER_RANK}) in "
    f"{trained['seconds']:.0f} s; loss {np.mean(trained['losses'][:10]):.3f} (first 10 steps) "
    f"-> {np.mean(trained['losses'][-20:]):.3f} (last 20)"
)

# %%
# The loss curve of the real run, and those of the measured variants from the same start:

fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
ax[0].plot(trained["losses"], color="0.7", lw=0.8, label="per step")
k = min(10, len(trained["losses"]))
smooth = np.convolve(trained["losses"], np.ones(k) / k, mode="valid")
ax[0].plot(np.arange(k - 1, len(trained["losses"])), smooth, color="C0", label=f"mean of {k}")
ax[0].set(
    xlabel="optimizer step",
    ylabel="v-prediction MSE",
    yscale="log",
    title=f"Training run: ZeRO-2 on {WORLD_SIZE} ranks",
)
ax[0].legend()
for name, r in measured.items():
    ax[1].plot(np.arange(1, MEASURE_STEPS + 1), r["losses"], marker="o", ms=3, label=name)
ax[1].set(xlabel="optimizer step", ylabel="loss", title="Measured variants, same start")
ax[1].legend(fontsize=7)
fig.tight_layout()

# %%
# The checkpoint is an ordinary diffusers/transformers layout: each part is written with
# ``save_pretrained`` and read back with ``from_pretrained``. A reader with real Stable Diffusion
# weights on disk can point :func:`~cai_labs.diffusion.model.load_components` at them.

checkpoint_dir = tempfile.mkdtemp(prefix="tiny_sd_")
save_components(model.parts, checkpoint_dir)
print("saved:", sorted(os.listdir(checkpoint_dir)))
pipeline = load_components(checkpoint_dir)

# %%
# Generating digits, and judging them
# -----------------------------------
# :func:`~cai_labs.diffusion.sampling.generate` starts from seeded noise and runs ``SAMPLE_STEPS``
# DDIM steps with classifier-free guidance,
#
# .. math::
#
#    \hat\epsilon = \epsilon_\varnothing + g\,(\epsilon_{\text{prompt}} - \epsilon_\varnothing).
#
# The judge is an MLP trained on the *real* upscaled digits only
# (:func:`~cai_labs.diffusion.judge.train_digit_classifier`); the score is the fraction of samples
# it assigns to the prompted digit. A model that ignored its prompt would score about 10%.

judge, judge_accuracy = train_digit_classifier(size=CONFIG.image_size, seed=SEED)
print(f"judge accuracy on held-out real digits: {judge_accuracy:.3f}")

# %%
# Eight samples per digit with guidance, the same prompts without it (:math:`g = 1`), and one
# batch drawn twice from the same seed, which must give the same images:

labels = torch.arange(10).repeat_interleave(SAMPLES_PER_DIGIT)
prompts = [prompt_for(int(d)) for d in labels]
start = time.perf_counter()
samples = generate(pipeline, prompts, steps=SAMPLE_STEPS, guidance=GUIDANCE, seed=SEED)
sample_seconds = time.perf_counter() - start
predicted = classify(judge, samples)
hits = (predicted == labels).float()
per_digit = hits.view(10, SAMPLES_PER_DIGIT).mean(1)
unguided = generate(pipeline, prompts, steps=SAMPLE_STEPS, guidance=1.0, seed=SEED)
unguided_score = (classify(judge, unguided) == labels).float().mean().item()
first = generate(pipeline, prompts[:10], steps=SAMPLE_STEPS, guidance=GUIDANCE, seed=SEED + 1)
again = generate(pipeline, prompts[:10], steps=SAMPLE_STEPS, guidance=GUIDANCE, seed=SEED + 1)
assert torch.equal(first, again), "sampling with the same seed must reproduce the images"

print(f"{len(prompts)} samples in {sample_seconds:.1f} s")
print(
    f"fraction classified as the prompted digit: {hits.mean():.3f} with guidance {GUIDANCE} "
    f"({unguided_score:.3f} without guidance); chance is 0.100"
)
print("per digit:", {d: round(float(a), 2) for d, a in enumerate(per_digit)})
assert hits.mean() > 0.3, (
    f"only {hits.mean():.2f} of the samples show the prompted digit: raise TRAIN_STEPS"
)

# %%
# Every sample, framed green where the judge reads the prompted digit and red where not:

fig, axes = plt.subplots(10, SAMPLES_PER_DIGIT, figsize=(SAMPLES_PER_DIGIT * 0.8, 10 * 0.85))
for i, ax in enumerate(axes.flat):
    ax.imshow(samples[i, 0].numpy(), cmap="gray_r", vmin=-1, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    ok = bool(hits[i])
    for spine in ax.spines.values():
        spine.set_color("C2" if ok else "C3")
        spine.set_linewidth(2)
    if i % SAMPLES_PER_DIGIT == 0:
        ax.set_ylabel(f'"{prompts[i]}"', rotation=0, ha="right", va="center", fontsize=8)
fig.suptitle("Generated for each prompt (green: the judge agrees, red: it does not)", fontsize=9)
fig.tight_layout()

# %%
# Where the prompt matters
# ------------------------
# Why train on :math:`v` rather than :math:`\epsilon`? Take held-out digits, noise them to level
# :math:`t`, and ask the trained UNet for :math:`v` twice: with the right caption and with a wrong
# one (the digit three further on). The gap between the two losses is what knowing the prompt is
# worth at that noise level. The same prediction scored as an :math:`\epsilon`-model would see
# that gap multiplied by :math:`\bar\alpha_t` (an error :math:`\delta` in :math:`v` is
# :math:`\sqrt{\bar\alpha_t}\,\delta` in :math:`\epsilon`):

PROBE_IMAGES = 200
x0 = test_set.images[:PROBE_IMAGES]
y = test_set.labels[:PROBE_IMAGES]
scheduler = pipeline.noise_scheduler
probe_gen = torch.Generator().manual_seed(SEED)


def v_losses(level: int, captions: dict) -> dict:
    """The v-prediction loss at noise level ``level`` for each set of caption embeddings."""
    t = torch.full((PROBE_IMAGES,), level)
    noise = torch.randn(x0.shape, generator=probe_gen)
    xt = scheduler.add_noise(x0, noise, t)
    v = scheduler.get_velocity(x0, noise, t)
    return {
        name: torch.nn.functional.mse_loss(
            pipeline.unet(xt, t, encoder_hidden_states=text).sample, v
        ).item()
        for name, text in captions.items()
    }


# %%
# Five noise levels, the right caption and a wrong one (the digit three further on):

pipeline.unet.eval()
pipeline.text_encoder.eval()
with torch.no_grad():
    captions = {
        "right": encode_prompts(pipeline, [prompt_for(int(d)) for d in y]),
        "wrong": encode_prompts(pipeline, [prompt_for(int(d + 3) % 10) for d in y]),
    }

# %%
# At each level, both losses on the same noised images, and the gap in both objectives' units:

probe_rows = []
with torch.no_grad():
    for level in (50, 250, 500, 750, 950):
        loss = v_losses(level, captions)
        abar = scheduler.alphas_cumprod[level].item()
        gap = loss["wrong"] - loss["right"]
        probe_rows.append(
            {
                "t": level,
                "abar_t": abar,
                "v loss, right prompt": loss["right"],
                "v loss, wrong prompt": loss["wrong"],
                "gap in v loss": gap,
                "same gap in eps loss": abar * gap,
            }
        )
# %%
# The gap grows with the noise level (asserted):

probe = pd.DataFrame(probe_rows).set_index("t")
assert probe["gap in v loss"].iloc[-1] > probe["gap in v loss"].iloc[0], "prompt gap does not grow"
probe.style.format("{:.4f}")

# %%
# The prompt is worth most at the noisy end (large :math:`t`), where the sampler decides which
# digit to draw; there the :math:`\epsilon` objective hardly sees it. That is why this page trains
# on :math:`v` (``TinyDiffusionConfig(prediction_type="v_prediction")``, the default). Set
# ``prediction_type="epsilon"`` in ``CONFIG`` and compare the judge's score with this page's
# (that variant was not run for this build).

# %%
# At real scale
# -------------
# The measurements above saved little with ZeRO because a toy UNet's activations dwarf its
# model states. The real Stable Diffusion 1.5 UNet has 860 million parameters; with the ZeRO
# formula of :func:`cai_labs.zero.formulas.zero_memory_formula` (checked against the ledger),
# its model states per GPU on 8 A100 40 GB under DDP, ZeRO-1/2/3 and offload, in fp32 and in
# bf16 with fp32 master weights. **Modeled**, model states only (the scale model does not model
# a UNet's activations).

from cai_labs.scale import ScaleLayout, predict

unet_rows = []
for precision in ("fp32", "bf16"):
    for name, stage, offload in (
        ("DDP", 0, False),
        ("ZeRO-1", 1, False),
        ("ZeRO-2", 2, False),
        ("ZeRO-3", 3, False),
        ("ZeRO-2 + offload", 2, True),
    ):
        layout = ScaleLayout(dp=8, zero=stage, offload=offload, precision=precision, global_batch=8)
        m = predict("sd-1.5-unet", "a100-40gb", layout).memory_per_gpu_bytes
        unet_rows.append(
            {
                "precision": precision,
                "setup": name,
                "GB per GPU": m["total"] / 1e9,
                "of which optimizer": m["optimizer"] / 1e9,
                "host (GB)": m["host_optimizer"] / 1e9,
            }
        )
unet = pd.DataFrame(unet_rows).set_index(["precision", "setup"])
assert unet.loc[("bf16", "ZeRO-3"), "GB per GPU"] < unet.loc[("bf16", "DDP"), "GB per GPU"] / 4
unet.style.format("{:.2f}")

# %%
# Running it on GPUs with Colossal-AI
# -----------------------------------
# Colossal-AI's Lightning strategy, ``lightning_colossalai.ColossalAIStrategy``, stopped at
# release 0.1.0, written against Colossal-AI 0.2: it imports ``colossalai.nn.parallel.GeminiDDP``,
# ``colossalai.zero.ZeroOptimizer`` and ``colossalai.core``, none of which exist in 0.5.0. With
# 0.5.0 the same module trains through the ``Booster`` instead: Gemini (ZeRO-3 over chunks, with
# parameters and optimizer state placed between GPU and CPU memory by a policy) wraps the UNet,
# the part that trains, as Colossal-AI's own DreamBooth example does, with fp16 and its
# ``HybridAdam``. **Checked against colossalai 0.5.0, needs CUDA** (Gemini does).

from cai_labs.colossal import checked_here


def colossalai_gemini_unet(module: DiffusionModule, steps: int = 100) -> None:
    """The page's module with Gemini on its UNet: ``colossalai run --nproc_per_node 8``."""
    import itertools

    import colossalai
    from colossalai.booster import Booster
    from colossalai.booster.plugin import GeminiPlugin
    from colossalai.nn.optimizer import HybridAdam

    colossalai.launch_from_torch()
    booster = Booster(plugin=GeminiPlugin(placement_policy="auto", precision="fp16"))
    optimizer = HybridAdam(module.unet.parameters(), lr=1e-4)
    module.unet, optimizer, *_ = booster.boost(module.unet, optimizer)
    module.text_encoder.cuda()
    for images, captions, _ in itertools.islice(loader(), steps):
        loss = module.diffusion_loss(images.cuda(), captions, module.step_generator())
        booster.backward(loss, optimizer)
        optimizer.step()
        optimizer.zero_grad()


print(checked_here(colossalai_gemini_unet))

# %%
# With this page's own pieces, the same run on GPUs is ``torchrun --nproc-per-node=8`` over this
# page: ``rank_trainer`` picks Lightning's ``"gpu"`` accelerator and the rank's own GPU when
# ``cai_labs.device()`` is one (the process group then comes from ``torchrun``'s environment).

print(f"page executed in {time.perf_counter() - page_start:.0f} s")

# %%
# Predict, then check
# -------------------
# Answer each question before opening its answer; the answers are this build's numbers.

ddp_opt = table.loc["Lightning DDP", "optimizer"]
zero1_opt = table.loc["cai_labs ZeRO-1", "optimizer"]
exercises = Exercises()
exercises.add(
    f"The UNet and text encoder have Psi = {psi:,} parameters. How many MiB of Adam state does "
    f"rank 0 hold under Lightning DDP, and under ZeRO-1 on {WORLD_SIZE} ranks?",
    f"Measured {ddp_opt:.2f} MiB (DDP) and {zero1_opt:.2f} MiB (ZeRO-1); the formula 8 Psi and "
    f"8 Psi / N gives {8 * psi / MiB:.2f} and {8 * psi / WORLD_SIZE / MiB:.2f} MiB.",
)
exercises.add(
    "Does bf16 autocast make a training step of this toy UNet faster than fp32 on this CPU?",
    f"{'No' if bf16_ratio > 1 else 'Yes'}: bf16 step / fp32 step = {bf16_ratio:.2f} in this build "
    f"(bf16 instructions of this CPU: {', '.join(native_bf16)}).",
)
exercises.add(
    "Without classifier-free guidance (g = 1), what share of the samples will the judge read as "
    f"the prompted digit, against {hits.mean():.2f} with g = {GUIDANCE}?",
    f"{unguided_score:.3f} (chance is 0.100).",
)
exercises
