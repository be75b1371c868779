"""
Context parallelism: ring attention with an online softmax for causal models
============================================================================

Ring attention with an online softmax fits longer causal sequences than the seed's ring
self-attention in the same memory, by never building a rank's score matrix.

Tutorial 02's ring self-attention keeps, on each of :math:`N` ranks, the probabilities of its
:math:`C = L/N` queries against all :math:`L` keys, ``[B, H, C, L]``: memory per rank still grows
as :math:`L^2 / N`. Long-context training (Megatron-Core's and torchtitan's context parallelism)
instead folds each arriving key block into a running maximum and a running sum, the recurrence of
flash attention, and keeps only :math:`O(C)` numbers per query. A causal mask makes the work
uneven along the sequence; cutting it into :math:`2N` pieces laid out zig-zag evens it out.

**In this tutorial** you will

1. compute softmax attention block by block on one process, with a running max and sum, and
   check it against PyTorch's ``scaled_dot_product_attention``;
2. count the causal work of each rank with contiguous chunks and with the zig-zag layout;
3. run the online-softmax ring on 2 and 4 ranks and check outputs and gradients against serial
   causal attention in float64, then train a small causal GPT with it and get the serial loss;
4. measure the bytes each rank saves for backward, seed ring against online ring, and the
   longest sequence each fits under one memory budget;
5. measure the bytes each rank sends per ring pass next to the formula;
6. see what the same formulas say for Llama-3 8B on H100 GPUs.

**Prerequisites:** tutorial 02 (sequence parallelism: the seed's ring self-attention).

All ranks are CPU processes of the machine that built this page, talking through ``gloo``.
"""

# %%
# Set-up
# ------
# Sizes are small so that the page runs in well under a minute on two CPU cores; raise them on
# your own machine. Equality checks run in ``float64``; the memory experiment in ``float32``,
# the dtype (with bf16) that real runs use. ``MEMORY_BUDGET_KIB`` is the per-rank budget of the
# "longest sequence" experiment.

from unittest import mock

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.functional import scaled_dot_product_attention

from cai_labs import Ledger, build_env, comm_totals, device, launch
from cai_labs.exercises import Exercises
from cai_labs.report import from_every_rank, table
from cai_labs.sequence_parallel import formulas, ring_flash, split_sequence
from cai_labs.sequence_parallel.ring_attention import ring_attention
from cai_labs.sequence_parallel.ring_flash import (
    blocks_per_rank,
    local_positions,
    online_update,
    pieces,
    ring_flash_attention,
    split_layout,
)
from cai_labs.wire import gloo_headers

# %%
# The sizes: one small problem for the equality checks, one for the memory experiment.

B, H, L, D = 2, 2, 32, 8  # batch, heads, sequence, head size of the equality checks
WORLD_SIZES = (2, 4)  # context-parallel degrees compared
F64 = torch.float64
#: Each output and gradient sums O(L) products of O(1) terms: rounding is a few L * eps; a
#: hundredfold margin on that is still far below any real bug.
TOL = 100 * L * torch.finfo(F64).eps
MB, MH, MD = 1, 4, 16  # batch, heads, head size of the memory experiment (float32)
MEMORY_LENGTHS = tuple(range(64, 577, 64))  # sequence lengths measured on 2 ranks
MEMORY_BUDGET_KIB = 256  # per-rank budget for the saved attention activations
SEED = 0
RING_NAMES = {"seed": "seed ring", "flash": "online ring"}  # the library's names: seed, flash

print(build_env.describe(ranks=max(WORLD_SIZES)))  # where this page's numbers were measured

# %%
# Softmax, one key block at a time
# --------------------------------
# A query's attention output is :math:`o = \sum_j e^{s_j - m} v_j / \sum_j e^{s_j - m}` over
# its scores :math:`s_j` against every key, with any constant :math:`m`; the largest score keeps
# the exponentials finite. The keys can arrive in blocks: keep a running maximum :math:`m`, a
# running sum :math:`\ell` of exponentials and an output accumulator. When a block raises the
# maximum from :math:`m` to :math:`m'`, all that was summed so far was computed against the old
# maximum, so both :math:`\ell` and the accumulator are multiplied by :math:`e^{m - m'}` before
# the block is added. After the last block, accumulator / :math:`\ell` is the softmax output, and
# :math:`m + \log \ell` is the log-sum-exp of the row, the one number per query that backward
# needs to recompute any block's probabilities. No row of scores is ever whole.

