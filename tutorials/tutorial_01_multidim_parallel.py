"""
Multi-dimensional parallelism on one model: data, pipeline, tensor 1D / 2D / 2.5D / 3D
=======================================================================================

Data parallelism (the previous tutorial) copies the whole model to every rank. When the model no
longer fits one device, it has to be *split*, and there are two ways to cut it:

* **pipeline parallelism** cuts it between layers: each rank holds a few consecutive blocks (a
  *stage*) and passes activations to the next rank;
* **tensor parallelism** cuts inside the layers: every weight matrix is split over a group of
  ranks, which compute each layer together. Colossal-AI offers four ways to split a matrix:
  1D (Megatron-LM), 2D (SUMMA on a ``q x q`` grid), 2.5D (``d`` stacked 2D grids) and 3D (a
  ``q x q x q`` cube), which trade communication volume against memory.

The three dimensions compose: ``DP2 x PP2 x TP2`` runs two replicas of a two-stage pipeline whose
stages are each split over two ranks, on 8 ranks.

**In this tutorial** you will

1. train a small GPT on a real text task, serially;
2. train it under nine layouts, all from the same initial weights, and check that every loss
   curve lies on the serial one;
3. measure, per rank, the parameter memory, activation memory and communication of each layout
   and put them next to the formulas of each tensor-parallel mode;
4. compute the loss of a vocabulary split over ranks without gathering the logits
   (Megatron-LM's vocabulary-parallel cross-entropy), and measure what it saves;
5. draw the measured timeline of the GPipe and 1F1B pipeline schedules as a Gantt chart and
   compare the bubble and the activation memory with their formulas;
6. run PyTorch's own DTensor tensor parallelism and ``torch.distributed.pipelining`` on the same
   model, side by side;
7. see the Colossal-AI code that does all of this on a GPU cluster.

Every rank is a CPU process on the machine that built this page, talking through ``gloo``.
"""

# %%
# Set-up: the model and the task
# ------------------------------
# The model is :class:`cai_labs.models.gpt.GPT`: token and position embeddings, ``N_LAYERS``
# pre-norm transformer blocks, a final norm and a vocabulary head, written with plain
# ``nn.Linear`` layers so that the parallel versions can split exactly those weights.
#
# **The task** is character-level language modelling on the docstrings of the Python standard
# library (``inspect.getdoc`` over ``json``, ``pathlib``, ``collections``, ... : about 280,000
# characters of real English about programming). It needs no download, every Python has it, and
# it has a measurable answer: the cross-entropy of the next character, in nats. Guessing
# uniformly over the 64 characters scores ``ln 64``; knowing only how frequent each character
# is (the unigram entropy) scores less; a model that reads context must get below that. A
# generated task (sorting, addition) would have been as cheap, but real text makes the loss
# curves look like those of real training.
#
# The constants size every run on the page; raise them on your own machine.

import math
import os
import time

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from cai_labs import Layout, Ledger, build_env, device, launch, parallelize, report
from cai_labs.data.char_corpus import load_char_corpus
from cai_labs.exercises import Exercises
from cai_labs.hybrid import PRESETS, classify_comm, lm_loss, predicted_cost
from cai_labs.models import GPT, GPTConfig
from cai_labs.pipeline import bubble_formula, measured_bubble, step_events
from cai_labs.tensor_parallel.formulas import COLOSSALAI_TABLE, linear_cost

# %%
# The sizes; every layout below trains on the same global batches, drawn from a seed on
# every rank (no communication).

CFG = GPTConfig(vocab_size=64, seq_len=32, d_model=64, n_heads=4, n_layers=4)
BATCH = 16  # sequences per optimizer step (global, over all replicas)
STEPS = 12  # steps each layout trains (every layout on the same batches)
SERIAL_STEPS = 300  # a longer serial run: how far this model gets on the task
LR = 3e-3
SEED = 0
# One thread in this process, like each rank: on a small shared machine more threads than
# cores spin against each other and make every number on the page noisier.
torch.set_num_threads(1)

