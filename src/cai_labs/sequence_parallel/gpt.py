"""A GPT's attention and positions on one chunk of the sequence (causal sequence parallelism).

Each of the ``N`` ranks of the SP group holds ``C = L/N`` consecutive tokens. Everything but
attention works token by token, so only two modules change: :class:`ChunkAttention` (the same
weights, the ring or all-to-all attention with the causal mask at global positions) and
:class:`OffsetPositions` (position ids start at ``rank * C``).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from cai_labs.models.gpt import CausalSelfAttention
from cai_labs.sequence_parallel.all_to_all_attention import all_to_all_attention
from cai_labs.sequence_parallel.ring_attention import ring_attention
from cai_labs.sequence_parallel.ring_flash import ring_flash_attention

__all__ = ["ChunkAttention", "OffsetPositions", "SP_ATTENTION"]

#: The attention of each ``sp_attention`` choice of a layout. The online-softmax ring runs on
#: the contiguous chunks every layout cuts (its zig-zag layout would reorder tokens and targets).
SP_ATTENTION = {
    "ring": ring_attention,
    "all_to_all": all_to_all_attention,
    "ring_flash": functools.partial(ring_flash_attention, layout="contiguous"),
}


class ChunkAttention(nn.Module):
    """:class:`~cai_labs.models.gpt.CausalSelfAttention` on ``(b, C, d)``: this rank's tokens.

    Shares ``qkv`` and ``proj`` with ``attn`` (the serial weights); returns ``(b, C, d)``.
    """

    def __init__(self, attn: CausalSelfAttention, group: dist.ProcessGroup, kind: str = "ring"):
        super().__init__()
        self.qkv, self.proj, self.n_heads = attn.qkv, attn.proj, attn.n_heads
        self.group, self.attend = group, SP_ATTENTION[kind]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, c, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = self.attend(q, k, v, group=self.group, causal=True)  # [b, H, C, D]
        return self.proj(out.transpose(1, 2).reshape(b, c, d))


class OffsetPositions(nn.Module):
    """A position embedding whose ids start at ``offset`` (this rank's first token)."""

    def __init__(self, emb: nn.Embedding, offset: int):
        super().__init__()
        self.emb, self.offset = emb, offset

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return self.emb(pos + self.offset)
