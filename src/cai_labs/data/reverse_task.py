"""A fine-tuning task with an exact answer: reverse a short word.

``"reverse abcd =>"`` must be completed with ``" dcba."``. The answer is checkable character for
character, so "did fine-tuning work" is one number: the exact-match accuracy of greedy
generation on held-out words, before and after. All words of one task have the same length, so
every prompt tokenises to the same number of characters and batches need no padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["ReverseTask", "make_reverse_task"]


@dataclass(frozen=True)
class ReverseTask:
    """Train and test words, and how to turn a word into a prompt and its answer."""

    train_words: tuple[str, ...]
    test_words: tuple[str, ...]

    @staticmethod
    def prompt(word: str) -> str:
        """What the model is given: ``"reverse abcd =>"``."""
        return f"reverse {word} =>"

    @staticmethod
    def answer(word: str) -> str:
        """What it must produce after the prompt: ``" dcba."``."""
        return f" {word[::-1]}."

    @property
    def word_length(self) -> int:
        return len(self.train_words[0])


def make_reverse_task(
    length: int = 4, alphabet: str = "abcdefgh", n_test: int = 64, seed: int = 0
) -> ReverseTask:
    """Every word of ``length`` letters from ``alphabet``, split into train and ``n_test`` test.

    Test words never appear in training, so exact match on them measures the learned rule, not
    memorisation.
    """
    if length < 1 or len(alphabet) < 2:
        raise ValueError("need length >= 1 and an alphabet of at least 2 letters")
    rng = random.Random(seed)
    n_all = len(alphabet) ** length
    if n_test >= n_all:
        raise ValueError(f"n_test={n_test} leaves no training words out of {n_all}; lower it")
    words: set[str] = set()
    target = min(n_all, 4000)
    while len(words) < target:
        words.add("".join(rng.choice(alphabet) for _ in range(length)))
    ordered = sorted(words)
    rng.shuffle(ordered)
    return ReverseTask(tuple(ordered[n_test:]), tuple(ordered[:n_test]))
