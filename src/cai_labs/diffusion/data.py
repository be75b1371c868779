"""Handwritten digits as a text-to-image data set: upscaled images with generated captions.

scikit-learn's digits are 8x8 with 17 grey levels. A diffusion UNet halves the resolution at each
down block, so 8x8 leaves room for one halving only; we upscale bilinearly to ``size`` x ``size``
(16 by default) and map pixels to [-1, 1], the range the noise schedule assumes (pure noise has
unit variance, so data should be of that scale).

Each image gets a caption drawn from several templates ("a handwritten digit seven",
"digit 7", "the number seven", ...), so that the model learns that the words and the numeral
mean the same class and a short prompt like "digit 7" is in distribution at sampling time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cai_labs.data.digits import load_digits_split
from cai_labs.diffusion.tokenizer import DIGIT_WORDS

__all__ = [
    "CAPTION_TEMPLATES",
    "CaptionedDigits",
    "caption",
    "load_captioned_digits",
    "prompt_for",
    "upscale",
]

CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "digit {n}",
    "the number {word}",
    "a picture of the digit {n}",
    "handwritten {n}",
    "{word}",
)


def caption(label: int, template: int) -> str:
    """The caption of class ``label`` under template number ``template`` (taken modulo)."""
    fmt = CAPTION_TEMPLATES[template % len(CAPTION_TEMPLATES)]
    return fmt.format(word=DIGIT_WORDS[label], n=label)


def prompt_for(label: int) -> str:
    """The sampling prompt of the tutorial: ``"digit 7"``."""
    return f"digit {label}"


def upscale(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(n, 1, 8, 8)`` in [0, 1] -> ``(n, 1, size, size)`` in [-1, 1] (bilinear)."""
    if size < 8 or size % 4:
        raise ValueError(f"size must be a multiple of 4 and at least 8; got {size}")
    up = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return up.clamp(0, 1) * 2 - 1


@dataclass(frozen=True)
class CaptionedDigits(torch.utils.data.Dataset):
    """``(image (1, size, size) in [-1, 1], caption str, label int)`` triples.

    The caption template of sample ``i`` is ``i % len(CAPTION_TEMPLATES)`` shifted by ``epoch``-free
    hashing of the index, so the set is deterministic (every rank sees the same captions) while
    each class appears under every template.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, int]:
        label = int(self.labels[i])
        return self.images[i], caption(label, (i * 7) // 3), label


def load_captioned_digits(size: int = 16, seed: int = 0) -> tuple[CaptionedDigits, CaptionedDigits]:
    """Train and test sets of captioned, upscaled digits (the split of
    :func:`~cai_labs.data.digits.load_digits_split`)."""
    split = load_digits_split(seed=seed)
    return (
        CaptionedDigits(upscale(split.images_train, size), split.y_train),
        CaptionedDigits(upscale(split.images_test, size), split.y_test),
    )
