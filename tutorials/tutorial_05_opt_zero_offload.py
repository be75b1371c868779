"""
Fine-tune OPT with ZeRO, chunk-based offload and tensor parallelism
===================================================================

Fine-tune a Hugging Face OPT model on 4 CPU ranks with ZeRO-1/2/3, FSDP2, a Gemini-style chunk
manager and 1D tensor parallelism, and measure each one's memory and traffic next to its formula.

Data parallelism (tutorial 00) keeps a full copy of everything on every rank: parameters,
gradients and optimizer state. For a model of :math:`\\Psi` parameters trained with Adam that is
about :math:`16\\Psi` bytes per rank, whatever the number of ranks, so adding GPUs never lets a
larger model fit. **ZeRO** (Zero Redundancy Optimizer) removes that redundancy in three stages,
each partitioning one more kind of model state over the :math:`N` ranks; **Gemini** (Colossal-AI's
heterogeneous memory manager) goes further and moves the states, in fixed-size chunks, between a
small fast memory (the GPU) and a large slow one (the CPU), so the states need not fit on the
device at all. **Tensor parallelism** (Megatron-LM) splits the computation of each layer
instead: every rank holds and multiplies a slice of each attention and MLP weight matrix.

**In this tutorial** you will

1. build a small Hugging Face ``OPTForCausalLM`` base checkpoint offline (``save_pretrained``),
   pre-trained on the docstrings of Python's standard library;
2. define a fine-tuning task with an exact answer (reverse a word) and measure the base model on it;
3. train on 4 ranks with data parallel, ZeRO-1, ZeRO-2, ZeRO-3 (all from ``cai_labs.zero``) and
   PyTorch's FSDP2 side by side, check that they all follow the same loss curve, and measure
   per-rank memory next to the ZeRO paper's formulas, communication and step time;
4. train under a *device budget smaller than the model's states* with a Gemini-style chunk
   manager, and measure the traffic between the two memory pools;
5. fine-tune with ZeRO-3, save the result with ``save_pretrained``, reload it with
   ``from_pretrained`` and measure exact-match accuracy before and after;
6. split OPT's attention heads and MLP over 2 and 4 ranks with 1D (Megatron) tensor
   parallelism, check it against the serial model, and measure its memory and communication.

Everything runs on CPU processes talking through ``gloo``. The "device" memory of step 4 is an
accounted, enforced byte budget on ordinary RAM, not separate hardware: the page says so where
it matters. The Colossal-AI code for GPUs is at the end, labelled as not executed here.

**Prerequisites:** tutorial 00 (data parallelism, all-reduce), Adam, and the ``input_ids`` /
``labels`` interface of a Hugging Face causal language model.
"""

# %%
# Set-up
# ------
# The constants size the run; raise them on your own machine. ``BASE_CHECKPOINT`` may name any
# OPT directory on disk (for example a local copy of ``facebook/opt-125m`` together with its
# tokenizer): the page then skips pre-training and fine-tunes that model instead (the word task
# would then need a larger ``FINETUNE_STEPS`` and more time than this page's budget).

import copy
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from transformers.utils import logging as hf_logging

# %%
# The package's pieces this page uses:
from cai_labs import Ledger, build_env, comm_totals, device, launch, report
from cai_labs.data_parallel import shard_batch
from cai_labs.exercises import Exercises
from cai_labs.offload import ChunkedAdam, ChunkedModel
from cai_labs.recipes.opt_finetune import (
    FinetuneConfig,
    PretrainConfig,
    exact_match,
    greedy_generate,
    load_checkpoint,
    pretrain_base,
    sample_words,
    task_batch,
)
from cai_labs.tensor_parallel import make_grid
from cai_labs.tensor_parallel.formulas import opt_1d_cost
from cai_labs.tensor_parallel.opt_1d import check_opt_tp_size, opt_full_state, parallelize_opt
from cai_labs.zero import DynamicLossScaler, Zero3, ZeroOptimizer, memory_by_kind, zero_wrap
from cai_labs.zero.formulas import zero_memory_formula, zero_unit_memory
from cai_labs.zero.fsdp2 import fsdp2_memory, fsdp2_wrap

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

# %%
# The sizes of the runs (raise them on a bigger machine) and the fine-tuning task:

WORLD_SIZE = 4  # ranks for every parallel run
HIDDEN, LAYERS, HEADS, FFN = 64, 2, 4, 256  # OPT sizes of the base model
PRETRAIN_STEPS = 120  # next-character steps on docstrings for the base checkpoint
GLOBAL_BATCH = 32  # words per optimizer step, summed over the ranks
LR = 3e-3  # Adam learning rate for fine-tuning
MEASURE_STEPS = 8  # steps of each memory technique in the side-by-side comparison
MIXED_STEPS = 2  # steps of each ZeRO stage in bf16 with fp32 master weights
FINETUNE_STEPS = 150  # steps of the ZeRO-3 fine-tuning run
CHUNK_ELEMENTS = 16 * 1024  # elements per chunk of the Gemini-style manager (64 KiB in fp32)
BUDGET_CHUNKS = 6  # device budget of the chunk manager, in chunks
TP_SIZES = (2, 4)  # tensor-parallel sizes; each must divide HEADS and FFN
BASE_CHECKPOINT = os.environ.get("CAI_LABS_OPT_CHECKPOINT")  # an OPT directory, or None
work_dir = tempfile.TemporaryDirectory(prefix="cai_labs_opt_")  # removed at the end of the page
WORK_DIR = Path(work_dir.name)

# Models this small run faster on one thread than on two contending for shared cores; the
# ranks launched below get one thread each anyway. (Restored at the end of the page.)
threads_before = torch.get_num_threads()
torch.set_num_threads(1)

print(build_env.describe(ranks=WORLD_SIZE))  # where this page's numbers were measured
finetune_cfg = FinetuneConfig(steps=FINETUNE_STEPS, batch_size=GLOBAL_BATCH, lr=LR)
task = finetune_cfg.task()

# %%
# A base checkpoint, made offline
# -------------------------------
# The model is ``transformers.OPTForCausalLM``, the class of Meta's OPT models, built from a
# small ``OPTConfig``. Its tokenizer is a character-level ``tokenizers`` model whose vocabulary
# is learned from the training text and wrapped as a ``PreTrainedTokenizerFast``; both are
# written with ``save_pretrained``. Pre-training is a short run of next-character prediction on
# the docstrings of the standard library (no download: the text ships with Python).

start = time.perf_counter()
if BASE_CHECKPOINT is None:
    base_dir = pretrain_base(
        WORK_DIR / "base",
        PretrainConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            ffn_dim=FFN,
            steps=PRETRAIN_STEPS,
        ),
    )
else:
    base_dir = Path(BASE_CHECKPOINT)
base_model, tokenizer = load_checkpoint(base_dir)
PSI = sum(p.numel() for p in base_model.parameters())
print(f"base checkpoint {base_dir.name}/: {sorted(p.name for p in base_dir.iterdir())}")
print(
    f"OPTForCausalLM with {PSI:,} parameters (Ψ), vocabulary {len(tokenizer)} characters, "
    f"made in {time.perf_counter() - start:.1f} s"
)