print(build_env.describe(ranks=8))  # where this page's numbers were measured (up to 8 ranks)
corpus = load_char_corpus(vocab_size=CFG.vocab_size)
print(f"corpus: {len(corpus.train):,} training and {len(corpus.valid):,} validation characters")
print(
    f"uniform guess: ln {CFG.vocab_size} = {math.log(CFG.vocab_size):.3f} nats/char; "
    f"unigram entropy: {corpus.unigram_entropy:.3f} nats/char"
)
print("a training sequence:", repr(corpus.decode(corpus.batch(0, 1, CFG.seq_len)[0][0])))
print(f"parameters: {sum(p.numel() for p in GPT(CFG).parameters()):,}")


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same global batch for step ``step`` on every rank: a seeded draw, no communication."""
    x, y = corpus.batch(step, BATCH, CFG.seq_len, seed=SEED)
    return x.to(device()), y.to(device())


# %%
# The serial baseline
# -------------------
# An ordinary loop. The first ``STEPS`` losses are what every layout must reproduce; the longer
# run shows the task has an answer the model can reach: its validation loss against the
# unigram entropy.


def validation_loss(model: torch.nn.Module, n: int = 8) -> float:
    with torch.no_grad():
        return float(
            np.mean(
                [
                    lm_loss(model(x), y).item()
                    for x, y in (corpus.batch(i, 32, CFG.seq_len, split="valid") for i in range(n))
                ]
            )
        )


# %%
# One model and optimizer; each serial step records its loss and its time.

model = GPT(CFG, seed=SEED)
optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
serial_losses, serial_times = [], []


def serial_step(step: int) -> None:
    x, y = batch(step)
    start = time.perf_counter()
    optimizer.zero_grad()
    loss = lm_loss(model(x), y)
    loss.backward()
    optimizer.step()
    serial_times.append(time.perf_counter() - start)
    serial_losses.append(loss.item())


# %%
# The first ``STEPS`` steps run under a ledger (the serial parameter and activation memory the
# layouts are compared with), the rest of the run without it.

with Ledger(model=model, optimizer=optimizer) as serial_ledger:  # measure the first STEPS
    for step in range(STEPS):
        serial_step(step)
    serial_snapshot = serial_ledger.snapshot("after STEPS")
for step in range(STEPS, SERIAL_STEPS):
    serial_step(step)
serial_valid = validation_loss(model)

# %%
# It learns the text: the validation loss falls below the unigram entropy (asserted), and a
# greedy continuation of a validation snippet is recognisably English-like.

print(
    f"serial, {SERIAL_STEPS} steps: training loss {serial_losses[0]:.3f} -> "
    f"{serial_losses[-1]:.3f}; validation loss {serial_valid:.3f} nats/char "
    f"(unigram entropy {corpus.unigram_entropy:.3f})"
)
assert serial_valid < corpus.unigram_entropy, "the model did not learn beyond letter frequencies"
prompt = corpus.batch(0, 1, CFG.seq_len, split="valid")[0]
with torch.no_grad():
    ids = prompt.clone()
    for _ in range(40):
        nxt = model(ids[:, -CFG.seq_len :])[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
print(
    "greedy continuation of a validation snippet:",
    repr(corpus.decode(prompt[0])),
    "->",
    repr(corpus.decode(ids[0, CFG.seq_len :])),
)

# %%
# One model, many layouts
# -----------------------
# A :class:`~cai_labs.hybrid.layout.Layout` names the degree of each dimension; the world size
# is ``dp * pp * tp``. Rank ``r`` sits at ``r = d*(pp*tp) + s*tp + t``: tensor-parallel ranks are
# neighbours (they talk every layer; on a GPU node they should share NVLink), then the stages of
# one replica, then the replicas. Every rank builds the serial GPT from the same seed and calls
# :func:`cai_labs.parallelize` on it, which applies the dimensions in a fixed order:
# ``apply_tp`` swaps the blocks for their tensor-parallel twins (``parallelize_block(block,
# grid)`` of the mode) and splits the token embedding, the head and the loss by vocabulary over
# the grid; ``apply_pp`` keeps this rank's stage; ``apply_dp`` joins the data-parallel group.
# The model's ``train_step`` takes the global batch; each replica keeps its share, its pipeline
# runs it as micro-batches, and the replicas average gradients.
#
# Impossible layouts are refused before any rank starts, with what to change:

for bad in (Layout(tp=6, tp_mode="2d"), Layout(pp=8), Layout(dp=2, n_micro=3)):
    try:
        bad.validate(CFG, batch_size=BATCH)
    except ValueError as err:
        print(f"{bad.name}: {err}")

# %%
# The worker below runs on every rank of a layout. The ledger records every collective and
# point-to-point call, the memory of parameters and of activations saved for backward, and the
# pipeline's forward/backward events. ``classify_comm`` sorts the last step's traffic into the
# three dimensions, and :func:`~cai_labs.hybrid.costs.predicted_cost` gives the formula for the
# same rank.


def train_layout(layout: Layout) -> dict:
    model = parallelize(GPT(CFG, seed=SEED), layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, times = [], []
    with Ledger(model=model, optimizer=optimizer) as ledger:
        for step in range(STEPS):
            first_record = len(ledger.comm)
            start = time.perf_counter()
            losses.append(model.train_step(*batch(step), optimizer, ledger=ledger, step=step))
            times.append(time.perf_counter() - start)
        last_step = classify_comm(ledger.comm[first_record:], layout)
        memory = ledger.snapshot("end")
    rank = dist.get_rank()
    mine = {
        "rank": rank,
        "coords": model.coords,
        "params": memory["params"],
        "peak_activations": ledger.peak_activations,
        **{f"{k} bytes": v for k, v in last_step.items()},
        "formula": predicted_cost(CFG, layout, BATCH, rank),
    }
    step_time = float(np.median(times[1:]))
    return {"losses": losses, "step_time": step_time, "ranks": report.from_every_rank(mine)}


# %%
# Each preset layout is launched on its own number of ranks:

results = {}
for name, layout in PRESETS.items():
    if layout.world_size == 1:
        continue
    start = time.perf_counter()
    results[name] = launch(train_layout, layout.world_size, layout)
    gap = max(abs(a - b) for a, b in zip(results[name]["losses"], serial_losses))
    print(
        f"{name:22s} {layout.world_size} ranks  final loss "
        f"{results[name]['losses'][-1]:.4f}  max |loss - serial| {gap:.1e}  "
        f"({time.perf_counter() - start:.1f} s with start-up)"
    )

# %%
# Every curve on the serial one
# -----------------------------
# Parallel arithmetic sums in a different order, so the losses agree to rounding (about
# :math:`10^{-6}`), not bit for bit. The page fails to build if any layout drifts.

for name, r in results.items():
    gap = max(abs(a - b) for a, b in zip(r["losses"], serial_losses))
    assert gap < 1e-4, f"{name} drifted from the serial loss by {gap}"

report.loss_curves(
    serial_losses[:STEPS],
    {name: r["losses"] for name, r in results.items()},
    title="Nine layouts, one loss curve",
    ylabel="training loss (nats/char)",
)

# %%
# Memory and communication per rank, next to the formulas
# -------------------------------------------------------
# For one linear layer ``(M, K) -> (M, N)`` (``M`` tokens) on ``P`` ranks, the tensor-parallel
# modes cost, per rank, in elements (:mod:`cai_labs.tensor_parallel.formulas`, where each term
# is derived):
#
# ==========  ==============  =================  ===========================================
# mode        parameters      saved input        communication per forward + backward
# ==========  ==============  =================  ===========================================
# 1D column   :math:`KN/P`    :math:`MK`         :math:`MK` (all-reduce of dX)
# 1D row      :math:`KN/P`    :math:`MK/P`       :math:`MN` (all-reduce of Y)
# 2D          :math:`KN/q^2`  :math:`MK/q^2`     :math:`3q(MK/q^2 + KN/q^2)` + bias
# 2.5D        :math:`KN/q^2`  :math:`MK/(dq^2)`  :math:`3q(MK/(dq^2) + KN/q^2)` + depth sum
# 3D          :math:`KN/q^3`  :math:`MK/q^3`     :math:`(3MK + 3KN + 2MN)/q^2` + bias
# ==========  ==============  =================  ===========================================
#
# A layout adds to its blocks the embeddings and head (token table and head split by
# vocabulary over the grid: one all-reduce of the embedded batch, one of the head input's
# gradient, the loss's three of ``b*s`` numbers), the pipeline's activation sends (``(B/dp) s d``
# per stage boundary each way, ``1/tp`` of it when the activation is split over the grid) and
# the data-parallel all-reduce of the gradients (:mod:`cai_labs.hybrid.costs`).
# The table shows rank 0 of each layout, measured in the last training step, the formula for
# rank 0 beside each measurement, and whether *every* rank of the layout matched its own
# formula exactly. The last columns are the Colossal-AI documentation's growth rates for the
# mode, and rank 0's peak of activations saved for backward relative to the serial model's.


def matches(x: dict) -> bool:
    """A rank's measured parameters and traffic equal its formula exactly."""
    f = x["formula"]
    measured = (x["params"], x["tp bytes"], x["pp bytes"], x["dp bytes"])
    return measured == (f.param_bytes, f.tp_bytes, f.pp_bytes, f.dp_bytes)


