"""
Expert parallelism: a mixture of experts spread over ranks by all-to-all
========================================================================

A mixture-of-experts layer routes each token to a few of many expert MLPs; expert parallelism
puts a share of the experts on each rank and sends every token to its experts and back with two
all-to-alls of fixed-size buffers.

A dense MLP applies all its weights to every token. A mixture-of-experts (MoE) layer holds
:math:`E` expert MLPs and a small *router* that sends each token to :math:`k` of them (Switch
Transformer: :math:`k = 1`; GShard and Mixtral: :math:`k = 2`): :math:`E` times the parameters
for about :math:`k` experts' compute per token. The experts do not fit on one GPU, so each of
:math:`N` ranks keeps :math:`E/N` of them. Every rank routes its own tokens, and one all-to-all
(*dispatch*) sends each token to the rank of its expert; a second (*combine*) brings the outputs
back. Each expert takes at most a fixed *capacity* of tokens per rank, so the buffers, and the
all-to-alls, have a fixed size; tokens beyond it are dropped, and an auxiliary loss keeps the
router from sending too many tokens to the same experts.

**In this tutorial** you will

1. route tokens with a top-k router: its capacity, the tokens it drops, and its load-balancing
   loss checked against a hand computation;
2. run the expert-parallel layer on 2 and 4 ranks and check outputs and gradients (input,
   router, experts) against the serial layer in float64;
3. measure the all-to-all bytes each rank sends next to the formula, and the tokens each expert
   received;
4. measure what the capacity factor does to dropped tokens, and what the auxiliary loss does to
   an unbalanced router;
5. see what the same formulas say for a Mixtral-8x7B-shaped layer on 8 GPUs.

**Prerequisites:** tutorial 00 (data parallelism: launching ranks, the ledger) and the
all-to-all of tutorial 02 (sequence parallelism).

All ranks are CPU processes of the machine that built this page, talking through ``gloo``.
"""

# %%
# Set-up
# ------
# Sizes are small so that the page runs in seconds on two CPU cores; raise them on your own
# machine. Equality checks run in ``float64``. ``CAPACITY_FACTOR = 1.0`` gives each expert
# exactly its fair share of slots, so the equality runs drop tokens too.

import math

import matplotlib.pyplot as plt
import torch
import torch.distributed as dist

from cai_labs import Ledger, build_env, comm_totals, device, launch
from cai_labs.exercises import Exercises
from cai_labs.moe import ExpertParallelMoE, MoELayer, TopKRouter, formulas
from cai_labs.report import from_every_rank, table
from cai_labs.wire import gloo_headers

D, HIDDEN, E = 16, 32, 8  # model width, expert MLP width, experts
S = 32  # tokens per rank (one routing group)
K = 2  # experts per token
CAPACITY_FACTOR = 1.0
WORLD_SIZES = (2, 4)  # expert-parallel degrees compared
F64 = torch.float64
#: Each output and gradient sums at most N * S products of O(1) terms (the router's gradient
#: sums over every token): a thousandfold margin on that many float64 roundings.
TOL = 1e3 * max(WORLD_SIZES) * S * torch.finfo(F64).eps
AUX_WEIGHT = 0.01  # alpha, the auxiliary loss's weight in the training loss (Switch's value)
SEED = 0

print(build_env.describe(ranks=max(WORLD_SIZES)))  # where this page's numbers were measured

# %%
# The router: top-k, capacity and dropped tokens
# ----------------------------------------------
# The router is one linear map to :math:`E` logits and a softmax; a token's choices are its
# :math:`k` most probable experts, its gates those probabilities (over their sum for
# :math:`k = 2`). Each expert has :math:`C = \lceil c \cdot S k / E \rceil` slots for a group of
# :math:`S` tokens, with capacity factor :math:`c`. Slots go in a fixed order: every token's
# first choice in token order, then the second choices, so a first choice is never dropped for
# someone's second. An assignment that finds its expert full is dropped: it adds nothing, and
# the token goes on through the residual connection around the layer. One group of :math:`S`
# tokens through the router of the layer used below:

layer = MoELayer(D, HIDDEN, E, k=K, capacity_factor=CAPACITY_FACTOR, seed=SEED).double()
g = torch.Generator().manual_seed(SEED)
x_group = torch.randn(1, S, D, generator=g, dtype=F64)
r = layer.router(x_group)
assigned, kept = r.tokens_per_expert[0], torch.bincount(r.expert[r.kept], minlength=E)
assert r.capacity == math.ceil(CAPACITY_FACTOR * S * K / E)
assert kept.tolist() == assigned.clamp(max=r.capacity).tolist()  # the first C of each are kept
first_kept = r.kept[0, :, 0].float().mean().item()
print(
    f"S={S} tokens, k={K}, E={E}, capacity factor {CAPACITY_FACTOR}: C = {r.capacity} slots per "
    f"expert; {r.dropped} of {S * K} assignments dropped; first choices kept: {first_kept:.0%}"
)
rows = [{"expert": e, "assigned": int(a), "kept": int(c), "dropped": int(a - c)}
        for e, (a, c) in enumerate(zip(assigned, kept))]  # fmt: skip
table(rows, index="expert")

# %%
# The load-balancing loss
# -----------------------
# Switch and GShard add :math:`\alpha \cdot E \sum_e f_e P_e` to the training loss, with
# :math:`f_e` the share of the group's :math:`S k` assignments that chose expert :math:`e` and
# :math:`P_e` its mean router probability. :math:`f_e` is a count (no gradient); through
# :math:`P_e` the loss lowers the probability of experts that get many tokens. It is 1 for a
# uniform router and grows as the load concentrates. By hand, from the router's probabilities:

probs = torch.softmax(layer.router.gate(x_group), dim=-1)[0]  # [S, E]
f = assigned.to(F64) / (S * K)
by_hand = E * (f * probs.mean(dim=0)).sum().item()
print(f"aux loss: router {r.aux_loss.item():.6f}, by hand E * sum f_e P_e = {by_hand:.6f}")
assert abs(r.aux_loss.item() - by_hand) < 1e-14
flat = TopKRouter(D, E, k=K).double()
torch.nn.init.zeros_(flat.gate.weight)  # every probability 1/E
print(f"a uniform router's aux loss: {flat(x_group).aux_loss.item():.6f}")
assert abs(flat(x_group).aux_loss.item() - 1) < 1e-14

# %%
# The serial layer writes each kept assignment into a ``[E, C, d]`` buffer at its (expert,
# slot), runs expert :math:`e` on row :math:`e`, and sums the outputs back, weighted by the
# gates. With :math:`k = 1` a dropped token's output is exactly zero:

switch = MoELayer(D, HIDDEN, E, k=1, capacity_factor=CAPACITY_FACTOR, seed=SEED).double()
y1, r1 = switch(x_group[0])
dropped_tokens = (~r1.kept[0, :, 0]).nonzero().flatten()
assert 0 < len(dropped_tokens) == r1.dropped
largest = y1[dropped_tokens].abs().max().item()
print(f"k=1: tokens {dropped_tokens.tolist()} dropped; their outputs' largest |value|: {largest}")
assert largest == 0

# %%
# Experts on ranks: dispatch and combine by all-to-all
# ----------------------------------------------------
# On :math:`N` ranks, rank :math:`r` keeps experts :math:`rE/N \dots (r+1)E/N - 1`
# (:meth:`~cai_labs.moe.expert_parallel.ExpertParallelMoE.from_serial` copies
# them, and the whole router, from the serial layer). Each rank routes its own :math:`S` tokens
# and fills the same ``[E, C, d]`` buffer. Cut along the experts, piece :math:`j` holds the
# slots of rank :math:`j`'s experts: one ``all_to_all_single`` sends piece :math:`j` to rank
# :math:`j`, every piece the same size. A rank runs its experts on the pieces of all ranks, and
# the same all-to-all sends the outputs back, where the gates weight them. In backward each
# all-to-all's twin is the same all-to-all of the gradient
# (:func:`cai_labs.comm.all_to_all_group`). The router is replicated: its gradient is summed
# over the ranks, as data parallelism does for every replicated weight.
#
# Every rank draws the same tokens for all ranks and keeps its chunk:


def tokens(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' tokens ``[n S, d]`` and an upstream gradient (rank r keeps chunk r)."""
    g = torch.Generator().manual_seed(SEED + 1)
    return tuple(torch.randn(n * S, D, generator=g, dtype=F64).to(device()) for _ in range(2))


# %%
# The worker: one forward and backward under two ledgers, the loss with its auxiliary term.


def ep_worker(k: int) -> dict:
    rank, n = dist.get_rank(), dist.get_world_size()
    serial = MoELayer(D, HIDDEN, E, k=k, capacity_factor=CAPACITY_FACTOR, seed=SEED)
    ep = ExpertParallelMoE.from_serial(serial.to(device(), F64), group=None)
    x, dy = (t.chunk(n)[rank] for t in tokens(n))
    x.requires_grad_()
    with Ledger(track_activations=False) as forward:
        y, routing = ep(x)
    with Ledger(track_activations=False) as backward:
        ((y * dy).sum() + AUX_WEIGHT * routing.aux_loss / n).backward()
    router_grad = ep.router.gate.weight.grad.clone()
    dist.all_reduce(router_grad)  # the replicated router: sum over ranks
    per_pass = [comm_totals(led.report())["all_to_all_single"] for led in (forward, backward)]
    wire = [led.report()["wire"].get("sent") for led in (forward, backward)]
    experts = [p.grad.cpu() for e in ep.experts for p in e.parameters()]  # mine only
    return {"y": from_every_rank(y.detach().cpu()), "dx": from_every_rank(x.grad.cpu()),
            "router": router_grad.cpu(), "experts": from_every_rank(experts),
            "aux": from_every_rank(routing.aux_loss.item()), "capacity": routing.capacity,
            "assigned": from_every_rank(routing.tokens_per_expert[0].cpu()),
            "bytes": per_pass, "wire": wire}  # fmt: skip


# %%
# The serial twin is the same layer on all :math:`N S` tokens at once, routed in :math:`N`
# groups of :math:`S` (each with its own capacity, as each rank has):


def serial_reference(k: int, n: int) -> dict:
    serial = MoELayer(D, HIDDEN, E, k=k, capacity_factor=CAPACITY_FACTOR, seed=SEED).double()
    x, dy = (t.cpu() for t in tokens(n))
    x.requires_grad_()
    y, routing = serial(x, groups=n)
    ((y * dy).sum() + AUX_WEIGHT * routing.aux_loss).backward()  # the mean over groups
    experts = [p.grad for e in serial.experts for p in e.parameters()]
    return {"y": y.detach(), "dx": x.grad, "router": serial.router.gate.weight.grad,
            "experts": experts, "aux": routing.aux_loss.item()}  # fmt: skip


# %%
# Run both on 2 and 4 ranks, with :math:`k = 1` and :math:`k = 2`, and compare everything:
# outputs, input gradients, the router's summed gradient, and each rank's expert gradients
# against the serial gradients of the experts it owns.

runs = {(n, k): launch(ep_worker, n, k) for n in WORLD_SIZES for k in (1, K)}
error_rows, worst = [], 0.0
for (n, k), got in runs.items():
    want = serial_reference(k, n)
    owned = [g for rank in got["experts"] for g in rank]  # in expert order: rank 0's first
    errors = {
        "output": (torch.cat(got["y"]) - want["y"]).abs().max().item(),
        "d input": (torch.cat(got["dx"]) - want["dx"]).abs().max().item(),
        "d router": (got["router"] - want["router"]).abs().max().item(),
        "d experts": max((a - b).abs().max().item() for a, b in zip(owned, want["experts"])),
        "aux loss": abs(sum(got["aux"]) / n - want["aux"]),
    }
    assert len(owned) == len(want["experts"]) and max(errors.values()) <= TOL, (n, k, errors)
    worst = max(worst, *errors.values())
    error_rows.append({"N": n, "k": k, **{f"{c} error": v for c, v in errors.items()}})
print(f"largest |expert parallel - serial| over outputs and gradients: {worst:.1e} <= {TOL:.1e}")
table(error_rows, index=["N", "k"])

# %%
# Expert parallelism changes where each expert runs, not what the layer computes: outputs and
# all gradients agree to float64 rounding, dropped tokens included. The test suite also breaks
# the layer three ways (the combine's all-to-all replaced by the identity, tokens sent one rank
# too far, the dispatch's backward twin left out) and sees each caught by this comparison.
#
# What each rank sends
# --------------------
# Both all-to-alls carry the whole ``[E, C, d]`` buffer, whatever the routing: :math:`E C d s`
# bytes each (:math:`s` bytes per element), two in forward and two in backward
# (:func:`~cai_labs.moe.formulas.all_to_all_bytes`). A rank keeps its own piece and sends the
# other :math:`(N-1)/N` of each buffer; the sockets add gloo's headers.

byte_rows = []
for (n, k), got in runs.items():
    model = formulas.all_to_all_bytes(E, formulas.capacity(S, E, k, CAPACITY_FACTOR), D, 8)
    for (name, measured), wire in zip(zip(("forward", "backward"), got["bytes"]), got["wire"]):
        assert measured["calls"] == 2 and measured["bytes"] == model[name], (n, k, name)
        payload = formulas.all_to_all_sent_bytes(model[name], n)
        headers = None if wire is None else gloo_headers(wire, int(payload))
        assert wire is None or headers is not None, (n, k, name, wire, payload)
        byte_rows.append({"N": n, "k": k, "pass": name, "formula (bytes)": model[name],
                          "buffer bytes (measured)": measured["bytes"],
                          "sent (N-1)/N (bytes)": payload, "wire bytes (measured)": wire,
                          "gloo headers": headers})  # fmt: skip
print(f"ledger all-to-all bytes == formula in all {len(byte_rows)} passes")
table(byte_rows, index=["N", "k", "pass"])

# %%
# Doubling :math:`k` doubles the capacity and so the bytes; the ranks' count :math:`N` does
# not change a rank's buffer, only the share of it that leaves the rank:

fwd_bytes = {key: got["bytes"][0]["bytes"] for key, got in runs.items()}
assert fwd_bytes[(2, K)] == fwd_bytes[(4, K)] == 2 * fwd_bytes[(2, 1)] == 2 * fwd_bytes[(4, 1)]
each = "; ".join(f"N={n}, k={k}: {b:,} B" for (n, k), b in fwd_bytes.items())
print(f"forward all-to-all buffer bytes per rank (measured): {each}")

# %%
# The tokens each expert received on 4 ranks with :math:`k = 2` (measured: every rank's
# assignments, before dropping), next to the slots it has, :math:`N C`:

got4 = runs[(max(WORLD_SIZES), K)]
n4, cap4 = max(WORLD_SIZES), got4["capacity"]
per_rank = torch.stack(got4["assigned"])  # [N, E]
expert_rows = [{"expert": e, "owner rank": e // (E // n4), **{f"from rank {j}": int(c)
                for j, c in enumerate(per_rank[:, e])}, "assigned": int(per_rank[:, e].sum()),
                "kept": int(per_rank[:, e].clamp(max=cap4).sum()), "slots N*C": n4 * cap4}
               for e in range(E)]  # fmt: skip
