"""Ring self-attention: attend over a sequence split across N ranks by passing chunks in a ring.

This is the sequence parallelism of Li et al., *Sequence Parallelism: Long Sequence Training from
System Perspective* (2021), which Colossal-AI shipped as ``RingQK`` / ``RingAV``.

Rank ``r`` of ``N`` holds the queries, keys and values of its own ``C = L/N`` tokens
(``[B, H, C, D]`` each). Attention needs every query against every key, so:

1. **Scores** ``S_r = Q_r K^T`` (``[B, H, C, L]``): each rank multiplies its queries with the key
   chunk it holds, then passes that key chunk to the next rank and receives one from the
   previous rank. After ``N`` steps (``N - 1`` transfers) it has seen every key chunk and filled
   every column block of ``S_r``. Softmax (and the padding mask) then run *locally*: a row of
   scores is complete on one rank.
2. **Output** ``O_r = P_r V`` (``[B, H, C, D]``): the same ring, with value chunks.

Backward uses the same two rings (see :class:`RingQK` and :class:`RingAV`):

* the gradient *with respect to the chunk this rank owns* on the left (``dQ_r``, ``dP_r``) needs
  every remote chunk of ``K`` (or ``V``) again: a ring pass like the forward;
* the gradient of a *remote* chunk (``dK_j``, ``dV_j``) gets a contribution from every rank: an
  accumulator for chunk ``j`` travels the ring, each rank adds its share, and it arrives at its
  owner ``j`` after ``N - 1`` hops (a ring reduce).

Only ``Q, K, V`` of the local chunk and the ``[B, H, C, L]`` probabilities are saved for
backward, so activation memory per rank is ``O(L^2 / N + L / N)``: the quadratic term shrinks
with N too. Bytes sent per rank, per attention call (``E = B*C*H*D*itemsize``, one chunk):
forward ``2(N-1)E`` (keys, values), backward ``4(N-1)E`` (keys, values, and the two
accumulators), so ``6(N-1)E`` per training step; all point-to-point ``dist.isend``/``irecv``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.autograd.function import FunctionCtx

from cai_labs.sequence_parallel.chunking import causal_scores, gather_padding_mask, masked_scores

__all__ = ["ring_attention", "RingQK", "RingAV", "ring_pass", "ring_reduce"]


class _Ring:
    """The ranks of a group arranged in a circle: this rank sends right and receives left."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        if self.size > 1:
            ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
            self.next = ranks[(self.rank + 1) % self.size]  # global ranks, as isend expects
            self.prev = ranks[(self.rank - 1) % self.size]

    def start_shift(self, t: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Send ``t`` to the next rank and receive the previous rank's tensor, asynchronously.

        Returns a function that waits and gives the received tensor, so that the caller can
        compute with ``t`` while it travels (compute/communication overlap).
        """
        t = t.contiguous()
        received = torch.empty_like(t)
        reqs = [
            dist.isend(t, self.next, group=self.group),
            dist.irecv(received, self.prev, group=self.group),
        ]

        def wait() -> torch.Tensor:
            for r in reqs:
                r.wait()
            return received

        return wait


def ring_pass(chunk: torch.Tensor, visit: Callable[[int, torch.Tensor], None], ring: _Ring) -> None:
    """Show every rank's ``chunk`` to ``visit(owner, chunk)`` on every rank, via the ring.

    At step ``s`` this rank holds the chunk of rank ``(rank - s) mod N``; it visits it while the
    chunk is already travelling on to the next rank. ``N - 1`` transfers of one chunk each.
    """
    current = chunk
    for step in range(ring.size):
        wait = ring.start_shift(current) if step < ring.size - 1 else None
        visit((ring.rank - step) % ring.size, current)
        if wait is not None:
            current = wait()


def ring_reduce(contribution: Callable[[int], torch.Tensor], ring: _Ring) -> torch.Tensor:
    """Sum over ranks of ``contribution(j)`` for ``j`` = this rank, via a travelling accumulator.

    Every rank can compute its share of every chunk's gradient (``contribution(j)``), but the sum
    belongs to rank ``j``. The accumulator for chunk ``j`` starts on rank ``j+1``, hops right
    collecting each rank's share and ends on rank ``j``: ``N - 1`` transfers of one chunk each,
    the same volume as a reduce-scatter.
    """
    acc = contribution((ring.rank - 1) % ring.size)
    for step in range(1, ring.size):
        acc = ring.start_shift(acc)()
        acc = acc + contribution((ring.rank - 1 - step) % ring.size)
    return acc


class RingQK(torch.autograd.Function):
    """``S_r = Q_r K^T`` with the keys gathered by the ring: ``[B,H,C,D] x [B,H,C,D] -> [B,H,C,L]``.

    Backward: ``dQ_r = dS_r K`` (ring pass of the key chunks again) and
    ``dK_j = sum_r dS_r[:, :, :, j]^T Q_r`` (ring reduce).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, q: torch.Tensor, k: torch.Tensor, ring: _Ring) -> torch.Tensor:
        """Compute the result; see the class docstring."""
        b, h, c, _ = q.shape
        scores = q.new_empty(b, h, c, c * ring.size)

        def visit(owner: int, k_chunk: torch.Tensor) -> None:
            scores[..., owner * c : (owner + 1) * c] = q @ k_chunk.transpose(-2, -1)

        ring_pass(k, visit, ring)
        ctx.save_for_backward(q, k)
        ctx.ring = ring
        return scores

    @staticmethod
    def backward(ctx: FunctionCtx, d_scores: torch.Tensor):
        """Gradients of the inputs; see the class docstring."""
        q, k = ctx.saved_tensors
        ring, c = ctx.ring, q.shape[2]
        d_q = torch.zeros_like(q)

        def visit(owner: int, k_chunk: torch.Tensor) -> None:
            d_q.add_(d_scores[..., owner * c : (owner + 1) * c] @ k_chunk)

        ring_pass(k, visit, ring)
        d_k = ring_reduce(lambda j: d_scores[..., j * c : (j + 1) * c].transpose(-2, -1) @ q, ring)
        return d_q, d_k, None