def measured_and_formula(x: dict) -> dict:
    """One rank's measurements, each next to its formula."""
    f = x["formula"]
    out = {"params (B)": x["params"], "params formula": f.param_bytes}
    for d in ("tp", "pp", "dp"):
        out[f"{d.upper()} bytes/step"] = x[f"{d} bytes"]
        out[f"{d.upper()} formula"] = getattr(f, f"{d}_bytes")
    return out


# %%
# One row per layout (rank 0), the page fails to build if any rank differs from its formula:

rows = [{"layout": "serial", "ranks": 1, "params (B)": serial_snapshot["params"]}]
for name, r in results.items():
    layout, r0 = PRESETS[name], r["ranks"][0]
    assert all(matches(x) for x in r["ranks"]), f"{name}: a rank's bytes differ from its formula"
    mode = COLOSSALAI_TABLE.get(layout.tp_mode, {}) if layout.tp > 1 else {}
    rows.append(
        {
            "layout": name,
            "ranks": layout.world_size,
            **measured_and_formula(r0),
            "all ranks = formula": "yes",
            "activations / serial": r0["peak_activations"] / serial_ledger.peak_activations,
            "Colossal-AI: params": mode.get("memory (parameters)", ""),
            "Colossal-AI: activations": mode.get("memory (activations)", ""),
        }
    )
report.table(rows, index="layout")

# %%
# Reading the table. Parameters fall as ``1/tp`` in 1D and ``1/q^2``, ``1/q^2`` (2.5D keeps
# ``d`` copies of a ``q x q`` split) and ``1/q^3`` in 2D, 2.5D and 3D. The byte columns are
# buffer bytes per rank per step (what the collectives were handed), next to their formulas.
# The token table and head fall as ``1/tp`` in every mode (split by vocabulary); only the
# position table and the norms stay whole on every rank. 1D splits the activations inside
# attention and the MLP (each
# rank has its own heads and its slice of the hidden layer) but keeps the block inputs and
# layer-norm outputs whole on every rank, which is why Colossal-AI lists its activation memory
# as O(1); 2D/2.5D/3D split the activations of every transformer block over the grid. Where
# the extra traffic of 2D comes from, per block, from
# :func:`~cai_labs.tensor_parallel.formulas.linear_cost` (elements, forward + backward, biases
# apart):

