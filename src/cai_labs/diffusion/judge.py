"""A digit classifier trained on the real digits, used to score generated images.

"Does the sample for the prompt 'digit 7' look like a 7?" is measured by a judge that never saw a
generated image: an :class:`~cai_labs.models.MLP` trained on the real, upscaled digits. The score
of a generator is the fraction of its samples that the judge assigns to the prompted class; a
generator that ignores the prompt scores about 10% (one class in ten), whatever its image quality.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cai_labs.diffusion.data import load_captioned_digits
from cai_labs.models.mlp import MLP

__all__ = ["train_digit_classifier", "classify", "prompt_accuracy"]


def train_digit_classifier(
    size: int = 16, epochs: int = 30, seed: int = 0, noise: float = 0.1
) -> tuple[MLP, float]:
    """Train an MLP on real ``(size x size)`` digits in [-1, 1]; return it and its test accuracy.

    ``noise``: std of Gaussian noise added to training images, so the judge does not hinge on
    pixel-perfect strokes (generated images are a little noisy).
    """
    train, test = load_captioned_digits(size=size, seed=seed)
    torch.manual_seed(seed)
    model = MLP(in_features=size * size, hidden=(128,), seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = train.images.flatten(1), train.labels
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), 128):
            idx = order[start : start + 128]
            xb = x[idx] + noise * torch.randn(x[idx].shape, generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(xb), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(test.images.flatten(1)).argmax(1) == test.labels).float().mean().item()
    return model, acc


@torch.no_grad()
def classify(model: MLP, images: torch.Tensor) -> torch.Tensor:
    """Predicted classes ``(n,)`` of images ``(n, 1, size, size)`` in [-1, 1]."""
    return model(images.flatten(1)).argmax(1)


def prompt_accuracy(model: MLP, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` that the judge assigns to their prompted ``labels``."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return (classify(model, images) == labels).float().mean().item()
