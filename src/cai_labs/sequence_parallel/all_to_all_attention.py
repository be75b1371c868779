"""All-to-all (DeepSpeed-Ulysses) attention: re-shard from sequence chunks to head groups.

Jacobs et al., *DeepSpeed Ulysses* (2023). Attention heads are independent of each other, so
instead of passing key chunks around a ring, swap the layout:

* before attention, one ``all_to_all`` per tensor turns "all ``H`` heads of my ``C = L/N``
  tokens" (``[B, H, C, D]``) into "``H/N`` heads of all ``L`` tokens" (``[B, H/N, L, D]``);
* each rank runs ordinary serial attention on its heads, over the full sequence;
* one ``all_to_all`` turns the output back to ``[B, H, C, D]``.

The backward of an all-to-all is the opposite all-to-all, so gradients flow through the same
exchanges. Bytes per rank and attention call (``E = B*C*H*D*itemsize``): the all-to-all buffer
is ``E`` and a rank sends ``(N-1)/N * E`` of it; forward does 4 (q, k, v, out), backward 4 more:
``8(N-1)/N * E`` per training step, against ``6(N-1) E`` for the ring: the all-to-all volume
does not grow with ``N``. The price: the number of heads must be divisible by ``N``, which caps
the sequence-parallel degree at ``H``; the ring has no such cap.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cai_labs.sequence_parallel.chunking import gather_padding_mask, serial_attention

__all__ = ["all_to_all_attention", "SeqToHeads", "HeadsToSeq", "seq_to_heads", "heads_to_seq"]


def _group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``[B, H, C, D]`` (all heads, my tokens) -> ``[B, H/N, N*C, D]`` (my heads, all tokens)."""
    n = _group_size(group)
    b, h, c, d = x.shape
    # Piece i (heads i*H/N ...) goes to rank i: put the piece index first and make it contiguous.
    send = x.reshape(b, n, h // n, c, d).transpose(0, 1).contiguous()  # [N, B, H/N, C, D]
    recv = torch.empty_like(send)  # piece i now holds rank i's tokens of my heads
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * c, d)


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``[B, H/N, N*C, D]`` (my heads, all tokens) -> ``[B, H, C, D]`` (all heads, my tokens)."""
    n = _group_size(group)
    b, hn, length, d = x.shape
    c = length // n
    send = x.reshape(b, hn, n, c, d).permute(2, 0, 1, 3, 4).contiguous()  # [N, B, H/N, C, D]
    recv = torch.empty_like(send)  # piece i now holds head group i of my tokens
    dist.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape(b, n * hn, c, d)


class SeqToHeads(torch.autograd.Function):
    """:func:`seq_to_heads` whose backward is :func:`heads_to_seq` of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        """Compute the result; see the class docstring."""
        ctx.group = group
        return seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        """Gradients of the inputs; see the class docstring."""
        return heads_to_seq(grad, ctx.group), None


class HeadsToSeq(torch.autograd.Function):
    """:func:`heads_to_seq` whose backward is :func:`seq_to_heads` of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        """Compute the result; see the class docstring."""
        ctx.group = group
        return heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        """Gradients of the inputs; see the class docstring."""
        return seq_to_heads(grad, ctx.group), None


def all_to_all_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Same contract as :func:`~cai_labs.sequence_parallel.ring_attention.ring_attention`.

    ``q, k, v``: ``[B, H, C, D]`` on each rank; ``key_mask``: ``[B, C]`` or None. Returns this
    rank's rows ``[B, H, C, D]`` of the serial output. ``H`` must be divisible by ``N``.
    """
    n = _group_size(group)
    if q.shape[1] % n:
        raise ValueError(
            f"all-to-all attention splits the {q.shape[1]} heads over {n} ranks; use a number of "
            f"heads divisible by {n}, or ring attention (no such limit)"
        )
    if n == 1:
        return serial_attention(q, k, v, key_mask, scale)
    full_mask = gather_padding_mask(key_mask, group)  # [B, L]
    qh, kh, vh = (SeqToHeads.apply(t, group) for t in (q, k, v))  # [B, H/N, L, D]
    out = serial_attention(qh, kh, vh, full_mask, scale)
    return HeadsToSeq.apply(out, group)