M_TOKENS, D = BATCH * CFG.seq_len, CFG.d_model
LINEARS = [(D, 3 * D), (D, D), (D, 4 * D), (4 * D, D)]  # qkv, proj, fc1, fc2: (K, N)
one_d = 4 * M_TOKENS * D  # two all-reduces of (M, d) forward, two backward
summa = sum(linear_cost("2d", 4, M_TOKENS, k, n, bias=False).comm_bytes // 4 for k, n in LINEARS)
summa_w = sum(linear_cost("2d", 4, 0, k, n, bias=False).comm_bytes // 4 for k, n in LINEARS)
calls_3d = linear_cost("3d", 8, M_TOKENS, D, D, bias=False).comm_calls
print(
    f"per block, q = 2: 1D all-reduces {one_d:,} elements; 2D broadcasts {summa_w:,} of weight "
    f"blocks and {summa - summa_w:,} of activation blocks ({summa:,} in all)"
)
print(f"3D: {calls_3d} collectives per linear layer, forward + backward")
assert summa_w < one_d < summa - summa_w  # what the next paragraph says

# %%
# So at this width SUMMA's weight-block broadcasts alone send less than 1D's all-reduces; it is
# the broadcasts of activation blocks that exceed them. The Colossal-AI table's "communication
# (bandwidth)" entry is a time coefficient, not bytes (it *rises* with ``q`` for 2D and 2.5D:
# ``6(q-1)/q``), and this page measured every grid at ``q = 2`` only, so it shows no trend in
# ``q``. The 3D layer uses the collectives printed above where Colossal-AI's documentation
# counts 6: its backward all-gathers ``X`` and ``A`` again instead of keeping the gathered
# copies from forward, trading two all-gathers for saved activations of ``1/q^3``
# (:mod:`cai_labs.tensor_parallel.formulas`). Pipeline traffic is tiny (one activation per
# boundary), and data-parallel traffic is one copy of the gradients.
#
# The hybrid's ranks are not alike: here is every rank of ``DP2 x PP2 x TP2-1D``.

hybrid = "DP2 x PP2 x TP2-1D"
report.table(
    [
        {
            "rank": x["rank"],
            "(replica, stage, tp)": x["coords"],
            **measured_and_formula(x),
            "peak activations (B)": x["peak_activations"],
        }
        for x in results[hybrid]["ranks"]
    ],
    index="rank",
)

# %%
# The loss without gathering the logits
# -------------------------------------
# The 1D head ``d -> V`` is column-parallel, so each rank ends with the logits of its slice of
# the vocabulary, ``(b, s, V/N)``. The simple way to the loss all-gathers them and calls
# ``F.cross_entropy``: every rank then holds all ``(b, s, V)`` logits, saves as much again
# (the log-softmax) for backward, and receives ``b*s*V`` numbers. With a real vocabulary
# (50k-250k words) that is often the largest tensor of the whole model.
#
# Megatron-LM never gathers them. The loss of a token is
# :math:`\log \sum_j e^{z_j - m} - (z_t - m)` with :math:`m = \max_j z_j`, and each of the three
# per-token numbers is a reduction over the vocabulary, so it is a reduction of per-rank
# reductions: an all-reduce **MAX** of the local row maxima, an all-reduce **SUM** of the local
# sums of exponentials, and an all-reduce **SUM** of the target logit (only the rank whose slice
# holds the target contributes it; the others add 0). Three all-reduces of ``b*s`` numbers.
# Backward is local: :math:`\partial L / \partial z_j = \mathrm{softmax}_j - [j = t]`, and each
# rank has its own columns of the softmax (:mod:`cai_labs.tensor_parallel.cross_entropy`; every
# tensor-parallel layout above trained with it: ``Layout(vocab_parallel=True)``, the default).
#
# Below, both ways run on the same logits split over ``N`` ranks, with a vocabulary
# ``LOSS_VOCAB`` larger than the page's model has, so that the logits dominate. Measured per
# rank by the ledger (forward + backward of the loss alone), next to
# :func:`~cai_labs.tensor_parallel.formulas.vocab_loss_cost`:

import torch.nn.functional as F  # noqa: E402

from cai_labs.comm import gather_from_group  # noqa: E402
from cai_labs.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy  # noqa: E402
from cai_labs.tensor_parallel.formulas import vocab_loss_cost  # noqa: E402

LOSS_BATCH = 8  # sequences of CFG.seq_len tokens
LOSS_VOCAB = 8192  # raise it: the gap grows with V
LOSS_RANKS = (2, 4)


WAYS = ("gather, then F.cross_entropy", "vocab-parallel cross-entropy")

# %%
# One way of computing the loss, forward and backward, under the ledger:


def measure_loss(way: str, local: torch.Tensor, targets: torch.Tensor, group) -> tuple:
    """Forward + backward of the loss one way, and what the ledger saw of it on this rank."""
    start = time.perf_counter()
    with Ledger() as ledger:
        if way.startswith("gather"):
            held = gather_from_group(local, group, -1)  # (b, s, V) on every rank
            loss = F.cross_entropy(held.flatten(0, 1), targets.flatten(), reduction="sum")
        else:
            held = local  # (b, s, V/N): the only logits this rank ever has
            loss = vocab_parallel_cross_entropy(local, targets, group, reduction="sum")
        loss.backward()
    ms = 1e3 * (time.perf_counter() - start)
    comm = ledger.report()["comm"]
    ops = [c["op"] for c in comm]
    return loss, {
        "logits held (B)": held.numel() * held.element_size(),
        "saved (B)": ledger.peak_activations,
        "comm (B)": sum(c["bytes"] for c in comm),
        "calls": ", ".join(f"{ops.count(o)} x {o}" for o in sorted(set(ops))) or "none",
        "time (ms)": ms,
    }


# %%
# On every rank: the serial loss of the whole logits, then each way on this rank's slice.


def loss_worker() -> dict:
    n, r, group = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    gen = torch.Generator().manual_seed(SEED)
    logits = torch.randn(LOSS_BATCH, CFG.seq_len, LOSS_VOCAB, generator=gen).to(device())
    targets = torch.randint(LOSS_VOCAB, (LOSS_BATCH, CFG.seq_len), generator=gen).to(device())
    serial = logits.clone().requires_grad_()
    serial_loss = F.cross_entropy(serial.flatten(0, 1), targets.flatten(), reduction="sum")
    serial_loss.backward()
    out = {}
    for way in WAYS:
        local = logits.chunk(n, dim=-1)[r].clone().requires_grad_()
        loss, measured = measure_loss(way, local, targets, group)
        out[way] = {
            "loss error": abs(loss.item() - serial_loss.item()) / serial_loss.item(),
            "grad error": (local.grad - serial.grad.chunk(n, dim=-1)[r]).abs().max().item(),
            **measured,
        }
    return out


# %%
# Measured per rank next to the formulas (the page fails if any number differs):

loss_rows = []
for n in LOSS_RANKS:
    for way, m in launch(loss_worker, n).items():
        tokens, parallel = LOSS_BATCH * CFG.seq_len, way.startswith("vocab")
        cost = vocab_loss_cost(n, tokens, LOSS_VOCAB, parallel=parallel)
        assert m["loss error"] < 1e-6 and m["grad error"] < 1e-6, f"{way} != serial loss"
        assert (m["saved (B)"], m["comm (B)"]) == (cost.activation_bytes, cost.comm_bytes), way
        formulas = {"saved formula": cost.activation_bytes, "comm formula": cost.comm_bytes}
        loss_rows.append({"N": n, "loss": way, **m, **formulas})
report.table(loss_rows, index=["N", "loss"])

# %%
# Both give the serial loss and gradient (asserted above: relative loss error and largest
# gradient error under 1e-6). With ``M = b*s`` tokens and ``P`` ranks the formulas are: the
# gather receives ``M V`` elements and saves ``M V`` (log-softmax) + the targets; the
# vocab-parallel loss sends ``3 M`` and saves ``M V / P`` (its softmax columns) + the local
# target column. So its communication is ``3/V`` of the gather's, its saved memory falls as
# ``1/P``, and the whole ``(b, s, V)`` never exists on any rank. The wall times are of one
# forward + backward on shared CPU cores, shown, not asserted.

# %%
# Tensor + sequence parallelism: activations divided by t
# -------------------------------------------------------
# 1D tensor parallelism splits the attention and MLP weights, but the layer norms and the
# inputs of the column-parallel linears still see every token on every rank, so a rank keeps
# those activations whole. Megatron's *sequence parallelism* (Korthikanti et al. 2022) splits
# them along the sequence instead: each rank runs the layer norms on ``s/t`` tokens, an
# all-gather along the sequence before each column-parallel linear replaces *f*, and a
# reduce-scatter after each row-parallel linear replaces *g*. An all-gather plus a
# reduce-scatter move the bytes of one all-reduce, so the forward sends the same; the column
# linear keeps only its shard and gathers it again in backward, which is the price.
# :mod:`cai_labs.tensor_parallel.sequence_parallel_1d` builds the block from the serial one.

from cai_labs.models import Block
from cai_labs.tensor_parallel import layers_1d, make_grid
from cai_labs.tensor_parallel import sequence_parallel_1d as tpsp
from cai_labs.tensor_parallel.formulas import (
    block_activation_bytes,
    block_sent_bytes,
    sequence_parallel_block_activation_bytes,
)

SP_CFG = GPTConfig(vocab_size=64, seq_len=64, d_model=128, n_heads=4)
SP_BATCH = 4

# %%
# The same block three ways, each measured by a ledger over one forward and backward:


def saved_activations(kind: str) -> int:
    """Bytes one rank saves for backward in one block: ``serial``, ``tp`` or ``tp+sp``."""
    torch.manual_seed(SEED)
    block = Block(SP_CFG).to(device())
    x = torch.randn(SP_BATCH, SP_CFG.seq_len, SP_CFG.d_model, device=device())
    if kind != "serial":
        grid = make_grid("1d")
        split = tpsp.split_input(x, grid) if kind == "tp+sp" else x
        block = (tpsp if kind == "tp+sp" else layers_1d).parallelize_block(block, grid)
        x = split.detach()
    with Ledger(model=block) as ledger:
        block(x.requires_grad_()).sum().backward()
    return ledger.report()["memory"]["peak_activations"]


# %%
# Measured by the ledger on 2 and 4 ranks, next to the formulas (bytes per rank, one block):

serial_saved = saved_activations("serial")
sp_rows = []
for t in (2, 4):
    size = (t, SP_BATCH, SP_CFG.seq_len, SP_CFG.d_model, SP_CFG.n_heads)
    tp, sp = launch(saved_activations, t, "tp"), launch(saved_activations, t, "tp+sp")
    assert tp == block_activation_bytes("1d", *size)
    assert sp == sequence_parallel_block_activation_bytes(*size) < tp
    ring = block_sent_bytes(*size[:4]), block_sent_bytes(*size[:4], sequence_parallel=True)
    sp_rows.append(
        {
            "t": t,
            "serial / t": serial_saved / t,
            "TP saved": tp,
            "TP+SP saved": sp,
            "TP+SP / TP": sp / tp,
            "sent TP (ring)": ring[0],
            "sent TP+SP (ring)": ring[1],
        }
    )
report.table(sp_rows, index="t", formats={"TP+SP / TP": "{:.3f}"})

# %%
# Every saved tensor of the TP+SP block is the serial one divided by ``t`` except the causal
# mask, which each rank keeps whole; TP alone keeps the layer norms' tensors whole and so stays
# above ``serial / t``. The bytes sent are a model (ring formulas, the ledger's buffer bytes
# checked against them in the tests): TP+SP sends more than TP only by the backward re-gathers
# and the all-reduces of the replicated layer-norm and bias gradients.

# %%
# Pipeline schedules, measured
# ----------------------------
# Split the batch into ``m`` micro-batches and the stages can overlap: stage 1 works on
# micro-batch 0 while stage 0 starts micro-batch 1. Two schedules:
#
# * **GPipe**: every stage runs all ``m`` forwards, then all ``m`` backwards;
# * **1F1B** (PipeDream-Flush, Megatron-LM): stage ``s`` runs ``p - s - 1`` warm-up forwards,
#   then alternates one forward and one backward.
#
# Both compute the same gradients and, when every stage takes the same time ``t`` per
# micro-batch, both leave each stage idle for ``p - 1`` of ``m + p - 1`` slots: the *bubble*
# :math:`(p-1)/(m+p-1)`. What 1F1B saves is memory: a stage holds the activations of at most
# ``p - s`` micro-batches instead of ``m``. Each forward and backward below is an event on the
# ledger's timeline (``ledger.event("F", microbatch=i, stage=s)``); the chart is drawn from them.

PP_STAGES = 4
N_MICRO = 8
PIPE_BATCH = 128  # 8 micro-batches of 16 sequences
PIPE_STEPS = 3


def pipeline_worker() -> list[dict]:
    out = {}
    for schedule in ("gpipe", "1f1b"):
        layout = Layout(pp=PP_STAGES, n_micro=N_MICRO, schedule=schedule)
        model = parallelize(GPT(CFG, seed=SEED), layout)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        with Ledger(model=model) as ledger:
            for step in range(PIPE_STEPS):
                dist.barrier()
                x, y = (t.to(device()) for t in corpus.batch(step, PIPE_BATCH, CFG.seq_len))
                model.train_step(x, y, optimizer, ledger=ledger, step=step)
        out[schedule] = {"timeline": ledger.timeline, "peak_activations": ledger.peak_activations}
    return report.from_every_rank(out)


# %%
# The chart: one bar per forward (blue) or backward (orange) of a micro-batch, per stage.

pipe = launch(pipeline_worker, PP_STAGES)
last = PIPE_STEPS - 1  # the first step includes warm-up; draw the last one
events = {k: step_events([r[k]["timeline"] for r in pipe], step=last) for k in ("gpipe", "1f1b")}
bubbles = {k: measured_bubble(e) for k, e in events.items()}
formula = bubble_formula(PP_STAGES, N_MICRO)
report.pipeline_timeline(
    events,
    {
        k: f"{k.upper()}: measured bubble {b['bubble']:.2f}, formula (p-1)/(m+p-1) = {formula:.2f}"
        for k, b in bubbles.items()
    },
)

# %%
# And the memory each stage held at its peak (activations saved for backward, measured by the
# ledger), next to the number of micro-batches each schedule keeps alive:

mem_rows = []
for s in range(PP_STAGES):
    gp, ofob = (pipe[s][k]["peak_activations"] for k in ("gpipe", "1f1b"))
    mem_rows.append(
        {
            "stage": s,
            "GPipe peak activations (B)": gp,
            "1F1B peak activations (B)": ofob,
            "1F1B / GPipe measured": ofob / gp,
            "formula min(p-s, m) / m": min(PP_STAGES - s, N_MICRO) / N_MICRO,
            "GPipe bubble": bubbles["gpipe"][f"stage{s}"],
            "1F1B bubble": bubbles["1f1b"][f"stage{s}"],
        }
    )
assert mem_rows[0]["1F1B peak activations (B)"] < mem_rows[0]["GPipe peak activations (B)"]
report.table(mem_rows, index="stage")

# %%
# A pipeline sized for the formula
# --------------------------------
# The formula counts compute slots only. In the run above, ``PP_STAGES`` processes share the
# build machine's cores and each event lasts a few milliseconds, so gloo's per-message latency
# and the operating system's scheduling fill much of each step. Here is a run that meets the
# formula's assumptions: no more stages than cores, each pinned to its own core, and a wider
# model (``SIZED_CFG``) whose micro-batches take far longer than a message.

SIZED_CFG = GPTConfig(vocab_size=64, seq_len=64, d_model=128, n_heads=4, n_layers=4)
SIZED_STAGES = min(2, len(os.sched_getaffinity(0)))
SIZED_MICRO, SIZED_MICRO_BATCH, SIZED_STEPS = 4, 16, 4


def sized_pipeline_worker() -> list[list[dict]]:
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[dist.get_rank() % len(cores)]})  # one stage per core
    model = parallelize(GPT(SIZED_CFG, seed=SEED), Layout(pp=SIZED_STAGES, n_micro=SIZED_MICRO))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    with Ledger(model=model, track_activations=False) as ledger:
        for step in range(SIZED_STEPS):
            dist.barrier()
            x, y = corpus.batch(step, SIZED_MICRO * SIZED_MICRO_BATCH, SIZED_CFG.seq_len)
            model.train_step(x, y, optimizer, ledger=ledger, step=step)
    return report.from_every_rank(ledger.timeline)