# %%
# The fine-tuning task
# --------------------
# The model must complete ``"reverse abcd =>"`` with ``" dcba."``. Answers are checked
# character for character on 64 held-out words that never appear in training: exact-match
# accuracy of greedy generation. The base model has seen English prose and code, never this task.

x_demo, y_demo = task_batch(tokenizer, task, task.test_words[:3])
prompt_len = x_demo.shape[1] - len(task.answer(task.test_words[0])) - 1
generated = greedy_generate(base_model, x_demo[:, :prompt_len], len(task.answer("abcd")))
for w, row in zip(task.test_words[:3], generated):
    print(
        f"{task.prompt(w)!r:24} expected {task.answer(w)!r:10} "
        f"base model: {tokenizer.decode(row[prompt_len:].tolist())!r}"
    )
acc_before = exact_match(base_model, tokenizer, task)
print(
    f"exact match before fine-tuning: {acc_before:.1%} of {len(task.test_words)} test words; "
    f"{len(task.train_words)} training words; sequence length {x_demo.shape[1]} characters"
)

# %%
# How much memory each technique needs: the formulas
# ---------------------------------------------------
# The ZeRO paper (Rajbhandari et al., 2020) counts *model states* per rank for mixed-precision
# Adam: fp16 parameters :math:`2\Psi`, fp16 gradients :math:`2\Psi`, and :math:`K\Psi` of optimizer
# state with :math:`K=12` (fp32 master weights, momentum, variance):
#
# .. math::
#
#    \text{DDP: } (2+2+K)\Psi \qquad
#    \text{ZeRO-1: } 2\Psi + 2\Psi + \frac{K\Psi}{N} \qquad
#    \text{ZeRO-2: } 2\Psi + \frac{(2+K)\Psi}{N} \qquad
#    \text{ZeRO-3: } \frac{(2+2+K)\Psi}{N}
#
# **On this page everything is fp32**, as CPUs train (but for the section *Mixed precision: K = 12*,
# which runs the paper's case): parameters :math:`4\Psi`, gradients :math:`4\Psi`, and Adam's two
# moments :math:`K=8` (no master copy: the parameters already are fp32). So DDP needs :math:`16\Psi`
# per rank, ZeRO-1 :math:`8\Psi + 8\Psi/N`, ZeRO-2 :math:`4\Psi + 12\Psi/N`, ZeRO-3
# :math:`16\Psi/N`. Activations and temporary buffers (a gathered layer in ZeRO-3) come on top and
# are not part of these formulas.
#
# The stages differ in what they communicate. Data parallel all-reduces gradients; an
# all-reduce is a reduce-scatter followed by an all-gather, which is exactly what ZeRO-1 and
# ZeRO-2 do (reduce-scatter the gradients, update the local shard, all-gather the parameters): the
# same :math:`2\frac{N-1}{N}\Psi` elements sent per rank. ZeRO-3 gathers each layer's parameters
# twice (forward and backward) and reduce-scatters gradients once: :math:`3\frac{N-1}{N}\Psi`.

formulas = pd.DataFrame(
    {
        name: zero_memory_formula(PSI, stage, WORLD_SIZE)
        for name, stage in [("DDP", 0), ("ZeRO-1", 1), ("ZeRO-2", 2), ("ZeRO-3", 3)]
    }
).T
print(f"fp32 Adam, Ψ = {PSI:,}, N = {WORLD_SIZE}: bytes per rank")
print(formulas.astype(int).to_string())

# %%
# The code on each rank
# ---------------------
# One worker runs every variant. Each rank loads the same checkpoint with ``from_pretrained``,
# wraps the model, and trains on its quarter of each global batch. ``cai_labs.zero.zero_wrap``
# returns a wrapped model and a sharded optimizer (a real ``torch.optim.Optimizer`` over this
# rank's flat shards); the training loop is the ordinary one. After each step the ledger takes a
# memory snapshot (before ``zero_grad``, when gradients and optimizer state are both alive).
# FSDP2 is PyTorch's own ZeRO-3 (``fully_shard`` on each decoder layer, then the root).


def ddp_comm_hook(state, bucket):
    """Average then all-reduce, through ``dist.all_reduce`` so the ledger sees DDP's traffic."""
    buffer = bucket.buffer().div_(dist.get_world_size())
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda f: f.value()[0])


def wrap_ddp(model: nn.Module) -> nn.Module:
    model = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    model.register_comm_hook(None, ddp_comm_hook)
    return model


# %%
# PyTorch's own ZeRO-1 sits next to DDP; the other data-parallel runs use plain Adam:


def zero_redundancy(model: nn.Module) -> tuple:
    """PyTorch's ZeRO-1 next to DDP."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = wrap_ddp(model)
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=LR)
    return model, opt


def adam(model: nn.Module) -> tuple:
    return model, torch.optim.Adam(model.parameters(), lr=LR)


# %%
# The chunk manager (its own section below) wraps the model and brings its own Adam; the page
# reads its statistics and its trace of chunk moves after the run:


def chunked(model: nn.Module) -> tuple:
    model = ChunkedModel(model, CHUNK_ELEMENTS, BUDGET_CHUNKS * CHUNK_ELEMENTS * 4)
    return model, ChunkedAdam(model, lr=LR)


def chunk_stats(model) -> dict:
    return {
        "chunks": model.manager.stats(),
        "trace": model.manager.trace,
        "states": model.state_bytes(),
    }


# %%
# Each technique is a few named pieces: how it wraps the model and builds the optimizer, what
# the ledger watches (ZeRO and the chunks account their own buffers), and how its memory is
# read at the end of a step.


@dataclass
class Technique:
    wrap: Callable[[nn.Module], tuple]  # model -> (wrapped model, optimizer)
    watch: Callable = lambda ledger, plain, model, opt: ledger.watch(model=plain, optimizer=opt)
    memory: Callable = lambda model, opt, ledger: memory_by_kind(ledger.snapshot("after step"))
    whole_batch: bool = False  # tensor-parallel ranks all work on the whole batch
    extras: Callable = lambda model: {}  # what else the page reads from the wrapped model


def _zero(stage: int, param_dtype: torch.dtype | None = None) -> Technique:
    return Technique(
        wrap=lambda m: zero_wrap(m, torch.optim.Adam, stage=stage, param_dtype=param_dtype, lr=LR),
        watch=lambda ledger, plain, model, opt: model.watch(ledger, opt),
        extras=lambda model: {"units": [u.numel for u in model.units]},
    )


# %%
# The registry the worker loops over: one entry per technique on this page.

TECHNIQUES = {
    "DDP": Technique(wrap=lambda m: adam(wrap_ddp(m))),
    "ZeroRedundancyOptimizer": Technique(
        wrap=zero_redundancy,
        watch=lambda ledger, plain, model, opt: ledger.watch(model=plain, optimizer=opt.optim),
    ),
    **{f"ZeRO-{k}": _zero(k) for k in (1, 2, 3)},
    **{f"ZeRO-{k} bf16": _zero(k, torch.bfloat16) for k in (1, 2, 3)},
    "FSDP2": Technique(
        wrap=lambda m: adam(fsdp2_wrap(m)), memory=lambda model, opt, _: fsdp2_memory(model, opt)
    ),
    "chunks": Technique(
        wrap=chunked, watch=lambda *_: None, memory=lambda *_: None, extras=chunk_stats
    ),
    # 1D tensor parallel over all ranks (last section of the page)
    "TP": Technique(wrap=lambda m: adam(parallelize_opt(m, make_grid("1d"))), whole_batch=True),
}

# %%
# The worker: the ordinary training loop, whatever the technique.


def train_worker(method: str, steps: int, keep_weights: bool = False) -> dict:
    rank, world, how = dist.get_rank(), dist.get_world_size(), TECHNIQUES[method]
    plain, tok = load_checkpoint(base_dir)
    plain.train()
    model, optimizer = how.wrap(plain)
    losses, times, memory = [], [], None
    with Ledger(track_activations=False) as ledger:
        how.watch(ledger, plain, model, optimizer)
        for step in range(steps):
            x, y = task_batch(tok, task, sample_words(task, GLOBAL_BATCH, step))
            if not how.whole_batch:
                x, y = shard_batch(x, y, rank=rank, world_size=world)
            start = time.perf_counter()
            loss = model(input_ids=x, labels=y).loss
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
            if step == steps - 1:  # the account at the end of a step
                memory = how.memory(model, optimizer, ledger)
            optimizer.zero_grad()
            losses.append(loss.item())
    out = summary(losses, times, memory, ledger, steps, x.numel()) | how.extras(model)
    if keep_weights:  # gather the full weights (a collective); rank 0 hands them back
        out["weights"] = model.full_state_dict()
    return out


# %%
# What comes back to the page:


def summary(losses, times, memory, ledger, steps: int, tokens: int) -> dict:
    """The full-batch loss per step (mean over ranks, outside the ledger) and the accounts."""
    world = dist.get_world_size()
    mean_losses = torch.tensor(losses, device=device())
    dist.all_reduce(mean_losses)
    return {
        "losses": (mean_losses / world).tolist(),
        "step_time": float(np.median(times[1:])),
        "memory": memory,
        "memory_all": report.from_every_rank(memory),
        "comm": comm_totals(ledger.report()),
        "wire": ledger.report()["wire"],
        "steps": steps,
        "tokens_per_rank": tokens,
    }


# %%
# Data parallel, the three ZeRO stages and FSDP2 on the same batches:

runs = {}
for method in ["DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3", "FSDP2"]:
    runs[method] = launch(train_worker, WORLD_SIZE, method, MEASURE_STEPS)
    print(
        f"{method:7} {MEASURE_STEPS} steps on {WORLD_SIZE} ranks: loss "
        f"{runs[method]['losses'][0]:.4f} -> {runs[method]['losses'][-1]:.4f}"
    )

# %%
# Check: every technique trains the same model
# --------------------------------------------
# ZeRO changes where the states live, not the arithmetic: each rank still ends every step with
# the same parameters as data parallel. The loss curves must agree step by step (to the rounding
# of different summation orders, which Adam's division by :math:`\sqrt{v}` can amplify for
# parameters whose gradient is almost zero). ``tests/test_zero.py`` checks the parameters
# themselves after 3 steps on 2 and 4 ranks.

gaps = {
    m: max(abs(a - b) for a, b in zip(r["losses"], runs["DDP"]["losses"])) for m, r in runs.items()
}
print("largest loss difference from DDP over the run:", {m: f"{g:.1e}" for m, g in gaps.items()})
for m, g in gaps.items():
    assert g < 1e-3, f"{m} does not follow data parallel's loss curve (gap {g})"

# %%
# Memory per rank, measured next to the formula
# ----------------------------------------------
# Measured bytes come from each rank-0 ledger snapshot after a step: the module's parameters and
# gradients, the optimizer's state, and the flat shards ZeRO keeps (``param_shards``,
# ``grad_shards``); FSDP2's from the local shards of its DTensors. Padding the flat buffers to a
# multiple of :math:`N` adds a few elements; Adam's step counters add a few bytes.

rows = []
for method, r in runs.items():
    stage = {"DDP": 0, "ZeRO-1": 1, "ZeRO-2": 2, "ZeRO-3": 3, "FSDP2": 3}[method]
    want = zero_memory_formula(PSI, stage, WORLD_SIZE)
    row = {"technique": method}
    for kind in ("params", "grads", "optimizer", "total"):
        row[f"{kind} measured"] = r["memory"][kind]
        row[f"{kind} formula"] = want[kind]
    row["total / DDP"] = r["memory"]["total"] / runs["DDP"]["memory"]["total"]
    rows.append(row)
    assert abs(r["memory"]["total"] - want["total"]) <= 0.05 * want["total"], method
memory_table = pd.DataFrame(rows).set_index("technique")
memory_table.style.format(
    {c: "{:.2f}" if c == "total / DDP" else "{:,.0f}" for c in memory_table.columns}
)

# %%
# The same numbers as a picture: stacked measured bytes per category, with the formula's total
# as a black tick.

fig, ax = plt.subplots(figsize=(8, 3.8))
names = list(runs)
bottom = np.zeros(len(names))
for kind, color in [("params", "C0"), ("grads", "C1"), ("optimizer", "C2")]:
    vals = np.array([runs[m]["memory"][kind] for m in names]) / 1024
    ax.bar(names, vals, bottom=bottom, color=color, label=kind)
    bottom += vals
ax.scatter(
    names,
    memory_table["total formula"] / 1024,
    marker="_",
    s=900,
    color="black",
    label="formula (fp32 Adam)",
    zorder=3,
)
ax.set(ylabel="KiB per rank", title=f"Model states per rank, Ψ = {PSI:,}, N = {WORLD_SIZE}")
ax.legend()
fig.tight_layout()

# %%
# Mixed precision: K = 12
# -----------------------
# The paper's case, run: ``zero_wrap(..., param_dtype=torch.bfloat16)`` casts the model to bf16,
# so forward, backward, the gradients and both collectives use 2-byte elements, while each rank's
# shard of the weights is an fp32 *master* that Adam updates next to its two fp32 moments
# (:math:`K = 12`). After the step the master is rounded into the bf16 parameters. Without the
# master, an update smaller than half a bf16 step of the weight (at most :math:`2^{-8}` of it)
# would be rounded away. Measured: the ledger's bytes of every tensor the wrapper and its
# optimizer hold on rank 0, per parameter; the exact formula adds the flat buffers' padding and
# Adam's one 4-byte step count per unit to the paper's.

mixed_rows = []
for stage in (1, 2, 3):  # the paper's bytes: 2 + 2 + 12/N, 2 + 14/N, 16/N per parameter
    paper = zero_memory_formula(PSI, stage, WORLD_SIZE, 2, 2, 12)["total"] / PSI
    r = launch(train_worker, WORLD_SIZE, f"ZeRO-{stage} bf16", MIXED_STEPS)
    exact = zero_unit_memory(r["units"], stage, WORLD_SIZE, 2, 2, 12, counter_bytes=4)
    assert r["memory"] == exact, (stage, r["memory"], exact)
    assert abs(r["memory"]["total"] / PSI - paper) < 0.01 * paper  # padding and counters
    mixed_rows.append(
        {
            "stage": f"ZeRO-{stage}",
            "measured bytes / param": r["memory"]["total"] / PSI,
            "paper bytes / param": paper,
            "measured bytes": r["memory"]["total"],
            "exact formula bytes": exact["total"],
            "padding + step counters bytes": r["memory"]["total"] - paper * PSI,
        }
    )
per_param = {c: "{:.4f}" for c in ("measured bytes / param", "paper bytes / param")}
report.table(mixed_rows, "stage", per_param, f"bf16 + fp32 masters, Ψ = {PSI:,}, N = {WORLD_SIZE}")

# %%
# fp16 has only 5 exponent bits, so its gradients are computed on the loss times a scale and
# divided by it again in fp32; a scale too large overflows. Every rank checks only its own
# gradient shard, so the overflow flag is all-reduced and all ranks skip the step together:


def overflow_worker(init_scale: float) -> dict:
    plain, tok = load_checkpoint(base_dir)
    model, opt = zero_wrap(plain.train(), torch.optim.Adam, 2, param_dtype=torch.float16, lr=LR)
    scaler = DynamicLossScaler(init_scale=init_scale)
    x, y = task_batch(tok, task, sample_words(task, GLOBAL_BATCH, 0))
    x, y = shard_batch(x, y, rank=dist.get_rank(), world_size=dist.get_world_size())
    before = [s.detach().clone() for s in model.shards]
    scaler.scale(model(input_ids=x, labels=y).loss).backward()
    stepped = scaler.step(opt)
    same = all(torch.equal(a, b) for a, b in zip(before, model.shards))
    return {"stepped": report.from_every_rank(stepped), "same": same, "scale": scaler.scale_value}


big = 2.0**24
ov = launch(overflow_worker, WORLD_SIZE, big)
assert not any(ov["stepped"]) and ov["same"] and ov["scale"] == big / 2
print(
    f"loss scale {big:.0f}: the gradients overflow fp16 (largest finite value "
    f"{torch.finfo(torch.float16).max:.0f}), so {ov['stepped'].count(False)} of {WORLD_SIZE} "
    f"ranks skip the step, the weights stay as they were, and the scale drops to {ov['scale']:.0f}"
)

# %%
# Why flat buffers: PyTorch's ``ZeroRedundancyOptimizer``
# -------------------------------------------------------
# PyTorch ships a ZeRO-1 of its own, ``torch.distributed.optim.ZeroRedundancyOptimizer``, used
# next to DDP. It gives each rank whole parameter *tensors* (greedily, largest first), so the
# shares are only as even as the tensor sizes allow; ``cai_labs.zero`` partitions a flat buffer
# and every rank gets exactly :math:`1/N` (to a few padding elements). The optimizer state each
# rank holds, measured on all four ranks:

zro = launch(train_worker, WORLD_SIZE, "ZeroRedundancyOptimizer", MEASURE_STEPS)
gap_zro = max(abs(a - b) for a, b in zip(zro["losses"], runs["DDP"]["losses"]))
assert gap_zro < 1e-3, f"ZeroRedundancyOptimizer does not follow DDP (gap {gap_zro})"
even = zero_memory_formula(PSI, 1, WORLD_SIZE)["optimizer"]
balance = pd.DataFrame(
    {
        "cai_labs ZeRO-1 (flat buffer)": [m["optimizer"] for m in runs["ZeRO-1"]["memory_all"]],
        "PyTorch ZeroRedundancyOptimizer": [m["optimizer"] for m in zro["memory_all"]],
        "formula KΨ/N": [even] * WORLD_SIZE,
    },
    index=pd.Index(range(WORLD_SIZE), name="rank"),
).astype(float)  # the ratio row below is fractional
balance.loc["largest / formula"] = balance.max() / even
balance.style.format("{:,.0f}").format("{:.2f}", subset=pd.IndexSlice["largest / formula", :])

# %%
# The most loaded rank sets the memory every rank must have (last row: its share over the even
# one). This model's tensors are many and of similar sizes, so whole-tensor partitioning comes
# out nearly even; with one tensor much larger than the rest (a 50,000-token embedding next to
# small layers) it cannot. Equal slices of a flat buffer are even whatever the shapes, which is
# also what lets ZeRO-2 and 3 reduce-scatter and all-gather one buffer per layer.
#
# Communication and step time
# ---------------------------
# Elements sent per rank per step: modeled (the ring algorithms' traffic for each recorded
# collective; FSDP2 calls the same ``torch.distributed`` collectives from Python, so the ledger
# records it too), next to the formulas above; measured on the wire (rank 0's socket counters,
# gloo's 48-byte message headers included); and the median step time on this machine. gloo has
# no reduce-scatter of its own: PyTorch's gloo backend all-reduces the whole buffer and keeps its
# chunk, so on gloo every reduce-scatter sends :math:`2\frac{N-1}{N}` of its buffer, twice the
# ring's (``tests/test_wire.py`` measures it); NCCL's ring reduce-scatter sends the formula's.

comm_rows = []
for method, r in runs.items():
    sent = sum(v["modeled_sent_bytes"] for v in r["comm"].values()) / r["steps"] / 4
    wire = r["wire"]["sent"] / r["steps"] / 4 if r["wire"]["measured"] else np.nan
    factor = {"DDP": 2, "ZeRO-1": 2, "ZeRO-2": 2, "ZeRO-3": 3, "FSDP2": 3}[method]
    comm_rows.append(
        {
            "technique": method,
            "collectives": ", ".join(sorted(r["comm"])),
            "modeled elements/rank/step": sent,
            "formula": factor * (WORLD_SIZE - 1) / WORLD_SIZE * PSI,
            "measured on the wire": wire,
            "median step (ms)": 1e3 * r["step_time"],
        }
    )
comm_table = pd.DataFrame(comm_rows).set_index("technique")
comm_table.style.format(
    {
        "modeled elements/rank/step": "{:,.0f}",
        "formula": "{:,.0f}",
        "measured on the wire": "{:,.0f}",
        "median step (ms)": "{:.1f}",
    },
    na_rep="not measured",
)

# %%
# ZeRO-3 and FSDP2 send a little less than :math:`3\frac{N-1}{N}\Psi`: the root unit
# (embeddings, final norm and the tied output layer) stays gathered from the end of forward into
# backward, so it is gathered once per step, not twice. On a machine with 2 cores
# shared by 4 ranks step times mostly show the cost of extra Python work and messages, not of
# bandwidth: on GPUs with a fast interconnect ZeRO-1/2 cost the same time as DDP, and ZeRO-3
# about 1.5 times its communication, mostly hidden behind compute by prefetching the next layer.
# (``cai_labs.zero`` stages 2 and 3 start each layer's reduce-scatter asynchronously during
# backward, ``overlap_comm=True``; on CPU ``gloo`` sums on the same few cores that compute, so
# little can be hidden here.)
#
# ZeRO-3 with and without prefetch
# --------------------------------
# A ZeRO-3 unit must be all-gathered before its hook lets it compute. Gathered synchronously,
# every layer waits for its own all-gather. ``Zero3(prefetch=True)`` (the default, as in FSDP)
# records in the first step the order in which the units are gathered, forward and backward;
# from then on, when layer :math:`k` is gathered, the all-gather of the next layer in that order
# is *started* (``async_op=True``) and runs while layer :math:`k` computes; layer
# :math:`k+1`'s hook only waits for it. Same all-gathers, same bytes, same results to the bit;
# the price is memory: up to ``depth + 1`` units gathered at once besides the root (here depth
# 1, two layers), instead of one. Below: the median step time of ``MEASURE_STEPS`` steps with
# prefetch off and on (in one launch, alternating), and the largest gathered bytes the hooks saw.


def gathered(model: Zero3, times: list, losses: list) -> dict:
    """One ZeRO-3 run's median step, losses, and the gathered bytes its hooks saw."""
    return {
        "step_time": float(np.median(times[1:])),
        "losses": losses,
        "peak": model.gathered_peak_bytes,
        "bound": model.gathered_bound_bytes(),
        "unit": max(u.gathered_bytes for u in model.units if u is not model.root),
        "allocated": model.gathered_storage_peak_bytes,  # measured from the storages
    }


