"""How a sequence is cut over ranks, and the serial attention every variant must equal.

Shapes used throughout :mod:`cai_labs.sequence_parallel`:

* ``B`` batch, ``H`` heads, ``D`` head size, ``L`` full sequence length, ``N`` ranks in the
  sequence-parallel group, ``C = L / N`` the chunk of the sequence one rank holds;
* queries, keys, values on a rank: ``[B, H, C, D]``; rank ``r`` holds tokens
  ``r*C ... (r+1)*C - 1`` (contiguous chunks, in rank order);
* padding mask on a rank: ``[B, C]``, 1 (or True) for a real token, 0 for padding, the
  convention of transformers' ``attention_mask``. Padded *keys* get no attention weight.

Why the length must divide evenly: every rank runs the same collectives on same-sized buffers
(gloo and NCCL require it), and chunk ``r`` must start at ``r*C`` for position ids to be right.
Pad the batch to a multiple of ``N`` (and mask the padding) instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "check_sequence_split",
    "split_sequence",
    "gather_padding_mask",
    "serial_attention",
    "masked_scores",
    "causal_scores",
]


def check_sequence_split(seq_len: int, world_size: int) -> int:
    """Return the chunk length ``seq_len // world_size``; raise if it does not divide evenly."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}")
    if seq_len % world_size:
        lower = seq_len - seq_len % world_size
        raise ValueError(
            f"sequence length {seq_len} does not split evenly over {world_size} sequence-parallel "
            f"ranks; pad the sequence to {lower + world_size} (and mask the padding) or cut it to "
            f"{lower}"
        )
    return seq_len // world_size


def split_sequence(x: torch.Tensor, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s contiguous chunk of ``x`` along ``dim`` (the sequence dimension)."""
    c = check_sequence_split(x.shape[dim], world_size)
    return x.narrow(dim, rank * c, c)


def gather_padding_mask(
    mask: torch.Tensor | None, group: dist.ProcessGroup | None = None
) -> torch.Tensor | None:
    """All ranks' local padding masks ``[B, C]`` joined into the full key mask ``[B, L]`` (bool).

    Every query attends to every key, so each rank needs the mask of all keys. It is tiny
    (``B*L`` bytes) next to the keys themselves, so one all-gather is the simple choice.
    """
    if mask is None:
        return None
    n = dist.get_world_size(group) if dist.is_initialized() else 1
    local = mask.to(torch.uint8).contiguous()
    if n == 1:
        return local.bool()
    parts = [torch.empty_like(local) for _ in range(n)]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=1).bool()


def masked_scores(scores: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Set scores of padded keys to the most negative float, so softmax gives them weight 0.

    ``scores`` ``[B, H, Lq, Lk]``; ``key_mask`` ``[B, Lk]`` bool (True = real token) or None.
    """
    if key_mask is None:
        return scores
    return scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)


def causal_scores(scores: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
    """Hide later keys: query row ``i`` (global position ``row_offset + i``) sees keys
    ``j <= row_offset + i``. ``scores`` ``[B, H, Lq, Lk]``, keys at global positions ``0..Lk-1``."""
    lq, lk = scores.shape[-2:]
    rows = torch.arange(lq, device=scores.device)[:, None] + row_offset
    later = torch.arange(lk, device=scores.device)[None, :] > rows
    return scores.masked_fill(later, torch.finfo(scores.dtype).min)


def serial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Plain softmax attention on one process: the twin every parallel variant must equal.

    ``q, k, v``: ``[B, H, L, D]``; ``key_mask``: ``[B, L]`` (1 = real token) or None;
    ``causal``: each query sees only itself and earlier keys.
    Returns ``[B, H, L, D]``: ``softmax(q k^T * scale + mask) v``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q * scale) @ k.transpose(-2, -1)
    mask = None if key_mask is None else key_mask.bool()
    scores = masked_scores(scores, mask)
    if causal:
        scores = causal_scores(scores)
    return torch.softmax(scores, dim=-1) @ v