# %%
# The measured bubble of the sized run, next to the formula:

sized = launch(sized_pipeline_worker, SIZED_STAGES)
sized_steps = [measured_bubble(step_events(sized, step=s)) for s in range(1, SIZED_STEPS)]
sized_bubble = float(np.median([b["bubble"] for b in sized_steps]))
sized_formula = bubble_formula(SIZED_STAGES, SIZED_MICRO)
event_ms = [1e3 * (e["end"] - e["start"]) for e in step_events(sized, step=SIZED_STEPS - 1)]
print(
    f"p = {SIZED_STAGES} stages on {SIZED_STAGES} cores, m = {SIZED_MICRO} micro-batches, "
    f"median event {np.median(event_ms):.0f} ms: measured bubble {sized_bubble:.3f} (median of "
    f"{len(sized_steps)} steps) vs (p-1)/(m+p-1) = {sized_formula:.3f}, "
    f"{100 * (sized_bubble / sized_formula - 1):+.0f}% off"
)
print(
    f"the oversubscribed run above: p = {PP_STAGES} stages on {len(os.sched_getaffinity(0))} "
    f"cores, m = {N_MICRO}: measured {bubbles['gpipe']['bubble']:.3f} vs "
    f"{bubble_formula(PP_STAGES, N_MICRO):.3f}"
)