# %%
# Both runs in one launch, their steps alternating on the same batches:


def prefetch_worker(steps: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    runs_pf = {}
    for prefetch in (False, True):
        model, tok = load_checkpoint(base_dir)
        model = Zero3(model.train(), prefetch=prefetch)
        runs_pf[prefetch] = (model, ZeroOptimizer(model, torch.optim.Adam, lr=LR), [], [])
    for step in range(steps):
        x, y = task_batch(tok, task, sample_words(task, GLOBAL_BATCH, step))
        x, y = shard_batch(x, y, rank=rank, world_size=world)
        for model, optimizer, times, losses in runs_pf.values():
            start = time.perf_counter()
            loss = model(input_ids=x, labels=y).loss
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
            optimizer.zero_grad()
            losses.append(loss.item())
    return {pf: gathered(m, t, losses) for pf, (m, _, t, losses) in runs_pf.items()}


# %%
# Same losses to the bit and gathered peaks within the bound (asserted):

pf = launch(prefetch_worker, WORLD_SIZE, MEASURE_STEPS)
assert pf[True]["losses"] == pf[False]["losses"], "prefetch changed the arithmetic"
for r in pf.values():
    assert r["peak"] <= r["bound"], "more units gathered than the prefetch bound allows"
    assert r["allocated"] <= r["bound"], "more storage allocated than the prefetch bound allows"
print(
    f"step time with prefetch / without: {pf[True]['step_time'] / pf[False]['step_time']:.2f}; "
    f"largest layer unit {pf[True]['unit']:,} B gathered; allocated at most "
    f"{pf[True]['allocated']:,} B with prefetch. With {LAYERS} layer units, gathering all of "
    f"them ({LAYERS * pf[True]['unit']:,} B) "
    f"{'would exceed' if LAYERS * pf[True]['unit'] > pf[True]['bound'] else 'stays within'} "
    "the bound here"
)
report.table(
    [
        {
            "ZeRO-3": "prefetch on (depth 1)" if on else "prefetch off (depth 0)",
            "median step (ms)": 1e3 * pf[on]["step_time"],
            "gathered peak (B, rank 0)": pf[on]["peak"],
            "bound (B)": pf[on]["bound"],
        }
        for on in (False, True)
    ],
    index="ZeRO-3",
)

# %%
# The losses of the two runs are equal to the last bit (checked above), and the gathered peak
# is one layer without prefetch and two with it, at the bound :math:`(\text{depth}+1)` times the
# largest layer unit. The step times are printed, not asserted: here 4 ranks share 2 CPU cores
# and ``gloo`` moves the bytes with the same cores that compute, so an all-gather running "in
# the background" mostly competes with the layer it should hide behind, and the ratio is close
# to 1 or noise. Prefetch pays where communication has its own engine: NCCL on GPUs with
# NVLink or InfiniBand, where a layer's all-gather can be hidden almost entirely.
#
# Beyond the budget: a Gemini-style chunk manager
# ------------------------------------------------
# ZeRO-3 divides the states by :math:`N`, but they must still fit on the devices. Colossal-AI's
# Gemini stores parameters, gradients and optimizer states in fixed-size **chunks** and keeps
# only some of them in device memory; the rest wait in (much larger) host memory and are moved
# in when needed. ``cai_labs.offload`` does the same with:
#
# * a **device pool with a hard byte budget** (on this CPU machine: an accounted, enforced
#   limit on ordinary RAM; on a GPU it would be GPU memory) and an unlimited host pool;
# * **fetch on demand** with pinning: hooks fetch a module's parameter chunks before its forward
#   and again before its backward, and the gradient chunk when a gradient is ready;
# * **prefetch** of the next modules' chunks, in the order recorded in the first step;
# * **LRU eviction**: when the device is full, the least recently used unpinned chunk leaves,
#   copied back to host only if it changed;
# * data parallel with **chunk owners**: the gradient chunk is reduced to its owner rank, which
#   alone holds that chunk's Adam moments, updates the parameters and broadcasts them.
#
# The budget below is smaller than the states one rank holds, so training is only possible
# because chunks move.

runs["chunks"] = launch(train_worker, WORLD_SIZE, "chunks", MEASURE_STEPS)
chunk_run = runs["chunks"]
stats = chunk_run["chunks"]
states_total = sum(chunk_run["states"].values())
gap = max(abs(a - b) for a, b in zip(chunk_run["losses"], runs["DDP"]["losses"]))
print(
    f"chunked training: loss {chunk_run['losses'][0]:.4f} -> {chunk_run['losses'][-1]:.4f}, "
    f"largest difference from DDP {gap:.1e}"
)
assert gap < 1e-3, "chunked training does not follow data parallel"
assert stats["device_peak"] <= stats["device_budget"] < states_total
# The pool's peak is its own account; the storage the chunks really allocated is measured apart.
assert stats["device_storage_peak"] <= stats["device_budget"], "device storage over budget"

# %%
# Rank 0's states, the device budget and peaks, and the traffic between host and device:

traffic = pd.DataFrame(
    [
        ("model states on rank 0 (params, grads, own Adam moments)", states_total),
        ("device budget", stats["device_budget"]),
        ("device peak (the pool's account)", stats["device_peak"]),
        ("device peak (measured: allocated storage)", stats["device_storage_peak"]),
        ("host -> device, on demand, per step", stats["h2d_demand"] / MEASURE_STEPS),
        ("host -> device, prefetched, per step", stats["h2d_prefetch"] / MEASURE_STEPS),
        ("device -> host (dirty evictions), per step", stats["d2h"] / MEASURE_STEPS),
        ("evictions per step", stats["evict"] / MEASURE_STEPS),
        ("prefetched chunks later used", stats["prefetch_hits"]),
    ],
    columns=["rank 0", "bytes or count"],
).set_index("rank 0")
traffic.style.format("{:,.0f}")

# %%
# What the device pool held over the last two steps, after every fetch, prefetch and eviction on
# rank 0, by kind of chunk. Forward holds parameter chunks; backward adds gradient chunks; the
# optimizer step brings in this rank's Adam moments next to a parameter and a gradient chunk. The
# pool never passes the budget (red) and is always far below the states it trains (the sum of all
# chunks is given in the title).

trace = chunk_run["trace"]
moves_per_step = len(trace) // MEASURE_STEPS
last = trace[-2 * moves_per_step :]
kinds = ["param", "grad", "exp_avg", "exp_avg_sq"]
fig, ax = plt.subplots(figsize=(8, 3.2))
ax.stackplot(
    range(len(last)),
    *[[e.get(k, 0) / 1024 for e in last] for k in kinds],
    labels=kinds,
    step="post",
)
ax.axhline(stats["device_budget"] / 1024, color="red", ls="--", label="budget")
ax.set(
    xlabel="chunk move (fetch, prefetch or eviction), last two steps",
    ylabel="KiB resident",
    title=f"Device pool on rank 0: budget {stats['device_budget'] // 1024} KiB, "
    f"model states {states_total // 1024} KiB",
)
ax.legend(loc="lower right", fontsize=8, ncol=5)
fig.tight_layout()

# %%
# Fine-tune with ZeRO-3, save, reload, measure
# --------------------------------------------
# The real run: ``FINETUNE_STEPS`` steps of ZeRO-3 on 4 ranks. At the end the ranks all-gather
# the full weights (``full_state_dict``) and rank 0 hands them back; the page writes them with
# ``save_pretrained`` (under torchrun every process gets rank 0's weights and writes its own
# copy): the checkpoint is an ordinary Hugging Face directory that the serving tutorial loads,
# and that ``from_pretrained`` reads back here for the final measurement.

finetuned_dir = WORK_DIR / "finetuned"
start = time.perf_counter()
final = launch(train_worker, WORLD_SIZE, "ZeRO-3", FINETUNE_STEPS, True)
tuned, tuned_tok = load_checkpoint(base_dir)  # the architecture; the weights come next
tuned.load_state_dict(final.pop("weights"))
tuned.save_pretrained(finetuned_dir)
tuned_tok.save_pretrained(finetuned_dir)
print(
    f"ZeRO-3 fine-tuning: {FINETUNE_STEPS} steps in {time.perf_counter() - start:.1f} s, "
    f"loss {final['losses'][0]:.3f} -> {final['losses'][-1]:.4f}"
)
tuned_model, tuned_tok = load_checkpoint(finetuned_dir)
acc_after = exact_match(tuned_model, tuned_tok, task)
generated = greedy_generate(tuned_model, x_demo[:, :prompt_len], len(task.answer("abcd")))
for w, row in zip(task.test_words[:3], generated):
    print(f"{task.prompt(w)!r:24} -> {tuned_tok.decode(row[prompt_len:].tolist())!r}")
pd.DataFrame(
    {"exact match on held-out words": [acc_before, acc_after]},
    index=["base checkpoint", f"after {FINETUNE_STEPS} ZeRO-3 steps"],
).style.format("{:.1%}")

# %%
assert acc_after > acc_before + 0.5, "fine-tuning did not learn the task"
fig, ax = plt.subplots(figsize=(8, 3))
ax.plot(final["losses"])
ax.set(
    xlabel="step",
    ylabel="training loss (answer characters)",
    yscale="log",
    title="Fine-tuning OPT with ZeRO-3 on 4 CPU ranks",
)
fig.tight_layout()

# %%
# Tensor parallelism on OPT's attention and MLP
# ---------------------------------------------
# ZeRO and the chunk manager partition *states* but every rank still runs the whole model on
# its part of the batch: a layer's full weights are gathered (ZeRO-3) or brought in (chunks)
# before it computes. **Tensor parallelism** (Megatron-LM, Shoeybi et al., 2019) splits the
# *computation* of each layer instead. In every ``OPTDecoderLayer``:
#
# * ``q_proj``, ``k_proj`` and ``v_proj`` become **column-parallel** linears: rank :math:`r` keeps
#   the output columns of its ``num_heads/N`` heads, weight :math:`(d/N, d)`. A head's attention
#   needs only that head's queries, keys and values, so each rank runs attention on its own
#   heads with no communication;
# * ``out_proj`` becomes **row-parallel**: its weight rows :math:`(d, d/N)` multiply the local
#   heads' output, and an **all-reduce** sums the partial products into the whole
#   :math:`(b, s, d)` result;
# * the MLP is the same pair: ``fc1`` column-parallel (the activation is elementwise, so it runs
#   on the local columns), ``fc2`` row-parallel with an all-reduce;
# * token and position embeddings, the layer norms and the tied ``lm_head`` stay **replicated**
#   (a full copy on every rank).
#
# In backward, the conjugate collectives run: the gradient of the attention input (``q``, ``k``
# and ``v`` read the same hidden states, so their partial gradients are summed locally and
# all-reduced once) and of ``fc1``'s input is all-reduced. That makes four all-reduces of the
# :math:`(b, s, d)` hidden states per layer and step, whatever :math:`N`; in exchange every rank
# holds :math:`1/N` of each layer's matrices. All ranks of a tensor-parallel group see the *same*
# batch (here: the whole global batch), unlike data parallelism.
#
# ``cai_labs.tensor_parallel.opt_1d.parallelize_opt(model, grid)`` does these replacements in
# place on the Hugging Face model, reusing the column- and row-parallel layers of
# ``cai_labs.tensor_parallel.layers_1d``; a size that does not split the heads or ``ffn_dim`` is
# refused before any rank is launched:

for n in TP_SIZES:
    check_opt_tp_size(base_model.config, n)
try:
    check_opt_tp_size(base_model.config, 3)
except ValueError as err:
    print("tensor-parallel size 3:", err)

# %%
# First the check that it is the same model. Each rank loads the base checkpoint, keeps a serial
# copy, splits the other, and runs both on the same batch; the split layers' weight gradients are
# all-gathered back to full shape and compared with the serial gradients of *every* parameter
# (fp32, so differences are rounding of different summation orders).


def tp_check_worker() -> dict:
    serial, tok = load_checkpoint(base_dir)
    serial.train()
    par = parallelize_opt(copy.deepcopy(serial), make_grid("1d"))
    x, y = task_batch(tok, task, sample_words(task, GLOBAL_BATCH, 0))
    out_s = serial(input_ids=x, labels=y)
    out_s.loss.backward()
    out_p = par(input_ids=x, labels=y)
    out_p.loss.backward()
    ref = {n: p.grad for n, p in serial.named_parameters()}
    full = opt_full_state(par, grads=True)  # collective: gathers the shards on every rank
    return {
        "logits": (out_s.logits - out_p.logits).abs().max().item(),
        "loss": abs(out_s.loss.item() - out_p.loss.item()),
        "grads": max((full[n] - g).abs().max().item() for n, g in ref.items()),
        "grad_scale": max(g.abs().max().item() for g in ref.values()),
        "compared": len(ref),
    }


# %%
# On 2 and 4 ranks, against the serial model:

tp_checks = {n: launch(tp_check_worker, n) for n in TP_SIZES}
for n, c in tp_checks.items():
    print(
        f"N={n}: largest |logits diff| {c['logits']:.1e}, |loss diff| {c['loss']:.1e}, "
        f"largest |grad diff| over {c['compared']} parameters {c['grads']:.1e} "
        f"(largest gradient {c['grad_scale']:.2f})"
    )
    assert c["logits"] < 1e-4 and c["loss"] < 1e-5, f"TP on {n} ranks differs from serial"
    assert c["grads"] < 1e-5 * max(1.0, c["grad_scale"]), f"TP gradients on {n} ranks differ"

# %%
# Then the same ``train_worker`` as above, with ``method="TP"``: Adam on each rank's shards and
# replicated parameters, every rank on the whole batch of ``GLOBAL_BATCH`` words, for
# ``MEASURE_STEPS`` steps. Replicated parameters get the same full gradient on every rank (the
# backward all-reduces made the hidden states' gradient whole), so they stay identical without
# any communication of their own.

tp_runs = {n: launch(train_worker, n, "TP", MEASURE_STEPS) for n in TP_SIZES}
config = base_model.config
ddp = runs["DDP"]
tp_rows = [
    {
        "run": f"DDP, N={WORLD_SIZE}",
        "params/rank measured": ddp["memory"]["params"],
        "params/rank formula": 4 * PSI,
        "states/rank (params+grads+Adam)": ddp["memory"]["total"],
        "all-reduce bytes/step measured": ddp["comm"]["all_reduce"]["bytes"] / ddp["steps"],
        "all-reduce bytes/step formula": 4 * PSI,
        "all-reduces/step": ddp["comm"]["all_reduce"]["calls"] / ddp["steps"],
        "median step (ms)": 1e3 * ddp["step_time"],
        "largest loss gap vs DDP": 0.0,
    }
]

# %%
# One row per tensor-parallel size, next to its formulas (the page fails on a difference):

for n, r in tp_runs.items():
    cost = opt_1d_cost(config, n, r["tokens_per_rank"])
    measured_comm = r["comm"]["all_reduce"]["bytes"] / r["steps"]
    assert r["memory"]["params"] == cost.param_bytes, (n, r["memory"]["params"], cost)
    assert measured_comm == cost.comm_bytes, (n, measured_comm, cost)
    tp_gap = max(abs(a - b) for a, b in zip(r["losses"], ddp["losses"]))
    assert tp_gap < 1e-3, f"TP on {n} ranks does not follow data parallel's loss (gap {tp_gap})"
    tp_rows.append(
        {
            "run": f"TP, N={n}",
            "params/rank measured": r["memory"]["params"],
            "params/rank formula": cost.param_bytes,
            "states/rank (params+grads+Adam)": r["memory"]["total"],
            "all-reduce bytes/step measured": measured_comm,
            "all-reduce bytes/step formula": cost.comm_bytes,
            "all-reduces/step": r["comm"]["all_reduce"]["calls"] / r["steps"],
            "median step (ms)": 1e3 * r["step_time"],
            "largest loss gap vs DDP": tp_gap,
        }
    )

# %%
# The parameters that stay whole on every rank:

tp_table = pd.DataFrame(tp_rows).set_index("run")
serial_param_bytes = opt_1d_cost(config, 1, 0).param_bytes
replicated = 2 * opt_1d_cost(config, 2, 0).param_bytes - serial_param_bytes  # R = 2 p(2) - p(1)
print(
    f"replicated parameters (embeddings, layer norms, out_proj/fc2 biases): {replicated:,} of "
    f"{serial_param_bytes:,} bytes ({replicated / serial_param_bytes:.0%}); they do not "
    "shrink with N"
)
tp_table.style.format(
    {c: "{:,.0f}" for c in tp_table.columns}
    | {"median step (ms)": "{:.1f}", "largest loss gap vs DDP": "{:.1e}"}
)

# %%
# The formulas (``cai_labs.tensor_parallel.formulas.opt_1d_cost``): per rank, parameters
# :math:`V d + (P+2) d + 2d + L\,(4d + 2d) + L\,(4d^2 + 2df + 3d + f)/N` elements, the last term
# being the split matrices and their split biases (``out_proj`` and ``fc2`` keep whole biases,
# added once after the all-reduce); communication :math:`4 L \cdot b s \cdot d` elements per
# step in :math:`4L` all-reduces. Data parallel all-reduces the *gradients*, :math:`\Psi`
# elements, however large the batch; tensor parallelism all-reduces *activations*, independent
# of the model's size but proportional to the tokens of the batch, and it does so four times per
# layer, in the middle of forward and backward, where it cannot be hidden behind other work.
# That is why Megatron keeps tensor parallelism inside a node, on its fastest links, and uses
# data (or ZeRO) parallelism across nodes. The replicated parameters (printed above the table)
# do not shrink with :math:`N`, so the parameters per rank fall a little slower than
# :math:`1/N`. The step times say little about GPUs: 4 ranks on 2 shared cores wait for each
# other at each of the :math:`4L` all-reduces of a step.
#
# The loss curves of the three runs: tensor parallelism trains the same model as data
# parallelism, step for step.

fig, ax = plt.subplots(figsize=(8, 3))
ax.plot(ddp["losses"], "k-", lw=3, alpha=0.3, label=f"DDP, N={WORLD_SIZE}")
for n, r in tp_runs.items():
    ax.plot(r["losses"], marker="o", ms=3, label=f"tensor parallel, N={n}")
ax.set(xlabel="step", ylabel="training loss", title="Fine-tuning OPT: DDP vs 1D tensor parallel")
ax.legend()
fig.tight_layout()

# %%
# Clean up: the checkpoints written to the temporary directory are deleted (the serving
# tutorial makes its own), and the thread count is restored.

work_dir.cleanup()
torch.set_num_threads(threads_before)

# %%
# At real scale
# -------------
# The ZeRO formula the ledger matched above (:func:`cai_labs.zero.formulas.zero_memory_formula`,
# here in mixed precision: ``2 + 2 + 12`` bytes per parameter) decides which OPT sizes one node
# of 8 A100 80 GB can train: memory per GPU (model states + activations of one 2,048-token
# sequence with selective recomputation), under data parallelism, ZeRO-1/2/3 and ZeRO-2 with the
# optimizer state offloaded to host memory. **Modeled**; GB per GPU, ``*`` where it fits.

from cai_labs.scale import GPUS, ScaleLayout, predict

setups = {
    "DDP": (0, False),
    "ZeRO-1": (1, False),
    "ZeRO-2": (2, False),
    "ZeRO-3": (3, False),
    "ZeRO-2 + offload": (2, True),
}
fit_rows = {}
for size in ("opt-1.3b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b"):
    row = {}
    for name, (stage, offload) in setups.items():
        layout = ScaleLayout(
            dp=8, zero=stage, offload=offload, global_batch=8, recompute="selective"
        )
        p = predict(size, "a100-80gb", layout)
        row[name] = f"{p.memory_per_gpu_bytes['total'] / 1e9:,.1f}" + (" *" if p.fits else "")
    fit_rows[size] = row
fit_table = pd.DataFrame(fit_rows).T
print(f"HBM per GPU: {GPUS['a100-80gb'].hbm_bytes / 1e9:.0f} GB")
fit_table

# %%
# Running it on GPUs: Colossal-AI
# -------------------------------
# The same worker runs under ``torchrun --nproc-per-node=4 tutorial_05_opt_zero_offload.py`` on a
# GPU node (``launch`` then runs it in place with NCCL). In Colossal-AI, ZeRO-1/2 is the
# ``LowLevelZeroPlugin`` and ZeRO-3 with chunk-based offload is the ``GeminiPlugin``; tensor
# parallelism (Hugging Face models such as OPT sharded by its built-in policies: the same
# column/row split of attention and MLP as above) is the ``HybridParallelPlugin``. They need
# CUDA: **checked against colossalai 0.5.0, needs CUDA**. The two cells below define the
# fine-tuning code and check it against the installed release; ``colossalai run
# --nproc_per_node 4 train.py`` runs it. First the plugin, one per technique of this page:

from cai_labs.colossal import checked_here


def colossalai_plugin(name: str):
    """Colossal-AI's plugin for ZeRO-2, Gemini (ZeRO-3 + offload) or TP=2 x ZeRO-1."""
    from colossalai.booster.plugin import GeminiPlugin, HybridParallelPlugin, LowLevelZeroPlugin

    plugins = {
        "zero2": lambda: LowLevelZeroPlugin(stage=2, precision="bf16"),
        "gemini": lambda: GeminiPlugin(placement_policy="static", offload_optim_frac=1.0),
        "tp2": lambda: HybridParallelPlugin(tp_size=2, pp_size=1, zero_stage=1),
    }
    return plugins[name]()


# %%
# Then the fine-tuning loop, the same whatever the plugin: ``booster.boost`` wraps model and
# optimizer, ``booster.backward`` replaces ``loss.backward()``.


def colossalai_finetune(model_dir: str, plugin_name: str = "gemini", steps: int = 10) -> None:
    """Fine-tune OPT on the GPUs of ``colossalai run`` with the plugin ``plugin_name``."""
    import colossalai
    from colossalai.booster import Booster
    from colossalai.nn.optimizer import HybridAdam
    from transformers import OPTForCausalLM

    colossalai.launch_from_torch()
    model = OPTForCausalLM.from_pretrained(model_dir)  # e.g. the directory made on this page
    vocab = model.config.vocab_size
    booster = Booster(plugin=colossalai_plugin(plugin_name))
    optimizer = HybridAdam(model.parameters(), lr=3e-5)  # CPU+GPU Adam, for offload
    model, optimizer, *_ = booster.boost(model, optimizer)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (8, 64), device="cuda")
        booster.backward(model(input_ids=ids, labels=ids).loss, optimizer)
        optimizer.step()
        optimizer.zero_grad()
    booster.save_model(model, "opt-finetuned", shard=True)