busiest = max(expert_rows, key=lambda row: row["assigned"])
print(
    f"N={n4}, k={K}: expert {busiest['expert']} was chosen {busiest['assigned']} times for "
    f"{n4 * cap4} slots; {sum(r['assigned'] - r['kept'] for r in expert_rows)} of "
    f"{n4 * S * K} assignments dropped (measured)"
)
table(expert_rows, index="expert")

# %%
# The capacity factor and dropped tokens
# --------------------------------------
# A larger capacity factor drops fewer tokens and makes every buffer, and every all-to-all,
# larger in proportion; an unbalanced router needs more slack for the same drops. Measured with
# the router alone, on ``SWEEP_GROUPS`` groups of ``SWEEP_TOKENS`` tokens: the random router
# above, and the same router on tokens shifted toward expert 0's direction (an unbalanced load).

CAPACITY_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
SWEEP_GROUPS, SWEEP_TOKENS = 4, 256
g = torch.Generator().manual_seed(SEED + 2)
sweep_x = torch.randn(SWEEP_GROUPS, SWEEP_TOKENS, D, generator=g, dtype=F64)
w0 = layer.router.gate.weight[0].detach()
inputs = {"balanced": sweep_x, "unbalanced": sweep_x + 1.5 * w0 / w0.norm()}


def layer_router(k: int) -> TopKRouter:
    """A copy of the layer's router with ``k`` choices (no gradients needed here)."""
    router = TopKRouter(D, E, k).double()
    router.load_state_dict(layer.router.state_dict())
    return router.requires_grad_(False)


def dropped_share(router: TopKRouter, x: torch.Tensor, factor: float) -> float:
    router.capacity_factor = factor
    routing = router(x)
    return routing.dropped / routing.kept.numel()


# %%
# The layer's router, with one and with two choices, on both inputs at every factor:

sweep = {(name, k): [dropped_share(layer_router(k), x, c) for c in CAPACITY_FACTORS]
         for name, x in inputs.items() for k in (1, K)}  # fmt: skip
aux = {name: layer_router(K)(x).aux_loss.item() for name, x in inputs.items()}
at_one = CAPACITY_FACTORS.index(1.0)
print(
    f"capacity factor 1.0, k={K} (measured): {sweep[('balanced', K)][at_one]:.1%} of assignments "
    f"dropped on balanced tokens (aux loss {aux['balanced']:.3f}), "
    f"{sweep[('unbalanced', K)][at_one]:.1%} on unbalanced ones (aux loss {aux['unbalanced']:.3f})"
)
assert all(a >= b for a, b in zip(sweep[("balanced", K)], sweep[("balanced", K)][1:]))
assert sweep[("unbalanced", K)][at_one] > sweep[("balanced", K)][at_one]