# %%
# The activation ratio of the earlier table follows its formula (the last stage also keeps the
# logits and the loss, which both schedules free at the same moment). With one stage per core and
# events much longer than a message, the measured bubble is the formula's :math:`(p-1)/(m+p-1)` up
# to the percentage printed above. With more stages than cores, when all stages are busy each
# computes at a fraction of a core and its events stretch, and the gaps between events are messages
# and scheduling, not the schedule: the first run measures the machine. Raise ``SIZED_MICRO`` to
# shrink the bubble, ``SIZED_MICRO_BATCH`` to lengthen the events.
#
# Smaller bubbles: interleaved 1F1B and zero-bubble ZB-H1
# -------------------------------------------------------
# Two schedules shrink the bubble without more micro-batches. **Interleaved 1F1B**
# (Narayanan et al. 2021) gives each rank ``v`` chunks of layers, round-robin (rank 0 holds
# chunks 0 and ``p``, ...), so a slot lasts ``1/v`` as long and the bubble is
# :math:`(p-1)/(vm+p-1)`, at the price of ``v`` times as many messages. **ZB-H1** (Qi et al.
# 2023) splits each backward into B, the input gradient the previous stage is waiting for, and
# W, the weight gradient nobody waits for; W fills the idle slots, and with
# :math:`T_F = T_B = T_W` the bubble is :math:`(p-1)/(3m+p-1)`, with 1F1B's memory.
# :mod:`cai_labs.pipeline.schedules` writes each as an order of F, B and W ops; the tests check
# every order for dependencies and matched messages, and all four give the serial gradients.
# Below, all four run on the same equal stages of ``tanh(Linear)`` layers, one rank per core.

from cai_labs.pipeline import StageLinks, pipeline_step, waiting_bubble
from cai_labs.pipeline.formulas import bubble_fraction, zb_h1_bubble

SCHED_D, SCHED_LAYERS, SCHED_ROWS, SCHED_CHUNKS = 512, 4, 512, 2

# %%
# Equal stages: every rank gets the same layers, as pieces for the interleaved run.


def tanh_stage(chunks: int, rank: int) -> list[torch.nn.Module]:
    """This rank's ``SCHED_LAYERS`` layers of tanh(Linear), cut into ``chunks`` pieces."""
    torch.manual_seed(SEED + rank)
    per = SCHED_LAYERS // chunks
    layer = lambda: [torch.nn.Linear(SCHED_D, SCHED_D), torch.nn.Tanh()]  # noqa: E731
    return [
        torch.nn.Sequential(*[m for _ in range(per) for m in layer()]).to(device())
        for _ in range(chunks)
    ]


def stage_links(rank: int, p: int, ring: bool) -> StageLinks:
    """The neighbours of a rank: a line of stages, or a ring when chunks wrap around."""
    if ring:
        return StageLinks.ring(rank, p)
    return StageLinks(rank - 1 if rank > 0 else None, rank + 1 if rank < p - 1 else None)


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(out, target)


# %%
# Each rank runs ``SIZED_STEPS`` steps of one schedule and hands back its timeline:


def schedule_worker(schedule: str) -> list[list[dict]]:
    rank, p = dist.get_rank(), dist.get_world_size()
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[rank % len(cores)]})
    v = SCHED_CHUNKS if schedule == "interleaved" else 1
    chunks, links = tanh_stage(v, rank), stage_links(rank, p, ring=v > 1)
    x = torch.randn(SCHED_ROWS * SIZED_MICRO, SCHED_D, device=device()).requires_grad_()
    run = dict(stage=rank, n_stages=p, inputs=x, targets=torch.zeros_like(x), schedule=schedule)
    with Ledger(track_activations=False) as ledger:
        for step in range(SIZED_STEPS):
            dist.barrier()
            module = chunks if v > 1 else chunks[0]
            pipeline_step(
                module, links, n_micro=SIZED_MICRO, loss_fn=mse, ledger=ledger, step=step, **run
            )
    return report.from_every_rank(ledger.timeline)