g = torch.Generator().manual_seed(SEED)
q1, k1, v1 = (torch.randn(1, 1, 12, 4, generator=g, dtype=F64) for _ in range(3))
m = torch.full((1, 1, 12, 1), float("-inf"), dtype=F64)  # running max of each query's scores
total, acc = torch.zeros_like(m), torch.zeros_like(q1)  # running sum, output accumulator
for k_block, v_block in zip(k1.split(4, dim=2), v1.split(4, dim=2)):  # three key blocks
    s = q1 @ k_block.transpose(-2, -1) / 4**0.5  # [1, 1, 12, 4]: this block's scores
    m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
    alpha = torch.exp(m - m_new)  # rescales what was summed against the old max
    p = torch.exp(s - m_new)
    total, acc, m = alpha * total + p.sum(dim=-1, keepdim=True), alpha * acc + p @ v_block, m_new
blockwise, lse = acc / total, (m + torch.log(total)).squeeze(-1)
want = scaled_dot_product_attention(q1, k1, v1)
online_err = (blockwise - want).abs().max().item()
lse_err = (lse - torch.logsumexp(q1 @ k1.transpose(-2, -1) / 2, dim=-1)).abs().max().item()
print(f"blockwise online softmax vs scaled_dot_product_attention: max |Δ| = {online_err:.1e}")
print(f"m + log(sum) vs logsumexp of the whole score rows:        max |Δ| = {lse_err:.1e}")
assert online_err < TOL and lse_err < TOL

# %%
# The three updated lines are :func:`cai_labs.sequence_parallel.ring_flash.online_update`,
# which the ring below calls once per score block. What if the rescale is forgotten? Folding
# the same blocks with ``alpha = 1``:

m, total, acc = torch.full_like(m, float("-inf")), torch.zeros_like(total), torch.zeros_like(acc)
for k_block, v_block in zip(k1.split(4, dim=2), v1.split(4, dim=2)):
    s = q1 @ k_block.transpose(-2, -1) / 4**0.5
    m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
    p = torch.exp(s - m_new)
    total, acc, m = total + p.sum(dim=-1, keepdim=True), acc + p @ v_block, m_new
no_rescale_err = (acc / total - want).abs().max().item()
print(f"without the rescale: max |Δ| = {no_rescale_err:.2f} (vs {online_err:.1e} with it)")
assert no_rescale_err > 1e6 * TOL

# %%
# Causal work: contiguous chunks and the zig-zag layout
# -----------------------------------------------------
# A causal query sees only keys at its own or earlier positions. With tutorial 02's contiguous
# chunks, rank 0 (the first tokens) needs only its own keys, and the last rank needs all of them:
# every ring step waits for the slowest rank. Cut the sequence into :math:`2N` pieces of
# :math:`C/2` tokens instead. A query piece :math:`p` sees a key piece :math:`q < p` wholly,
# :math:`q = p` as a lower triangle (the diagonal block), and :math:`q > p` not at all (skipped).
# Rank :math:`r` holds pieces :math:`2r, 2r+1` (``contiguous``) or :math:`r` and
# :math:`2N - 1 - r` (``zigzag``): one early and one late piece, so every rank gets the same
# mix. The pieces each rank holds on :math:`N = 4`:

n_show = max(WORLD_SIZES)
layout_rows = [
    {
        "rank": r,
        "contiguous pieces": str(pieces(r, n_show, "contiguous")),
        "zigzag pieces": str(pieces(r, n_show, "zigzag")),
        "contiguous: blocks (formula)": blocks_per_rank(r, n_show, "contiguous"),
        "zigzag: blocks (formula)": blocks_per_rank(r, n_show, "zigzag"),
    }
    for r in range(n_show)
]
table(layout_rows, index="rank")

# %%
# The ring: one message of keys and values, folded on arrival
# ------------------------------------------------------------
# Each rank starts with its own keys and values, stacked into one ``[2, B, H, C, D]`` message.
# At each of :math:`N` steps it sends that message to the next rank, folds the blocks it can see
# into its two pieces' running states while the message travels, then takes the previous rank's
# message. Backward sends keys and values around again, recomputing each block's probabilities
# from the saved log-sum-exp; the gradient accumulators of each chunk (dK, dV) follow them and
# arrive at their owner after :math:`N - 1` hops. Every rank draws the same whole-sequence
# tensors and keeps its pieces; at the end every rank's rows go back in sequence order.


