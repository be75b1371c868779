"""Masked-language-model batches (BERT's pre-training task) from a stream of token ids.

BERT's recipe: choose 15 % of the real tokens as targets; replace 80 % of them by ``[MASK]``,
10 % by a random token, keep 10 %; the model must predict the original token at each target.
Labels are ``-100`` (ignored by the loss) everywhere else.

Rows may end in padding (``pad_fraction`` of the rows get a random real length, the rest is
``[PAD]`` with ``attention_mask`` 0), so that attention masks are exercised as in real batches.
Every batch is a pure function of ``(seed, step)``: every rank can build the same global batch
and take its own slice, and a serial run sees exactly the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MLMBatch", "mlm_batch"]


@dataclass
class MLMBatch:
    """``input_ids``, ``attention_mask``, ``labels``: ``[B, L]`` each (long)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def mlm_batch(
    stream: torch.Tensor,
    batch_size: int,
    seq_len: int,
    step: int,
    *,
    vocab_size: int,
    mask_id: int,
    pad_id: int = 0,
    first_normal_id: int = 5,
    mask_prob: float = 0.15,
    pad_fraction: float = 0.5,
    seed: int = 0,
) -> MLMBatch:
    """The MLM batch number ``step``: random windows of ``stream``, masked as BERT does."""
    if len(stream) <= seq_len:
        raise ValueError(f"the token stream ({len(stream)} ids) is shorter than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=g)
    ids = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
    # Padding at the end of some rows.
    lengths = torch.full((batch_size,), seq_len)
    padded = torch.rand(batch_size, generator=g) < pad_fraction
    lengths[padded] = torch.randint(seq_len // 2, seq_len, (int(padded.sum()),), generator=g)
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(attention_mask == 0, pad_id)
    # BERT masking on real tokens only.
    target = (torch.rand(batch_size, seq_len, generator=g) < mask_prob) & (attention_mask == 1)
    target[:, 0] |= ~target.any(1)  # at least one target per row keeps the loss defined
    labels = ids.masked_fill(~target, -100)
    action = torch.rand(batch_size, seq_len, generator=g)
    inputs = ids.clone()
    inputs[target & (action < 0.8)] = mask_id
    rand = target & (action >= 0.8) & (action < 0.9)
    inputs[rand] = torch.randint(first_normal_id, vocab_size, (int(rand.sum()),), generator=g)
    return MLMBatch(inputs, attention_mask, labels)