# %%
# The four schedules, measured, next to their formulas. Two measurements of the idle share:
# *not computing* counts every moment outside a stage's F, B and W events; *waiting* counts only
# the moments a stage waits for another (blocked in a receive, each recorded as an ``R`` event,
# or before its first op and after its last). The difference is what a stage does between its
# ops on its own (Python, sending), which the formula's model counts as part of the ops.


def median_share(share, timelines: list[list[dict]], waits: bool) -> float:
    """The median over the measured steps (step 0 warms up) of one idle share."""
    steps = range(1, SIZED_STEPS)
    return float(np.median([share(step_events(timelines, s, waits))["bubble"] for s in steps]))


sched_rows, timelines = [], {}
for schedule in ("gpipe", "1f1b", "interleaved", "zb-h1"):
    tl = timelines[schedule] = launch(schedule_worker, SIZED_STAGES, schedule)
    got = median_share(measured_bubble, tl, waits=False)
    waited = median_share(waiting_bubble, tl, waits=True)
    v = SCHED_CHUNKS if schedule == "interleaved" else 1
    want = bubble_fraction(schedule, SIZED_STAGES, SIZED_MICRO, v)
    sched_rows.append(
        {
            "schedule": schedule,
            "formula": want,
            "waiting": waited,
            "waiting / formula": waited / want,
            "not computing": got,
            "not computing / formula": got / want,
        }
    )
report.table(sched_rows, index="schedule")

# %%
# ZB-H1's formula assumes F, B and W take the same time; the second line below uses the
# times measured in the last run. Interleaving sends ``v`` times as many messages, and each
# wait for one is idle time the formula does not count.

ev = step_events(timelines["zb-h1"], SIZED_STEPS - 1)
op_ms = {
    k: 1e3 * float(np.median([e["end"] - e["start"] for e in ev if e["name"] == k]))
    for k in ("F", "B", "W")
}
print("median op times (ms):", {k: round(t, 1) for k, t in op_ms.items()})
print(
    f"ZB-H1 formula with the measured times: "
    f"{zb_h1_bubble(SIZED_STAGES, SIZED_MICRO, *op_ms.values()):.3f}; "
    f"measured: waiting {sched_rows[-1]['waiting']:.3f}, not computing "
    f"{sched_rows[-1]['not computing']:.3f}"
)

# %%
# PyTorch side by side
# --------------------
# PyTorch ships both techniques, and both run on CPU:
#
# * **DTensor tensor parallel**: ``parallelize_module(block, mesh, {"attn.qkv":
#   ColwiseParallel(), "attn.proj": RowwiseParallel(), "mlp.fc1": ColwiseParallel(),
#   "mlp.fc2": RowwiseParallel()})`` on a 1D ``DeviceMesh`` is exactly Megatron's 1D split
#   (:mod:`cai_labs.peers.dtensor_tp`; the fused ``qkv`` rows are reordered so that each rank's
#   shard holds whole heads);
# * **torch.distributed.pipelining**: ``PipelineStage`` around the same ``GPTStage`` and
#   ``Schedule1F1B`` (:mod:`cai_labs.peers.torch_pipelining`).
#
# :mod:`cai_labs.peers.race` trains each pair in the same processes on the same batches,
# alternating their steps so that whatever else the machine does slows both alike.

from cai_labs.peers.race import race_pipeline, race_tensor_parallel  # noqa: E402

RACE_STEPS = 8
race = {
    "tensor parallel, 2 ranks (cai_labs 1D vs DTensor)": launch(
        race_tensor_parallel, 2, CFG, batch, RACE_STEPS, LR, SEED
    ),
    "pipeline 1F1B, 2 stages x 4 (cai_labs vs torch.distributed.pipelining)": launch(
        race_pipeline, 2, CFG, batch, RACE_STEPS, LR, 4, "1f1b", SEED
    ),
}

# %%
# Both engines give the serial losses (asserted); the step times are this build's.

race_rows = []
for name, r in race.items():
    ours, theirs = r["cai_labs"], r["pytorch"]
    gap = max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"]))
    gap_serial = max(abs(a - b) for a, b in zip(ours["losses"], serial_losses))
    assert gap < 1e-4 and gap_serial < 1e-4, f"{name}: engines disagree"
    race_rows.append(
        {
            "comparison": name,
            "max |loss cai_labs - loss PyTorch|": gap,
            "cai_labs step (ms)": 1e3 * ours["step_s"],
            "PyTorch step (ms)": 1e3 * theirs["step_s"],
            "ratio cai_labs / PyTorch": ours["step_s"] / theirs["step_s"],
        }
    )
report.table(race_rows, index="comparison")

# %%
# Same losses. The step-time ratio is measured in this build on shared CPU cores, so it moves
# from run to run (a ratio above 1 means the cai_labs modules were slower than PyTorch's);
# ``benchmarks/bench_tensor_parallel.py`` (``nox -s bench``) measures it
# over more steps on a wider model. At this size both engines spend most of a step in the same
# gloo calls, and PyTorch's extra machinery (DTensor dispatch, pipeline shape inference and
# schedule bookkeeping) is overhead; on GPUs at scale the production engines' fused kernels and
# overlap of communication with compute are what matter.
#
# Step times of the layouts
# -------------------------
# For completeness, the median step time of each layout measured above. Every rank here shares
# two CPU cores, so more ranks cannot make a step faster: the numbers show the overhead each
# layout adds, not the speed-up it would give with a device per rank.

step_ms = {"serial": 1e3 * float(np.median(serial_times[1:STEPS]))}
step_ms |= {name: 1e3 * r["step_time"] for name, r in results.items()}
report.bar_times(
    step_ms,
    "median step time (ms), measured in this build, shared CPU cores",
    "Step time per layout (ranks share the cores: overhead, not speed-up)",
)

# %%
# At real scale
# -------------
# The per-rank bytes of each tensor-parallel mode that the ledger matched above come from
# :func:`cai_labs.tensor_parallel.formulas.linear_cost`; :mod:`cai_labs.scale` applies the same
# function to GPT-3 175B (one sequence of 2,048 tokens per micro-batch, bf16) on 64 GPUs split
# 64 ways in each mode. **Modeled**, per GPU and per micro-batch forward + backward. A layout
# the mode cannot take gets the same error as on CPU ranks.