# %%
# The figure draws every measured share; the smallest factor of the sweep that drops nothing in
# each case, and what a rank's all-to-all buffer costs there, relative to factor 1:

for (name, k), shares in sweep.items():
    none_at = next((c for c, v in zip(CAPACITY_FACTORS, shares) if v == 0), None)
    grow = formulas.capacity(SWEEP_TOKENS, E, k, none_at or CAPACITY_FACTORS[-1]) / (
        formulas.capacity(SWEEP_TOKENS, E, k, 1.0)
    )
    print(f"{name}, k={k}: nothing dropped from factor {none_at} on; buffer {grow:.2f}x factor 1's")

fig, ax = plt.subplots(figsize=(7, 4))
for (name, k), shares in sweep.items():
    ls = "-" if name == "balanced" else "--"
    ax.plot(CAPACITY_FACTORS, [100 * v for v in shares], ls, marker="o", label=f"{name}, k={k}")
title = f"Dropped assignments vs capacity factor, E={E}, groups of {SWEEP_TOKENS} tokens"
ax.set(xlabel="capacity factor c", ylabel="assignments dropped (%, measured)", title=title)
ax.legend(fontsize=8)
fig.tight_layout()

# %%
# The auxiliary loss at work
# --------------------------
# Train only the router of the unbalanced case on its auxiliary loss (plain SGD): the loss
# pushes probability away from the crowded experts, and at a capacity factor of 1 fewer
# assignments are dropped. In a real model this term is added, scaled by a small
# :math:`\alpha` (``AUX_WEIGHT``, as in the equality runs above), to the language-model loss.

AUX_STEPS, AUX_LR = 60, 1.0
router = layer_router(K).requires_grad_(True)
opt = torch.optim.SGD(router.parameters(), lr=AUX_LR)
history = []
for step in range(AUX_STEPS + 1):
    routing = router(inputs["unbalanced"])
    history.append({"step": step, "aux loss": routing.aux_loss.item(),
                    "dropped share": routing.dropped / routing.kept.numel()})  # fmt: skip
    opt.zero_grad()
    routing.aux_loss.backward()
    opt.step()