def attention_inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    return [torch.randn(B, H, L, D, generator=g, dtype=F64).to(device()) for _ in range(4)]


def in_sequence_order(parts: list[list[torch.Tensor]], layout: str) -> list[torch.Tensor]:
    """Every rank's ``[out, dq, dk, dv]`` (``parts[rank]``) joined into whole-sequence tensors."""
    full = [torch.empty(B, H, L, D, dtype=F64, device=parts[0][0].device) for _ in range(4)]
    for j, tensors in enumerate(parts):
        for whole, part in zip(full, tensors):
            whole[:, :, local_positions(j, len(parts), L, layout)] = part
    return full


# %%
# The worker runs one forward and one backward on this rank's pieces, each pass under its own
# ledger (it records every ``isend`` and what the sockets sent), and counts the blocks it folds
# by wrapping ``online_update``.


def ring_worker(layout: str) -> dict:
    rank, n = dist.get_rank(), dist.get_world_size()
    q, k, v, d_out = attention_inputs()
    local = [split_layout(t, rank, n, 2, layout).requires_grad_() for t in (q, k, v)]
    folds = [0]

    def counting(state, s, v_block):
        folds[0] += 1
        return online_update(state, s, v_block)

    with mock.patch.object(ring_flash, "online_update", counting), Ledger() as forward:
        out = ring_flash_attention(*local, layout=layout)
    with Ledger() as backward:
        out.backward(split_layout(d_out, rank, n, 2, layout))
    parts = from_every_rank([t.detach().cpu() for t in (out, *(x.grad for x in local))])
    sent = {
        name: {**comm_totals(rep)["isend"], "wire": rep["wire"].get("sent")}
        for name, rep in (("forward", forward.report()), ("backward", backward.report()))
    }
    full = in_sequence_order(parts, layout)
    return {"full": full, "blocks": from_every_rank(folds[0]), "sent": sent}


def both_layouts() -> dict:
    return {lay: ring_worker(lay) for lay in ring_flash.LAYOUTS}


# %%
# Run it on 2 and 4 ranks, each layout, and compare the blocks each rank folded with the count
# of the layout. With contiguous chunks the last rank folds :math:`4N - 1` blocks and rank 0
# three; zig-zag gives every rank :math:`2N + 1`, and both layouts do the same total.

runs = {(n, lay): got for n in WORLD_SIZES for lay, got in launch(both_layouts, n).items()}
count_rows = []
for (n, lay), got in runs.items():
    assert got["blocks"] == [blocks_per_rank(r, n, lay) for r in range(n)], (n, lay)
    slowest = max(got["blocks"]) / np.mean(got["blocks"])
    ranks = {f"rank {r}: blocks (measured)": b for r, b in enumerate(got["blocks"])}
    count_rows.append({"N": n, "layout": lay, "slowest / mean": slowest, **ranks})
contiguous4, zigzag4 = runs[(4, "contiguous")]["blocks"], runs[(4, "zigzag")]["blocks"]
print(
    f"N=4, blocks folded (measured): contiguous {contiguous4}, zigzag {zigzag4}; the slowest rank "
    f"does {max(contiguous4) / max(zigzag4):.2f}x the zig-zag's work with contiguous chunks"
)
assert sum(contiguous4) == sum(zigzag4) and len(set(zigzag4)) == 1
table(count_rows, index=["N", "layout"])

# %%
# Equal to serial causal attention
# --------------------------------
# The reference is PyTorch's ``scaled_dot_product_attention(..., is_causal=True)`` on the whole
# sequence in one process, outputs and the gradients of queries, keys and values for the same
# upstream gradient. Every run must match within ``TOL`` (float64 rounding with a margin).

q, k, v, d_out = (t.cpu() for t in attention_inputs())
leaves = [t.clone().requires_grad_() for t in (q, k, v)]
serial_out = scaled_dot_product_attention(*leaves, is_causal=True)
serial = [serial_out.detach(), *torch.autograd.grad(serial_out, leaves, d_out)]
error_rows, worst = [], 0.0
for (n, lay), got in runs.items():
    errors = [(a - b).abs().max().item() for a, b in zip(got["full"], serial)]
    error_rows.append({"N": n, "layout": lay, **dict(zip(["out", "dQ", "dK", "dV"], errors))})
    assert max(errors) <= TOL, f"N={n} {lay}: {max(errors):.2e} > TOL = {TOL:.2e}"
    worst = max(worst, *errors)