from cai_labs.scale import ScaleLayout, get_model, predict
from cai_labs.scale.memory import layer_cost

gpt3 = get_model("gpt-3-175b")
modes = []
for mode, depth in (("1d", 1), ("2d", 1), ("2.5d", 4), ("3d", 1)):
    layout = ScaleLayout(tp=64, tp_mode=mode, tp_depth=depth, global_batch=1)
    try:
        p = predict(gpt3, "a100-80gb", layout)
    except ValueError as e:
        modes.append({"mode": mode, "error": str(e)})
        continue
    per_layer = layer_cost(gpt3, layout, rows=gpt3.seq)
    modes.append(
        {
            "mode": mode,
            "TP bytes per GPU (GB)": gpt3.layers * per_layer.comm_bytes / 1e9,
            "collective calls": gpt3.layers * per_layer.comm_calls,
            "params per GPU (GB)": p.memory_per_gpu_bytes["params"] / 1e9,
            "error": "",
        }
    )
pd.DataFrame(modes).set_index("mode")

# %%
# The bubble formula :math:`\frac{p-1}{m+p-1}` measured above on CPU ranks (where shared cores
# stretch it) sets the pipeline's idle time on GPUs too: GPT-3 175B on 64 A100 80 GB as 8-way
# tensor x 8-way pipeline parallelism, selective recomputation, by the number of micro-batches
# per step, with the 1F1B schedule and with two interleaved chunks per stage. **Modeled.**

bubble_rows = []
for m in (8, 16, 32, 64, 128):
    for schedule, chunks in (("1f1b", 1), ("interleaved", 2)):
        layout = ScaleLayout(
            tp=8, pp=8, schedule=schedule, chunks=chunks, global_batch=m, recompute="selective"
        )
        p = predict(gpt3, "a100-80gb", layout)
        bubble_rows.append(
            {
                "micro-batches": m,
                "schedule": f"{schedule} (v={chunks})",
                "bubble share of step": p.times_s["pipeline bubble"] / p.step_time_s,
                "tokens/s/GPU": p.tokens_per_s_per_gpu,
                "MFU": p.mfu,
                "activations (GB)": p.memory_per_gpu_bytes["activations"] / 1e9,
            }
        )
scale_bubbles = pd.DataFrame(bubble_rows).set_index(["micro-batches", "schedule"])
scale_bubbles.style.format("{:.3g}")

# %%
# On GPUs, and with Colossal-AI
# -----------------------------
# ``launch`` uses NCCL when there is a GPU per rank, and under ``torchrun`` it joins the process
# group from the environment, so this page runs on 8 GPUs as::
#
#     torchrun --nproc-per-node=8 tutorial_01_multidim_parallel.py
#
# (its workers already put their batches on ``cai_labs.device()``, and ``parallelize`` its
# weights: the rank's GPU there, the CPU here). On a cluster, put the tensor-parallel
# dimension inside a node and the pipeline across nodes: tensor parallelism communicates in
# every layer, the pipeline only at stage boundaries.
#
# Colossal-AI does all three dimensions with one plugin, on Hugging Face models through its
# Shardformer policies. **Checked against colossalai 0.5.0, needs CUDA** (its hybrid plugin
# does): the cell defines the training function and checks it against the installed release.

from cai_labs.colossal import checked_here


def colossalai_hybrid_parallel(steps: int = 10) -> None:
    """TP 2 x PP 2 x DP 2 in Colossal-AI 0.5.0: ``colossalai run --nproc_per_node 8 train.py``."""
    import colossalai
    from colossalai.booster import Booster
    from colossalai.booster.plugin import HybridParallelPlugin
    from colossalai.nn.optimizer import HybridAdam
    from transformers import GPT2Config, GPT2LMHeadModel

    colossalai.launch_from_torch()
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=64))
    plugin = HybridParallelPlugin(tp_size=2, pp_size=2, num_microbatches=2, precision="fp16")
    booster = Booster(plugin=plugin)  # the world size left over, 8 / (2 * 2), is data parallel
    optimizer = HybridAdam(model.parameters(), lr=3e-3)
    model, optimizer, *_ = booster.boost(model, optimizer)
    for _ in range(steps):
        ids = torch.randint(0, 64, (8, 32), device="cuda")
        batches = iter([{"input_ids": ids, "labels": ids}])  # split into 2 micro-batches
        booster.execute_pipeline(batches, model, lambda out, batch: out.loss, optimizer)
        optimizer.step()
        optimizer.zero_grad()


# %%
# The check against the installed release (imports, and every call bound to its signature):

print(checked_here(colossalai_hybrid_parallel))

# %%
# Colossal-AI's 2D, 2.5D and 3D tensor parallelism live in its legacy ``colossalai.legacy.nn``
# layers (``config = dict(parallel=dict(tensor=dict(mode="2.5d", size=8, depth=2)))``), also
# CUDA only. Only the CPU runs on this page were executed for this build.

# %%
# Predict, then check
# -------------------
# Answer each question before opening its answer; the answers are this build's numbers.

exercises = Exercises()
exercises.add(
    f"2D tensor parallelism with q = 2 on one block of this model ({M_TOKENS} tokens, d = {D}): "
    "do the broadcasts of weight blocks send more or fewer elements than 1D's all-reduces?",
    f"Fewer: {summa_w:,} against {one_d:,}; the activation blocks ({summa - summa_w:,}) are what "
    "make 2D's traffic larger at this width.",
)
exercises.add(
    f"A pipeline of p = {SIZED_STAGES} stages and m = {SIZED_MICRO} micro-batches: what share of "
    "the step does each stage sit idle, by the formula, and what was measured?",
    f"(p-1)/(m+p-1) = {sized_formula:.3f}; measured {sized_bubble:.3f} with one stage per core "
    f"(and {bubbles['gpipe']['bubble']:.3f} for {PP_STAGES} stages on shared cores).",
)
exercises.add(
    "How many collectives does one 3D-parallel linear layer call per forward + backward here, "
    "and what do the extra ones buy?",
    f"{calls_3d}, two more than Colossal-AI's 6: X and A are gathered again in backward instead "
    "of kept, so saved activations stay at 1/q^3.",
)
exercises
