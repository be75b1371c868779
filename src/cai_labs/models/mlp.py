"""A multi-layer perceptron: the smallest model whose training loop has every part of a big one."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLP"]


class MLP(nn.Sequential):
    """``Linear -> ReLU`` repeated, then a final ``Linear`` to ``out_features`` logits.

    Args:
        in_features: input width (64 for the 8x8 digits).
        hidden: widths of the hidden layers, e.g. ``(256, 256)``.
        out_features: number of classes.
        seed: if given, the weights are initialised from this seed, so that every rank and every
            variant of a tutorial starts from identical weights.

    Input ``(batch, in_features)``, output ``(batch, out_features)``.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: tuple[int, ...] = (256, 256),
        out_features: int = 10,
        seed: int | None = None,
    ) -> None:
        if seed is not None:
            torch.manual_seed(seed)
        widths = (in_features, *hidden)
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], out_features))
        super().__init__(*layers)