print(f"largest |ring - serial| over outputs and gradients of all runs: {worst:.1e} <= {TOL:.1e}")
table(error_rows, index=["N", "layout"], formats=dict.fromkeys(["out", "dQ", "dK", "dV"], "{:.1e}"))

# %%
# Both layouts equal serial causal attention to float64 rounding, on 2 and 4 ranks, outputs and
# all three input gradients. The test suite also breaks the ring three ways (no rescale, the
# diagonal block's mask transposed, the softmax backward without its row-sum term) and sees
# each caught.
#
# A causal GPT trained with context parallelism
# ---------------------------------------------
# The same attention inside a model: ``Layout(sp=N, sp_attention="ring_flash")`` tells
# :func:`cai_labs.parallelize` to give each rank :math:`L/N` consecutive tokens of every
# sequence, offset its position ids, run every block's attention through the online ring, and sum
# the ranks' gradients. (It cuts contiguous chunks, so the GPT runs the ring with
# ``layout="contiguous"``; zig-zag would reorder tokens and targets too.) A small GPT on
# character-level text from the standard library's docstrings, in float64, trained a few SGD
# steps on 1, 2 and 4 ranks from the same weights on the same batches.

from cai_labs import Layout, parallelize
from cai_labs.data.char_corpus import load_char_corpus
from cai_labs.hybrid import lm_loss
from cai_labs.models import GPT, GPTConfig

GPT_CFG = GPTConfig(n_layers=2, d_model=32, n_heads=4, seq_len=32)
GPT_BATCH, GPT_STEPS, GPT_LR = 4, 4, 0.5
corpus = load_char_corpus(vocab_size=GPT_CFG.vocab_size)
#: float64 rounding, with a millionfold margin; a missing gradient sum over the context-parallel
#: ranks moves the loss by more than 1e-4 (tests/test_parallelize.py).
GPT_TOL = 1e6 * torch.finfo(F64).eps

# %%
# The serial reference is the plain model on one process; the parallel run is the same model
# after ``parallelize``, whose ``train_step`` returns the whole batch's loss on every rank.


def gpt_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [corpus.batch(i, GPT_BATCH, GPT_CFG.seq_len) for i in range(GPT_STEPS)]


def serial_gpt() -> list[float]:
    model = GPT(GPT_CFG, seed=SEED).double()
    opt = torch.optim.SGD(model.parameters(), lr=GPT_LR)
    losses = []
    for x, y in gpt_batches():
        opt.zero_grad()
        loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def context_parallel_gpt(sp: int) -> list[float]:
    """The same training, each sequence split over ``sp`` ranks (the whole batch's loss)."""
    layout = Layout(sp=sp, sp_attention="ring_flash")
    model = parallelize(GPT(GPT_CFG, seed=SEED).to(device(), F64), layout)
    opt = model.make_optimizer(torch.optim.SGD, lr=GPT_LR)
    batches = [(x.to(device()), y.to(device())) for x, y in gpt_batches()]
    return [model.train_step(x, y, opt, step=i) for i, (x, y) in enumerate(batches)]


# %%
# Train it serially and on 2 and 4 ranks; every step's loss must match the serial one.

gpt_runs = {1: serial_gpt(), **{sp: launch(context_parallel_gpt, sp, sp) for sp in WORLD_SIZES}}
for sp, losses in gpt_runs.items():
    gap = max(abs(a - b) for a, b in zip(losses, gpt_runs[1]))
    print(
        f"SP={sp} {'(serial)' if sp == 1 else 'online ring'}: loss {losses[0]:.4f} -> "
        f"{losses[-1]:.4f} over {GPT_STEPS} steps, max |loss - serial| = {gap:.1e}"
    )
    assert gap <= GPT_TOL, f"SP={sp}: {gap:.2e} > {GPT_TOL:.2e}"
assert gpt_runs[1][-1] < gpt_runs[1][0]  # it learns