class RingAV(torch.autograd.Function):
    """``O_r = P_r V`` with the values gathered by the ring: ``[B,H,C,L] x [B,H,C,D] -> [B,H,C,D]``.

    Backward: ``dP_r[:, :, :, j] = dO_r V_j^T`` (ring pass of the value chunks again) and
    ``dV_j = sum_r P_r[:, :, :, j]^T dO_r`` (ring reduce).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, probs: torch.Tensor, v: torch.Tensor, ring: _Ring
    ) -> torch.Tensor:
        """Compute the result; see the class docstring."""
        c = v.shape[2]
        out = torch.zeros_like(v)

        def visit(owner: int, v_chunk: torch.Tensor) -> None:
            out.add_(probs[..., owner * c : (owner + 1) * c] @ v_chunk)

        ring_pass(v, visit, ring)
        ctx.save_for_backward(probs, v)
        ctx.ring = ring
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, d_out: torch.Tensor):
        """Gradients of the inputs; see the class docstring."""
        probs, v = ctx.saved_tensors
        ring, c = ctx.ring, v.shape[2]
        d_probs = torch.empty_like(probs)

        def visit(owner: int, v_chunk: torch.Tensor) -> None:
            d_probs[..., owner * c : (owner + 1) * c] = d_out @ v_chunk.transpose(-2, -1)

        ring_pass(v, visit, ring)
        d_v = ring_reduce(lambda j: probs[..., j * c : (j + 1) * c].transpose(-2, -1) @ d_out, ring)
        return d_probs, d_v, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Softmax attention of this rank's queries over the whole (split) sequence.

    Args:
        q, k, v: this rank's chunk, ``[B, H, C, D]`` each (``C = L / N``, same on every rank).
        key_mask: this rank's padding mask ``[B, C]`` (1 = real token) or None.
        group: the sequence-parallel group (default: all ranks). Ranks are in group order.
        scale: score scale, default ``D ** -0.5``.
        causal: each query sees only keys at its own or earlier global positions (a GPT).

    Returns:
        ``[B, H, C, D]``: rows ``r*C ... (r+1)*C - 1`` of the serial attention output.
    """
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            f"q, k, v must have one shape [B, H, C, D]; got {q.shape}, {k.shape}, {v.shape}"
        )
    ring = _Ring(group)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    full_mask = gather_padding_mask(key_mask, group)  # [B, L]
    scores = RingQK.apply(q * scale, k, ring)  # [B, H, C, L]
    scores = masked_scores(scores, full_mask)
    if causal:  # a row of scores is whole here: mask by global positions
        scores = causal_scores(scores, ring.rank * q.shape[2])
    probs = torch.softmax(scores, dim=-1)
    return RingAV.apply(probs, v, ring)
