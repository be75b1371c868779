"""scikit-learn's bundled handwritten digits (1,797 images of 8x8 pixels), as tensors.

The set ships inside scikit-learn, so it loads with no network. It is small enough that every
tutorial trains on it in seconds on a CPU, and real enough that accuracy means something.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DigitsSplit", "load_digits_split"]


@dataclass(frozen=True)
class DigitsSplit:
    """Train and test tensors. ``x_*``: ``(n, 64)`` float32 in [0, 1]; ``y_*``: ``(n,)`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def images_train(self) -> torch.Tensor:
        """Training images as ``(n, 1, 8, 8)`` for convolutional models."""
        return self.x_train.view(-1, 1, 8, 8)

    @property
    def images_test(self) -> torch.Tensor:
        return self.x_test.view(-1, 1, 8, 8)


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """Shuffle the digits with ``seed`` and split off ``test_fraction`` of them for testing.

    Pixel values (0..16 in the raw set) are scaled to [0, 1].
    """
    from sklearn.datasets import load_digits

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1; got {test_fraction}")
    raw = load_digits()
    order = np.random.default_rng(seed).permutation(len(raw.target))
    x = torch.tensor(raw.data[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(raw.target[order], dtype=torch.int64)
    n_test = int(round(len(y) * test_fraction))
    return DigitsSplit(x[n_test:], y[n_test:], x[:n_test], y[:n_test])
