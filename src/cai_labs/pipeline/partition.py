"""Cut a GPT into pipeline stages: contiguous runs of blocks, embeddings first, head last.

Pipeline parallelism gives each of ``p`` ranks a *stage*: a contiguous slice of the layers. Stage
0 also owns the token and position embeddings (it turns token ids ``(b, s)`` into activations
``(b, s, d)``); the last stage also owns the final layer norm and the vocabulary head (it turns
``(b, s, d)`` into logits ``(b, s, V)``). Between stages only the activation ``(b, s, d)`` travels
forward and its gradient travels back.

The blocks are divided as evenly as possible, earlier stages taking the remainder; a stage with
no block would do nothing useful, so more stages than blocks is an error.

Interleaved 1F1B cuts the model into ``p v`` *virtual* stages and gives rank ``r`` the chunks
``r, r + p, ..., r + (v - 1) p`` (:func:`virtual_stages`), round-robin, so that a micro-batch
visits every rank once per chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cai_labs.models.gpt import GPT

__all__ = ["partition_layers", "virtual_stages", "GPTStage"]


def partition_layers(n_layers: int, n_stages: int) -> list[range]:
    """The block indices of each stage: ``n_stages`` contiguous, near-equal ranges.

    >>> partition_layers(5, 2)
    [range(0, 3), range(3, 5)]
    """
    if n_stages < 1:
        raise ValueError(f"need at least one pipeline stage; got {n_stages}")
    if n_stages > n_layers:
        raise ValueError(
            f"cannot split {n_layers} transformer blocks into {n_stages} pipeline stages: every "
            f"stage needs at least one block; use pp <= {n_layers} or raise n_layers"
        )
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def virtual_stages(rank: int, n_stages: int, chunks: int) -> list[int]:
    """The virtual stages pipeline rank ``rank`` of ``n_stages`` holds under interleaving with
    ``chunks`` chunks per rank: chunk ``c`` is virtual stage ``c * n_stages + rank``.

    >>> virtual_stages(1, 4, 2)
    [1, 5]
    """
    if not 0 <= rank < n_stages or chunks < 1:
        raise ValueError(
            f"need 0 <= rank < n_stages and chunks >= 1; got {rank}, {n_stages}, {chunks}"
        )
    return [c * n_stages + rank for c in range(chunks)]


class GPTStage(nn.Module):
    """Stage ``stage`` of ``n_stages`` of a :class:`~cai_labs.models.gpt.GPT`.

    Built from a whole serial ``GPT`` (so every layout starts from the same weights): it keeps
    references to the submodules of its slice, the rest of the model can be dropped.

    * first stage: input token ids ``(b, s)`` int64, else activations ``(b, s, d)``;
    * last stage: output logits ``(b, s, V)``, else activations ``(b, s, d)``.

    Tensor-parallel layouts replace ``blocks`` by their parallel twins after construction and
    set ``enter_blocks`` / ``leave_blocks``: the functions that turn the whole activation
    ``(b, s, d)`` into this rank's part of it after the embeddings (first stage), and back
    before the final norm (last stage). Between stages the partitioned activation travels.
    """

    def __init__(self, gpt: GPT, stage: int, n_stages: int):
        super().__init__()
        ranges = partition_layers(gpt.cfg.n_layers, n_stages)
        if not 0 <= stage < n_stages:
            raise ValueError(f"stage must be in [0, {n_stages}); got {stage}")
        self.cfg = gpt.cfg
        self.stage, self.n_stages = stage, n_stages
        self.layer_ids = ranges[stage]
        self.is_first, self.is_last = stage == 0, stage == n_stages - 1
        self.blocks = nn.ModuleList(gpt.blocks[i] for i in self.layer_ids)
        if self.is_first:
            self.tok_emb, self.pos_emb = gpt.tok_emb, gpt.pos_emb
        if self.is_last:
            self.ln_f, self.head = gpt.ln_f, gpt.head
        self.enter_blocks: Callable[[torch.Tensor], torch.Tensor] = _identity
        self.leave_blocks: Callable[[torch.Tensor], torch.Tensor] = _identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            s = x.shape[1]
            x = self.tok_emb(x) + self.pos_emb(torch.arange(s, device=x.device))
            x = self.enter_blocks(x)
        for block in self.blocks:
            x = block(x)
        if self.is_last:
            x = self.head(self.ln_f(self.leave_blocks(x)))
        return x


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
