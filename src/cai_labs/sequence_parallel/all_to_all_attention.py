"""All-to-all (DeepSpeed-Ulysses) attention: re-shard from sequence chunks to head groups.

Jacobs et al., *DeepSpeed Ulysses* (2023). Attention heads are independent of each other, so
instead of passing key chunks around a ring, swap the layout:

* before attention, one ``all_to_all`` per tensor turns "all ``H`` heads of my ``C = L/N``
  tokens" (``[B, H, C, D]``) into "``H/N`` heads of all ``L`` tokens" (``[B, H/N, L, D]``);
* each rank runs ordinary serial attention on its heads, over the full sequence;
* one ``all_to_all`` turns the output back to ``[B, H, C, D]``.

The backward of an all-to-all is the opposite all-to-all
(:func:`cai_labs.comm.seq_to_heads_group`), so gradients flow through the same exchanges. Bytes
per rank and attention call (``E = B*C*H*D*itemsize``): the all-to-all buffer is ``E`` and a
rank sends ``(N-1)/N * E`` of it; forward does 4 (q, k, v, out), backward 4 more:
``8(N-1)/N * E`` per training step, against ``6(N-1) E`` for the ring: the all-to-all volume
does not grow with ``N``. The price: the number of heads must be divisible by ``N``, which caps
the sequence-parallel degree at ``H``; the ring has no such cap.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cai_labs.comm import heads_to_seq_group, seq_to_heads_group, size
from cai_labs.sequence_parallel.chunking import gather_padding_mask, serial_attention

__all__ = ["all_to_all_attention"]


def all_to_all_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Same contract as :func:`~cai_labs.sequence_parallel.ring_attention.ring_attention`.

    ``q, k, v``: ``[B, H, C, D]`` on each rank; ``key_mask``: ``[B, C]`` or None. Returns this
    rank's rows ``[B, H, C, D]`` of the serial output. ``H`` must be divisible by ``N``.
    """
    n = size(group)
    if q.shape[1] % n:
        raise ValueError(
            f"all-to-all attention splits the {q.shape[1]} heads over {n} ranks; use a number of "
            f"heads divisible by {n}, or ring attention (no such limit)"
        )
    if n == 1:
        return serial_attention(q, k, v, key_mask, scale, causal)
    full_mask = gather_padding_mask(key_mask, group)  # [B, L]
    qh, kh, vh = (seq_to_heads_group(t, group) for t in (q, k, v))  # [B, H/N, L, D]
    out = serial_attention(qh, kh, vh, full_mask, scale, causal)  # every token: serial mask
    return heads_to_seq_group(out, group)
