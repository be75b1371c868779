"""Ring attention with an online softmax: context parallelism for causal models.

The seed's :mod:`~cai_labs.sequence_parallel.ring_attention` fills each rank's whole
``[B, H, C, L]`` score matrix and keeps the probabilities for backward. Here (Liu et al.,
*Ring Attention*, 2023; the flash-attention recurrence of Dao et al.) a rank never holds more
than one ``[B, H, C/2, C/2]`` score block: for its queries it keeps a running row maximum
``m``, a running sum of exponentials and an output accumulator, both rescaled by
``exp(m_old - m_new)`` whenever a new key block raises the maximum. Only ``q, k, v``, the
output and the log-sum-exp ``m + log(sum)`` (``[B, H, C]``) are saved; backward recomputes each
block's probabilities from the log-sum-exp.

**Pieces and layouts.** The sequence is cut into ``2N`` pieces of ``C/2`` tokens; rank ``r``
holds two of them, in order: ``r`` and ``2N-1-r`` (``"zigzag"``), or ``2r`` and ``2r+1``
(``"contiguous"``). Under a causal mask a query piece ``p`` sees a key piece ``q`` wholly
(``q < p``), on the diagonal (``q == p``, lower triangle) or not at all (``q > p``, skipped). With
contiguous pieces rank 0 computes 3 half-blocks and rank ``N-1`` ``4N-1``; with zig-zag every
rank computes 3 on its own chunk and 2 on every other one (:func:`blocks_per_rank`).

**Ring.** Keys and values travel together (one ``[2, B, H, C, D]`` message, ``N-1`` hops
forward). In backward they travel again, and the gradient accumulator of chunk ``j`` (``dK_j,
dV_j``) starts on rank ``j+1``, follows them round the ring collecting each rank's share and
arrives at its owner after ``N-1`` hops, where the owner's own share is added.
Bytes sent per rank: ``2(N-1)E`` forward, ``4(N-1)E`` backward (``E`` one chunk of keys);
see :mod:`~cai_labs.sequence_parallel.formulas`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import FunctionCtx

from cai_labs.sequence_parallel.ring_attention import _Ring

__all__ = [
    "LAYOUTS",
    "ring_flash_attention",
    "RingFlashAttention",
    "pieces",
    "local_positions",
    "split_layout",
    "blocks_per_rank",
    "online_update",
    "softmax_grad",
    "diagonal_mask",
]

LAYOUTS = ("zigzag", "contiguous")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")


def pieces(rank: int, n: int, layout: str = "zigzag") -> tuple[int, int]:
    """The two pieces (of ``2n``) that ``rank`` holds, in the order its tokens are stored."""
    _check_layout(layout)
    return (rank, 2 * n - 1 - rank) if layout == "zigzag" else (2 * rank, 2 * rank + 1)


def local_positions(rank: int, n: int, seq_len: int, layout: str = "zigzag") -> torch.Tensor:
    """Global positions of the ``seq_len / n`` tokens that ``rank`` holds (int64)."""
    if seq_len % (2 * n):
        lower = seq_len - seq_len % (2 * n)
        raise ValueError(
            f"sequence length {seq_len} does not cut into 2N = {2 * n} equal pieces for {n} "
            f"context-parallel ranks; pad the sequence to {lower + 2 * n} (and mask the "
            f"padding) or cut it to {lower}"
        )
    half = seq_len // (2 * n)
    return torch.cat([torch.arange(p * half, (p + 1) * half) for p in pieces(rank, n, layout)])


def split_layout(
    x: torch.Tensor, rank: int, n: int, dim: int = 2, layout: str = "zigzag"
) -> torch.Tensor:
    """Rank ``rank``'s tokens of the full sequence ``x`` (along ``dim``), as a new tensor."""
    return x.index_select(dim, local_positions(rank, n, x.shape[dim], layout).to(x.device))


def _kind(q_piece: int, k_piece: int, causal: bool) -> str:
    """How query piece ``q_piece`` sees key piece ``k_piece``: full, diagonal or skip."""
    if not causal or k_piece < q_piece:
        return "full"
    return "diagonal" if k_piece == q_piece else "skip"


