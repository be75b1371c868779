"""A small 1-D convolutional network for MNIST-1D, with normalisation layers and biases.

Three convolutions (the last two halve the length), each followed by GroupNorm and ReLU, then a
linear classifier. GroupNorm rather than BatchNorm on purpose: its statistics are per sample, so
a data-parallel run equals the serial run exactly (BatchNorm would normalise each rank's slice
with that slice's own statistics). Its scale and shift, and the biases, are the tensors that
LARS/LAMB recipes exclude from weight decay and trust ratios.

Input ``(batch, length)`` or ``(batch, 1, length)``; output ``(batch, classes)`` logits.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CNN1d"]


class CNN1d(nn.Module):
    """``conv(k=5) -> GN -> ReLU`` x3 (strides 1, 2, 2) -> flatten -> linear.

    Args:
        length: input length (40 for MNIST-1D); must be divisible by 4.
        channels: output channels of the three convolutions.
        classes: number of logits.
        groups: GroupNorm groups (must divide every channel count).
        seed: if given, weights are initialised from this seed (identical on every rank).
    """

    def __init__(
        self,
        length: int = 40,
        channels: tuple[int, int, int] = (16, 32, 32),
        classes: int = 10,
        groups: int = 4,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if length % 4:
            raise ValueError(f"length must be divisible by 4 (two stride-2 convs); got {length}")
        if any(c % groups for c in channels):
            raise ValueError(f"groups={groups} must divide every channel count {channels}")
        if seed is not None:
            torch.manual_seed(seed)
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            nn.Conv1d(1, c1, 5, padding=2),
            nn.GroupNorm(groups, c1),
            nn.ReLU(),
            nn.Conv1d(c1, c2, 5, stride=2, padding=2),
            nn.GroupNorm(groups, c2),
            nn.ReLU(),
            nn.Conv1d(c2, c3, 5, stride=2, padding=2),
            nn.GroupNorm(groups, c3),
            nn.ReLU(),
        )
        self.head = nn.Linear(c3 * (length // 4), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)  # (batch, length) -> (batch, 1, length)
        return self.head(self.features(x).flatten(1))