start, end = history[0], history[-1]
print(
    f"{AUX_STEPS} SGD steps on the aux loss alone (measured): aux loss {start['aux loss']:.3f} -> "
    f"{end['aux loss']:.3f}; dropped at capacity factor 1.0: {start['dropped share']:.1%} -> "
    f"{end['dropped share']:.1%}"
)
assert end["aux loss"] < start["aux loss"] and 0 < end["dropped share"] < start["dropped share"]
table(history[:: AUX_STEPS // 6], index="step")

# %%
# At real scale
# -------------
# The same formulas for one MoE layer shaped like Mixtral 8x7B's (its published configuration:
# width 4,096, expert MLP 14,336 wide and gated, 8 experts, top-2, 32 layers), in bf16, with
# 8,192 tokens per GPU (two sequences of 4,096) and the 8 experts on the 8 GPUs of one H100
# node, one each. A rank's all-to-all time is modeled as the bytes it sends over NVLink at the
# datasheet bandwidth, per direction (:mod:`cai_labs.scale.hardware`). **Modeled**, not run.

from cai_labs.scale.hardware import get_gpu

MX = {"d": 4096, "ffn": 14336, "experts": 8, "k": 2, "layers": 32, "tokens": 8192, "ep": 8}
nvlink = get_gpu("h100").nvlink_bandwidth
scale_rows = []
for factor in (1.0, 1.25, 2.0):
    cap = formulas.capacity(MX["tokens"], MX["experts"], MX["k"], factor)
    layer_bytes = formulas.all_to_all_bytes(MX["experts"], cap, MX["d"], 2)
    per_step = layer_bytes["forward"] + layer_bytes["backward"]
    sent = formulas.all_to_all_sent_bytes(per_step, MX["ep"])
    scale_rows.append({"capacity factor": factor, "C (slots)": cap,
                       "one all-to-all (MB)": layer_bytes["forward"] / 2 / 1e6,
                       "fwd + bwd per layer (MB)": per_step / 1e6, "sent per GPU (MB)": sent / 1e6,
                       "NVLink time per layer (ms)": 1e3 * sent / nvlink,
                       "sent per step, all layers (GB)": MX["layers"] * sent / 1e9})  # fmt: skip
megabytes = ["one all-to-all (MB)", "fwd + bwd per layer (MB)", "sent per GPU (MB)"]
table(scale_rows, index="capacity factor", formats=dict.fromkeys(megabytes, "{:,.1f}"))

# %%
# Each all-to-all carries :math:`E C` slots where the tokens fill at most :math:`S k`: the buffer
# is the capacity factor times the tokens' own bytes. And the parameters each GPU keeps:

one_expert = formulas.expert_params(MX["d"], MX["ffn"], bias=False, gated=True)
per_gpu = MX["layers"] * formulas.expert_params_per_rank(
    MX["experts"], MX["ep"], MX["d"], MX["ffn"], bias=False, gated=True
)
payload = MX["tokens"] * MX["k"] * MX["d"] * 2
overhead = scale_rows[1]["one all-to-all (MB)"] * 1e6 / payload
print(
    f"Mixtral-8x7B-shaped (modeled): one expert {one_expert / 1e6:,.0f} M parameters; all "
    f"experts of all layers {MX['layers'] * MX['experts'] * one_expert / 1e9:.1f} B parameters, "
    f"{per_gpu / 1e9:.2f} B ({2 * per_gpu / 1e9:.1f} GB in bf16) per GPU with EP={MX['ep']}; "
    f"at factor 1.25 one all-to-all carries {overhead:.2f}x the tokens' bytes"
)
assert overhead == 1.25  # C E = c S k exactly at these sizes

# %%
# Running it on GPUs and under torchrun
# -------------------------------------
# ``launch`` uses NCCL when enough GPUs are visible, and under ``torchrun`` it runs the worker in
# place, so this page runs on a GPU node as::
#
#     torchrun --nproc-per-node=4 tutorial_10_expert_parallel.py
#
# (the workers put the layer and the tokens on ``cai_labs.device()``; over NCCL the sockets do
# not carry the tensors, so the wire bytes are left blank). Production layers compute all local
# experts in one grouped matrix product instead of a loop, and often send only the filled slots
# (an all-to-all with uneven splits) or drop no tokens at all; the fixed buffers here keep the
# all-to-all equal-split and its bytes a formula. Colossal-AI 0.5.0 offers expert parallelism
# as ``MoeHybridParallelPlugin`` with ``ep_size`` (CUDA only; tutorial 08 checks a snippet that
# trains a small Mixtral with it against the release).
#
# Predict, then check
# -------------------
# Answer each question before opening its answer; the answers are this build's numbers.

c125 = formulas.capacity(S, E, K, 1.25)
zero_at = next(c for c, v in zip(CAPACITY_FACTORS, sweep[("balanced", K)]) if v == 0)
exercises = (
    Exercises()
    .add(
        f"S = {S} tokens per rank, E = {E}, k = {K}, capacity factor 1.25: how many slots per "
        "expert, and how many buffer bytes do a rank's two forward all-to-alls carry in float64?",
        f"C = ceil(1.25 * {S} * {K} / {E}) = {c125}; 2 E C d * 8 = "
        f"{formulas.all_to_all_bytes(E, c125, D, 8)['forward']:,} B (formula).",
    )
    .add(
        "Go from 4 to 8 expert-parallel ranks with the same tokens per rank: what happens to a "
        "rank's all-to-all buffer, and to the bytes that leave it?",
        f"The buffer stays E C d s ({runs[(4, K)]['bytes'][0]['bytes']:,} B per forward here, the "
        f"same on 2 and 4 ranks, measured); the share sent grows from "
        f"{formulas.all_to_all_sent_bytes(1, 4):.3f} to {formulas.all_to_all_sent_bytes(1, 8):.3f}"
        " of it ((N-1)/N).",
    )
)

# %%
# Two more, on the capacity factor and the auxiliary loss, both measured above.

exercises.add(
    f"With k = {K} on the balanced tokens, what is the smallest capacity factor of the sweep "
    "that drops nothing?",
    f"{zero_at} (measured); on the unbalanced tokens factor 1.0 dropped "
    f"{sweep[('unbalanced', K)][at_one]:.1%}.",
).add(
    f"{AUX_STEPS} SGD steps on the auxiliary loss alone: does the dropped share at factor 1.0 "
    "fall to zero?",
    f"No: {start['dropped share']:.1%} -> {end['dropped share']:.1%} (measured); the loss "
    "balances the average load, and a random group still overfills some experts.",
)