def blocks_per_rank(rank: int, n: int, layout: str = "zigzag", causal: bool = True) -> int:
    """Half-chunk score blocks (``[C/2, C/2]``) that ``rank`` computes in one forward."""
    mine = pieces(rank, n, layout)
    return sum(
        _kind(a, b, causal) != "skip" for j in range(n) for b in pieces(j, n, layout) for a in mine
    )


def diagonal_mask(size: int, device: torch.device) -> torch.Tensor:
    """True where a query of a diagonal block must *not* see the key (a later position)."""
    return torch.ones(size, size, dtype=torch.bool, device=device).triu(1)


def _block_scores(q: torch.Tensor, k: torch.Tensor, scale: float, kind: str) -> torch.Tensor:
    """``q k^T * scale`` of one block, later keys at ``-inf`` on the diagonal."""
    s = (q @ k.transpose(-2, -1)) * scale
    if kind == "diagonal":
        s = s.masked_fill(diagonal_mask(s.shape[-1], s.device), float("-inf"))
    return s


def online_update(
    state: list[torch.Tensor], s: torch.Tensor, v: torch.Tensor
) -> list[torch.Tensor]:
    """Fold one score block ``s`` ``[B,H,c,c]`` (values ``v``) into ``[m, sum, acc]``.

    The running max ``m`` can only grow; the old sum and accumulator were computed against the
    old max, so both are rescaled by ``exp(m_old - m_new)`` before the block is added.
    """
    m, total, acc = state
    m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
    alpha = torch.exp(m - m_new)
    p = torch.exp(s - m_new)
    return [m_new, alpha * total + p.sum(dim=-1, keepdim=True), alpha * acc + p @ v]