print(checked_here(colossalai_plugin))
print(checked_here(colossalai_finetune))

# %%
# PyTorch's own equivalents, run above on CPU, are FSDP2 ``fully_shard`` (ZeRO-3) and
# ``ZeroRedundancyOptimizer`` (ZeRO-1); FSDP2's ``CPUOffloadPolicy`` (whole-model offload)
# needs CUDA.
#
# On 8 GPUs this is 2-way tensor parallel inside each pair of GPUs and 4-way data parallel
# (with ZeRO-1) across the pairs.

# %%
# Predict, then check
# -------------------
# Answer each question before opening its answer; the answers are this build's numbers.

exercises = Exercises()
z2 = memory_table.loc["ZeRO-2"]
exercises.add(
    f"fp32 Adam, Ψ = {PSI:,} parameters, N = {WORLD_SIZE} ranks: how many bytes of model states "
    "does one rank hold under ZeRO-2, as a fraction of DDP's?",
    f"4Ψ + 12Ψ/N = {z2['total formula']:,.0f} B by the formula; rank 0 measured "
    f"{z2['total measured']:,.0f} B, {z2['total / DDP']:.2f} of DDP's "
    f"{memory_table.loc['DDP', 'total measured']:,.0f} B.",
)
z3, dp = (comm_table.loc[m, "modeled elements/rank/step"] for m in ("ZeRO-3", "DDP"))
exercises.add(
    "ZeRO-3 all-gathers each layer's parameters in forward and again in backward. How many "
    "elements does one rank send per step, compared with DDP?",
    f"The formula says 3(N-1)/N·Ψ = {comm_table.loc['ZeRO-3', 'formula']:,.0f}, 1.5x DDP's "
    f"{comm_table.loc['DDP', 'formula']:,.0f}; the ledger counted {z3:,.0f} ({z3 / dp:.2f}x "
    f"DDP's {dp:,.0f})"
    + (
        ": less than the formula, because the root unit is gathered once per step, not twice."
        if z3 < comm_table.loc["ZeRO-3", "formula"]
        else "."
    ),
)
tp_lo, tp_hi = (tp_table.loc[f"TP, N={n}"] for n in TP_SIZES)  # for the next two

