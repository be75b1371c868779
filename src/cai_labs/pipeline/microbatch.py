"""Micro-batches: the pipeline's unit of work.

A pipeline of ``p`` stages with one batch keeps ``p - 1`` stages idle at any moment. Cutting the
batch of ``B`` samples into ``m`` micro-batches of ``B/m`` lets stage ``s`` work on micro-batch
``i`` while stage ``s+1`` works on ``i-1``. Because the loss is a mean over samples, the loss of
the batch is the mean of the ``m`` micro-batch losses, and accumulating the gradients of
``loss_i / m`` over the micro-batches gives exactly the gradient of the full batch.
Unequal micro-batches would weight samples unequally, so ``m`` must divide ``B``.
"""

from __future__ import annotations

import torch

__all__ = ["split_microbatches"]


def split_microbatches(batch: torch.Tensor, n_micro: int) -> list[torch.Tensor]:
    """Split ``batch`` ``(B, ...)`` into ``n_micro`` tensors of ``(B / n_micro, ...)``."""
    if n_micro < 1:
        raise ValueError(f"need at least one micro-batch; got {n_micro}")
    b = batch.shape[0]
    if b % n_micro:
        raise ValueError(
            f"{n_micro} micro-batches do not divide a batch of {b} samples; pick a number of "
            f"micro-batches that divides {b} (or a batch size divisible by {n_micro})"
        )
    return list(batch.chunk(n_micro))