def softmax_grad(p: torch.Tensor, dp: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``dS = P * (dP - delta)``: the softmax's backward for one block. The row sum of
    ``P * dP`` over *all* keys equals ``delta = rowsum(dO * O)``, computed once per query."""
    return p * (dp - delta)


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = x.shape[2] // 2
    return x[:, :, :half], x[:, :, half:]


class _Blocks:
    """The (query piece, key piece) blocks this rank computes against one owner's chunk."""

    def __init__(self, ring: _Ring, layout: str, causal: bool):
        self.mine = pieces(ring.rank, ring.size, layout)
        self.ring, self.layout, self.causal = ring, layout, causal

    def of(self, owner: int) -> list[tuple[int, int, str]]:
        """``(a, b, kind)``: my piece index ``a`` (0/1) sees the owner's piece index ``b``."""
        theirs = pieces(owner, self.ring.size, self.layout)
        out = []
        for a, qp in enumerate(self.mine):
            for b, kp in enumerate(theirs):
                kind = _kind(qp, kp, self.causal)
                if kind != "skip":
                    out.append((a, b, kind))
        return out


def _ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, blocks: _Blocks
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online softmax over every key chunk of the ring; returns ``out`` and ``lse``."""
    ring = blocks.ring
    qs = _split(q)
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    shape = (*q.shape[:2], q.shape[2] // 2)
    states = [
        [
            q.new_full((*shape, 1), float("-inf"), dtype=acc_dtype),
            q.new_zeros((*shape, 1), dtype=acc_dtype),
            q.new_zeros((*shape, q.shape[3]), dtype=acc_dtype),
        ]
        for _ in range(2)
    ]
    kv = torch.stack([k, v])
    for step in range(ring.size):
        wait = ring.start_shift(kv) if step < ring.size - 1 else None
        ks, vs = _split(kv[0]), _split(kv[1])
        for a, b, kind in blocks.of((ring.rank - step) % ring.size):
            s = _block_scores(qs[a], ks[b], scale, kind).to(acc_dtype)
            states[a] = online_update(states[a], s, vs[b].to(acc_dtype))
        if wait is not None:
            kv = wait()
    out = torch.cat([acc / total for _, total, acc in states], dim=2).to(q.dtype)
    lse = torch.cat([(m + torch.log(total)).squeeze(-1) for m, total, _ in states], dim=2)
    return out, lse


def _ring_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    d_out: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    blocks: _Blocks,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv``: blocks recomputed from ``lse``; dK/dV accumulators ride the ring."""
    ring = blocks.ring
    acc_dtype = lse.dtype
    delta = (d_out.to(acc_dtype) * out.to(acc_dtype)).sum(-1, keepdim=True)  # rowsum(dO * O)
    qs, dos = _split(q.to(acc_dtype)), _split(d_out.to(acc_dtype))
    lses, deltas = _split(lse.unsqueeze(-1)), _split(delta)
    dq = torch.zeros_like(q, dtype=acc_dtype)
    dqs = _split(dq)
    kv, own, wait_acc = torch.stack([k, v]), None, None  # travels in the inputs' dtype
    for step in range(ring.size):
        wait_kv = ring.start_shift(kv) if step < ring.size - 1 else None
        ks, vs = _split(kv[0].to(acc_dtype)), _split(kv[1].to(acc_dtype))
        dkv = torch.zeros_like(kv, dtype=acc_dtype)
        dks, dvs = _split(dkv[0]), _split(dkv[1])
        for a, b, kind in blocks.of((ring.rank - step) % ring.size):
            p = torch.exp(_block_scores(qs[a], ks[b], scale, kind) - lses[a])
            ds = softmax_grad(p, dos[a] @ vs[b].transpose(-2, -1), deltas[a])
            dqs[a].add_(ds @ ks[b], alpha=scale)
            dks[b].add_(ds.transpose(-2, -1) @ qs[a], alpha=scale)
            dvs[b].add_(p.transpose(-2, -1) @ dos[a])
        if step == 0:
            own = dkv
        else:
            if wait_acc is not None:  # the accumulator for this owner, from the previous rank
                dkv = dkv + wait_acc()
            wait_acc = ring.start_shift(dkv)
        if wait_kv is not None:
            kv = wait_kv()
    if wait_acc is not None:
        own = own + wait_acc()  # every other rank's share of my chunk, back home
    return dq.to(q.dtype), own[0].to(k.dtype), own[1].to(v.dtype)


class RingFlashAttention(torch.autograd.Function):
    """Causal ring attention with an online softmax; see the module docstring.

    ``q, k, v`` ``[B, H, C, D]`` (this rank's two pieces) -> ``[B, H, C, D]``. Saves
    ``q, k, v``, the output and the log-sum-exp ``[B, H, C]``; no score block outlives its step.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ring: _Ring,
        scale: float,
        layout: str,
        causal: bool,
    ) -> torch.Tensor:
        """Compute the result; see the class docstring."""
        blocks = _Blocks(ring, layout, causal)
        out, lse = _ring_forward(q, k, v, scale, blocks)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.blocks, ctx.scale = blocks, scale
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, d_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Gradients of ``q, k, v``; see the class docstring."""
        q, k, v, out, lse = ctx.saved_tensors
        grads = _ring_backward(q, k, v, d_out, out, lse, ctx.scale, ctx.blocks)
        return *grads, None, None, None, None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            f"q, k, v must have one shape [B, H, C, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if q.shape[2] % 2:
        c = q.shape[2]
        raise ValueError(
            f"each rank holds two pieces of the sequence, so its chunk of {c} tokens must be "
            f"even: the sequence of {n * c} tokens must cut into 2N = {2 * n} pieces; pad it to "
            f"{n * (c + 1)} (and mask the padding)"
        )


def ring_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    scale: float | None = None,
    layout: str = "zigzag",
    causal: bool = True,
) -> torch.Tensor:
    """Softmax attention of this rank's queries over the whole split sequence, blockwise.

    Args:
        q, k, v: this rank's tokens ``[B, H, C, D]`` (``C = L / N``, even, same on every rank),
            in the order of :func:`split_layout` with the same ``layout``.
        group: the context-parallel group (default: all ranks), ranks in group order.
        scale: score scale, default ``D ** -0.5``.
        layout: ``"zigzag"`` (balanced causal work) or ``"contiguous"``.
        causal: each query sees only keys at its own or earlier global positions.

    Returns:
        ``[B, H, C, D]``: the serial attention output at this rank's positions.
    """
    _check_layout(layout)
    ring = _Ring(group)
    _check_inputs(q, k, v, ring.size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return RingFlashAttention.apply(q, k, v, ring, scale, layout, causal)