# %%
# Two more, on tensor parallelism and the chunk manager:

exercises.add(
    f"1D tensor parallelism of this {LAYERS}-layer OPT: how many all-reduces per step, and do "
    f"their bytes shrink from N = {TP_SIZES[0]} to N = {TP_SIZES[-1]}?",
    f"{tp_hi['all-reduces/step']:.0f} per step ({tp_hi['all-reduces/step'] / LAYERS:g} per "
    f"layer, L = {LAYERS}; the formula's 4L = {4 * LAYERS}); "
    f"{tp_lo['all-reduce bytes/step measured']:,.0f} B at N = {TP_SIZES[0]} and "
    f"{tp_hi['all-reduce bytes/step measured']:,.0f} B at N = {TP_SIZES[-1]}"
    + (
        ": the same, since they are activations of the batch, not weights."
        if tp_lo["all-reduce bytes/step measured"] == tp_hi["all-reduce bytes/step measured"]
        else "."
    ),
)
exercises.add(
    f"The chunk manager's device budget is {stats['device_budget']:,} B. Can rank 0's "
    f"{states_total:,} B of states train without evicting chunks?",
    f"No: the states are {states_total / stats['device_budget']:.1f}x the budget; rank 0 evicted "
    f"{stats['evict'] / MEASURE_STEPS:.0f} chunks per step and wrote "
    f"{stats['d2h'] / MEASURE_STEPS:,.0f} B per step back to the host.",
)
exercises
