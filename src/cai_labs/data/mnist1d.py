"""MNIST-1D (Greydanus 2020), regenerated procedurally: as many samples as a batch sweep needs.

Each sample is one of ten 1-D digit templates, padded, scaled, sheared, translated and noised,
then resampled to 40 points. The generator ships in the ``mnist1d`` package, so the set is built
offline, reproducibly from a seed, and at any size: the 4,000 training samples of the original
release are too few for batches of 4,096, so we generate more. A linear model gets about a third
of it right and a small CNN most of it, so the set separates optimizers better than 8x8 digits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Mnist1dSplit", "load_mnist1d_split"]


@dataclass(frozen=True)
class Mnist1dSplit:
    """``x_*``: ``(n, 40)`` float32, zero mean, unit variance; ``y_*``: ``(n,)`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_mnist1d_split(num_train: int = 8192, num_test: int = 2048, seed: int = 42) -> Mnist1dSplit:
    """Generate ``num_train + num_test`` samples with ``mnist1d.data.make_dataset`` and split them.

    Generation costs about 0.2 ms of CPU per sample. ``num_train + num_test`` must be a multiple
    of 10 (the generator makes equally many samples of each class).
    """
    from mnist1d.data import get_dataset_args, make_dataset

    total = num_train + num_test
    if num_train <= 0 or num_test <= 0 or total % 10:
        raise ValueError(
            f"num_train and num_test must be positive and their sum a multiple of 10 "
            f"(one tenth per class); got num_train={num_train}, num_test={num_test}"
        )
    args = get_dataset_args()
    args.num_samples = total
    args.train_split = num_train / total
    args.seed = seed
    raw = make_dataset(args)
    x = torch.tensor(raw["x"], dtype=torch.float32)
    y = torch.tensor(raw["y"], dtype=torch.int64)
    xt = torch.tensor(raw["x_test"], dtype=torch.float32)
    yt = torch.tensor(raw["y_test"], dtype=torch.int64)
    if len(y) != num_train:  # int(total * split) rounded down
        x, y, xt, yt = (
            torch.cat([x, xt])[:num_train],
            torch.cat([y, yt])[:num_train],
            torch.cat([x, xt])[num_train:],
            torch.cat([y, yt])[num_train:],
        )
    return Mnist1dSplit(x, y, xt, yt)