# %%
# The loss curves agree to float64 rounding on every step: context parallelism changes where the
# attention is computed, not what the model computes.
#
# Memory: what each ring saves for backward
# -----------------------------------------
# Per attention layer and rank, with :math:`E` the bytes of one chunk ``[B, H, C, D]``:
#
# * the **seed's ring** saves :math:`Q, K, V` (:math:`3E`), the probabilities ``[B, H, C, L]``
#   and the causal mask ``[C, L]`` (one byte per entry);
# * the **online ring** saves :math:`Q, K, V` and the output (:math:`4E`) and the log-sum-exp
#   ``[B, H, C]`` (float32 or wider); each ``[B, H, C/2, C/2]`` block lives for one step only.
#
# Both are :func:`~cai_labs.sequence_parallel.formulas.saved_activation_bytes`. The ledger
# counts every tensor autograd saves while it is open; the worker runs one forward and backward
# per (ring, length) and keeps the busiest rank's peak, and the bytes the ring's ``isend`` calls
# carried.


def memory_inputs(length: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    return [torch.randn(MB, MH, length, MD, generator=g).to(device()) for _ in range(3)]


def saved_worker(points: list[tuple[str, int]]) -> list[dict]:
    rank, n = dist.get_rank(), dist.get_world_size()
    rows = []
    for kind, length in points:
        if kind == "seed":  # contiguous chunks, the [B, H, C, L] scores
            local = [split_sequence(t, rank, n, dim=2).clone() for t in memory_inputs(length)]
        else:
            local = [split_layout(t, rank, n, 2) for t in memory_inputs(length)]
        local = [t.requires_grad_() for t in local]
        with Ledger(wire=False) as ledger:
            attend = ring_attention if kind == "seed" else ring_flash_attention
            out = attend(*local, causal=True)
            out.backward(torch.ones_like(out))
        report = ledger.report()
        peak = max(from_every_rank(report["memory"]["peak_activations"]))
        rows.append({"ring": kind, "N": n, "L": length, "peak": peak, "sent": 0})
        rows[-1]["sent"] = comm_totals(report)["isend"]["bytes"]
    return rows


# %%
# First both rings at one length on 2 and 4 ranks, next to their formulas, and the difference
# next to the seed's score matrix ``[B, H, C, L]``.

SAME_L = MEMORY_LENGTHS[3]
same = {n: launch(saved_worker, n, [("seed", SAME_L), ("flash", SAME_L)]) for n in WORLD_SIZES}
memory_rows = []
for n, (seed_row, flash_row) in same.items():
    scores = formulas.score_bytes("seed", MB, MH, SAME_L, n, 4)
    for row in (seed_row, flash_row):
        model = formulas.saved_activation_bytes(row["ring"], MB, MH, SAME_L, MD, n, 4)
        assert row["peak"] == model, (row, model)
        memory_rows.append(
            {
                "N": n,
                "ring": RING_NAMES[row["ring"]],
                "saved bytes (measured)": row["peak"],
                "formula (bytes)": model,
                "seed's scores (bytes)": scores,
            }
        )
    less = seed_row["peak"] - flash_row["peak"]
    print(
        f"N={n}, L={SAME_L}: the online ring saves {less:,} B less per rank than the seed's "
        f"({seed_row['peak'] / flash_row['peak']:.1f}x); the score matrix is {scores:,} B"
    )
    assert 0.9 * scores <= less <= 1.1 * scores  # less by about the score matrix
table(memory_rows, index=["N", "ring"])

# %%
# The online ring saves less by almost exactly the seed's score matrix (its causal mask goes
# too; the log-sum-exp and the output come in). At a fixed length, from 2 to 4 ranks:

for i, kind in enumerate(("seed", "flash")):
    ratio = same[2][i]["peak"] / same[4][i]["peak"]
    print(f"{RING_NAMES[kind]}, L={SAME_L}: saved bytes per rank, 2 ranks / 4 ranks = {ratio:.2f}")
    assert ratio == 2  # every saved tensor is C = L/N tokens long (the scores C x L)

# %%
# Both halve: the seed's :math:`L^2/N` term shrinks with :math:`N` too, but it is still there,
# and at a fixed :math:`N` it grows with the square of the length.
#
# The longest sequence under one budget
# -------------------------------------
# With ``MEMORY_BUDGET_KIB`` per rank on 2 ranks, the formulas give each ring's longest sequence
# (:func:`~cai_labs.sequence_parallel.formulas.longest_sequence`, a multiple of :math:`2N`).
# Then measure: both rings at every length of ``MEMORY_LENGTHS``, and both at the online ring's
# longest length, where the seed's ring must not fit.

BUDGET = MEMORY_BUDGET_KIB * 1024
N_MEM = WORLD_SIZES[0]
longest = {
    kind: formulas.longest_sequence(kind, BUDGET, MB, MH, MD, N_MEM, 4)
    for kind in ("seed", "flash")
}
points = [(kind, n) for n in MEMORY_LENGTHS for kind in ("seed", "flash")]
points += [("seed", longest["seed"]), ("flash", longest["flash"]), ("seed", longest["flash"])]
sweep = launch(saved_worker, N_MEM, points)
at = {(r["ring"], r["L"]): r["peak"] for r in sweep}
for (kind, length), peak in at.items():
    assert peak == formulas.saved_activation_bytes(kind, MB, MH, length, MD, N_MEM, 4)
flash_there, seed_there = at[("flash", longest["flash"])], at[("seed", longest["flash"])]
assert at[("seed", longest["seed"])] <= BUDGET and flash_there <= BUDGET < seed_there
print(
    f"budget {BUDGET:,} B per rank, N={N_MEM}: longest sequence seed ring L={longest['seed']}, "
    f"online ring L={longest['flash']} ({longest['flash'] / longest['seed']:.1f}x); at "
    f"L={longest['flash']} (measured) the online ring saves {flash_there:,} B, the seed's "
    f"{seed_there:,} B, {seed_there / BUDGET:.1f}x the budget"
)

# %%
# The figure draws the measured points over the formula lines. The seed's curve bends upward
# (:math:`L^2/N`); the online ring's is a straight line (:math:`L/N`): with it, the sequence a
# budget fits grows in proportion to the budget and to :math:`N`.

fig, ax = plt.subplots(figsize=(7, 4))
grid_l = np.arange(2 * N_MEM, max(length for _, length in at) + 1, 2 * N_MEM)
for i, (kind, label) in enumerate((("seed", "seed's ring"), ("flash", "online-softmax ring"))):
    pts = sorted((length, peak) for (k, length), peak in at.items() if k == kind)
    ax.plot(*zip(*[(x, y / 1024) for x, y in pts]), "o", color=f"C{i}", label=f"{label}, measured")
    model = [formulas.saved_activation_bytes(kind, MB, MH, x, MD, N_MEM, 4) / 1024 for x in grid_l]
    ax.plot(grid_l, model, "-", color=f"C{i}", alpha=0.5, label=f"{label}, formula")
ax.axhline(MEMORY_BUDGET_KIB, color="black", ls="--", label=f"budget {MEMORY_BUDGET_KIB} KiB")
ax.set(
    xlabel="sequence length L (tokens)",
    ylabel="saved activations per rank (KiB)",
    title=f"Causal attention, N={N_MEM} ranks: bytes saved for backward (ledger)",
    ylim=(0, 2.5 * MEMORY_BUDGET_KIB),
)
ax.legend(fontsize=8)
fig.tight_layout()

# %%
# What each rank sends
# --------------------
# Keys and values travel the ring once in forward and once in backward, :math:`2(N-1)E` per
# pass; in backward the dK and dV accumulators follow them, :math:`2(N-1)G` more, with
# :math:`G = E` for float32/64 inputs (:func:`~cai_labs.sequence_parallel.formulas.
# ring_flash_sent_bytes`). Per step that is the seed ring's :math:`6(N-1)E`: the online softmax
# saves memory, not traffic. The ledgers of the equality runs recorded each pass: the buffer
# bytes of the ``isend`` calls and the bytes this rank's sockets sent, which are the payload plus
# whole 48-byte gloo headers.

sent_rows = []
for (n, lay), got in runs.items():
    want = formulas.ring_flash_sent_bytes(n, B * H * (L // n) * D * 8)
    for name, measured in got["sent"].items():
        assert measured["bytes"] == want[name], (n, lay, name, measured, want)
        headers = None if measured["wire"] is None else gloo_headers(measured["wire"], want[name])
        assert measured["wire"] is None or headers is not None, (n, lay, name, measured)
        sent_rows.append(
            {
                "N": n,
                "layout": lay,
                "pass": name,
                "messages": measured["calls"],
                "formula (bytes)": want[name],
                "buffer bytes (measured)": measured["bytes"],
                "wire bytes (measured)": measured["wire"],
                "gloo headers": headers,
            }
        )
per_message = {
    r["gloo headers"] / r["messages"] for r in sent_rows if r["gloo headers"] is not None
}
print(f"gloo headers per ring message (measured): {sorted(per_message) or 'not measured'}")
table(sent_rows, index=["N", "layout", "pass"])

# %%
# The buffer bytes equal the formula exactly for every pass, layout and :math:`N`; what the
# sockets sent is that payload plus whole gloo headers, the same number for every message.
# Forward and backward together send :math:`6(N-1)E`, the seed ring's
# :func:`~cai_labs.sequence_parallel.formulas.attention_sent_bytes`; the memory runs measured
# both rings' ``isend`` bytes per step at one length:

for n, rows in same.items():
    chunk = MB * MH * (SAME_L // n) * MD * 4
    seed_sent, flash_sent = rows[0]["sent"], rows[1]["sent"]
    model = formulas.attention_sent_bytes("ring", n, chunk)
    print(
        f"N={n}, L={SAME_L}: sent per rank per step (measured) seed ring {seed_sent:,} B, "
        f"online ring {flash_sent:,} B; 6(N-1)E = {model:,} B"
    )
    assert seed_sent == flash_sent == model

# %%
# At real scale
# -------------
# The scale model (:mod:`cai_labs.scale`) applies the same kind of formulas to Llama-3 8B on H100
# 80 GB GPUs: one sequence per step split over ``sp`` context-parallel GPUs, bf16, ZeRO-3 over
# those GPUs (they hold the same parameters), and the longest sequence, in steps of 1,024
# tokens, whose memory per GPU fits. The seed's ring keeps each layer's softmax output (the
# activations of Korthikanti et al., ``recompute="none"``); the online ring keeps no score
# matrix, which is the model's ``recompute="selective"`` (the attention-core terms dropped, the
# scores rebuilt in backward). **Modeled**, not run.

from cai_labs.scale import ScaleLayout, predict

MODEL, GPU = "llama-3-8b", "h100"


def scale_layout(sp: int, seq: int, recompute: str) -> ScaleLayout:
    return ScaleLayout(sp=sp, seq=seq, global_batch=1, zero=3, recompute=recompute)


def longest_fit(sp: int, recompute: str) -> int:
    """Longest sequence (a multiple of 1,024) that fits one GPU's memory; 0 if none does."""

    def fits(k: int) -> bool:
        return predict(MODEL, GPU, scale_layout(sp, 1024 * k, recompute)).fits

    lo, hi = 0, 1
    while fits(hi):  # double, then bisect
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return 1024 * lo


# %%
# For each context-parallel degree, both rings' longest sequence and the memory per GPU there:

scale_rows = []
for sp in (2, 4, 8, 16, 32):
    row = {"context-parallel GPUs": sp}
    for name, recompute in (("seed ring", "none"), ("online ring", "selective")):
        seq = longest_fit(sp, recompute)
        mem = predict(MODEL, GPU, scale_layout(sp, max(seq, 1024), recompute)).memory_per_gpu_bytes
        row[f"{name}: longest L (modeled)"] = seq
        row[f"{name}: activations (GB)"] = mem["activations"] / 1e9
    scale_rows.append(row)
table(
    scale_rows,
    index="context-parallel GPUs",
    formats={c: "{:.1f}" if "(GB)" in c else "{:,.0f}" for c in list(scale_rows[0])[1:]},
)

# %%
# Each row's activations are at that row's longest sequence. Where the scores dominate, the
# seed's :math:`L^2/N` lets the sequence grow only as :math:`\sqrt{N}` when :math:`N` doubles;
# the online ring's :math:`L/N` lets it grow as :math:`N`, plus what ZeRO-3 frees:

seed_l = [r["seed ring: longest L (modeled)"] for r in scale_rows]
flash_l = [r["online ring: longest L (modeled)"] for r in scale_rows]
gains = [f / s for f, s in zip(flash_l, seed_l) if s]
print(
    f"{MODEL} on {GPU} (modeled): from {scale_rows[-2]['context-parallel GPUs']} to "
    f"{scale_rows[-1]['context-parallel GPUs']} GPUs the seed ring's longest sequence grows "
    f"{seed_l[-1] / seed_l[-2]:.2f}x (sqrt 2 = {2**0.5:.2f}), the online ring's "
    f"{flash_l[-1] / flash_l[-2]:.2f}x; the online ring fits {min(gains):.1f}x to "
    f"{max(gains):.1f}x longer sequences"
)
assert min(gains) > 1 and flash_l[-1] / flash_l[-2] > seed_l[-1] / seed_l[-2]

# %%
# The online ring also saves its log-sum-exp, ``H`` float32 numbers per token and layer, which
# the scale model's ``"selective"`` count leaves out. Its share of a layer's saved bytes:

from cai_labs.scale import get_model
from cai_labs.tensor_parallel.formulas import layer_activation_bytes

shape = get_model(MODEL)
per_token = layer_activation_bytes(
    1, 1, shape.hidden, shape.heads, recompute="selective", ffn=shape.f, kv_heads=shape.kv,
    gated=shape.gated, dropout=shape.dropout,
)  # fmt: skip
lse_share = shape.heads * 4 / per_token
print(
    f"{MODEL}: log-sum-exp {shape.heads * 4} B per token and layer, {lse_share:.2%} of the "
    f"{per_token:,.0f} B the scale model counts (modeled)"
)
assert lse_share < 0.01

# %%
#
# Running it on GPUs and under torchrun
# -------------------------------------
# ``launch`` uses NCCL when enough GPUs are visible, and under ``torchrun`` it runs the worker in
# place, so this page runs on a GPU node as::
#
#     torchrun --nproc-per-node=4 tutorial_09_context_parallel.py
#
# (the workers put their tensors and the GPT on ``cai_labs.device()``; over NCCL the sockets do
# not carry the tensors, so the wire bytes are left blank). A production ring computes each
# block with a flash-attention kernel that returns the block's log-sum-exp; the recurrence is
# the one above.
# PyTorch ships one as ``torch.distributed.tensor.experimental.context_parallel``; it does not run
# on CPU with torch 2.13, so this page does not run it. Colossal-AI 0.5.0 offers the same as
# ``sequence_parallelism_mode="ring_attn"`` of its ``HybridParallelPlugin`` (CUDA only; tutorial
# 02 checks that plugin's call against the release).
#
# Predict, then check
# -------------------
# Answer each question before opening its answer; the answers are this build's numbers.

exercises = (
    Exercises()
    .add(
        "On 8 ranks, how many half-chunk blocks does the busiest rank fold in one forward with "
        "contiguous chunks, and with zig-zag?",
        f"Contiguous: {max(blocks_per_rank(r, 8, 'contiguous') for r in range(8))} (4N-1, the "
        f"last rank), zig-zag: {blocks_per_rank(0, 8)} on every rank (2N+1); on 4 ranks the run "
        f"counted {contiguous4} and {zigzag4}.",
    )
    .add(
        "Forget the rescale by exp(m_old - m_new): is the blockwise output off by rounding, or "
        "wrong?",
        f"Wrong: max |Δ| = {no_rescale_err:.2f} against {online_err:.1e} with the rescale.",
    )
)

# %%
# Two more, on memory: one measured above, one from the formulas the ledger matched.

doubled = {k: formulas.longest_sequence(k, 2 * BUDGET, MB, MH, MD, N_MEM, 4) for k in longest}
exercises.add(
    f"At L = {SAME_L}, going from 2 to 4 ranks: by what factor does each ring's saved memory per "
    "rank shrink?",
    f"Seed ring {same[2][0]['peak'] / same[4][0]['peak']:.2f}x, online ring "
    f"{same[2][1]['peak'] / same[4][1]['peak']:.2f}x (measured): at a fixed L both are "
    "proportional to 1/N.",
).add(
    f"Double the budget to {2 * MEMORY_BUDGET_KIB} KiB on {N_MEM} ranks: how much longer a "
    "sequence does each ring fit?",
    f"Seed ring {longest['seed']} -> {doubled['seed']} ({doubled['seed'] / longest['seed']:.2f}x; "
    f"sqrt 2 = {2**0.5:.2f}), online ring {longest['flash']} -> {doubled['flash']} "
    f"({doubled['flash'] / longest['flash']:.2f}x) (formula).",
)
