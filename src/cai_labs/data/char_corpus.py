"""Character-level text from the Python standard library's own docstrings, offline.

Why this data: a language model needs real text with real structure, and every Python install
ships a few hundred kilobytes of carefully written English prose about programming inside its
modules' docstrings. Gathering them with :func:`inspect.getdoc` needs no network and no download,
and the same Python version always yields the same text. The task has a measurable answer: the
cross-entropy of the next character. A model that learned nothing scores ``ln(vocab_size)``
nats per character; the unigram (letter-frequency) entropy of the text is the first bar a
model must get under, and lower is better from there.

Characters are mapped to ids by frequency: the ``vocab_size - 1`` most frequent characters get
their own id, every rarer character shares the last id. Token tensors are ``int64``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from cai_labs.data.stdlib_text import stdlib_text

__all__ = ["DOC_MODULES", "CharCorpus", "load_char_corpus"]

#: Standard-library modules whose docstrings form the corpus (pure Python, always installed).
DOC_MODULES: tuple[str, ...] = (
    "abc",
    "argparse",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "glob",
    "gzip",
    "heapq",
    "inspect",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "operator",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "shlex",
    "shutil",
    "statistics",
    "string",
    "subprocess",
    "tempfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "weakref",
    "zipfile",
)


@dataclass(frozen=True)
class CharCorpus:
    """Encoded text split into train and validation ids, and the character table.

    ``train``/``valid``: 1-D ``int64`` tensors of character ids. ``chars[i]`` is the character of
    id ``i`` (the last id stands for every rarer character).
    """

    train: torch.Tensor
    valid: torch.Tensor
    chars: str
    unigram_entropy: float  # nats per character of the training text's id frequencies

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def batch(
        self, step: int, batch_size: int, seq_len: int, split: str = "train", seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``step``: ``(x, y)`` each ``(batch_size, seq_len)``, ``y`` = ``x`` shifted.

        Windows start at positions drawn from a generator seeded by ``(seed, step)``, so every rank
        draws the same batch for the same step without communicating.
        """
        data = self.train if split == "train" else self.valid
        if len(data) <= seq_len + 1:
            raise ValueError(f"{split} text has {len(data)} characters; need > {seq_len + 1}")
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=g)
        offsets = torch.arange(seq_len + 1)
        windows = data[starts[:, None] + offsets]  # (batch, seq_len + 1)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def load_char_corpus(
    vocab_size: int = 64, valid_fraction: float = 0.1, modules: tuple[str, ...] = DOC_MODULES
) -> CharCorpus:
    """Gather the docstrings, map characters to ``vocab_size`` ids, split off validation text."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2; got {vocab_size}")
    text = stdlib_text(modules)
    counts = Counter(text)
    common = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    chars = "".join(common[: vocab_size - 1])
    other = "\N{REPLACEMENT CHARACTER}"
    lookup = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([lookup.get(c, vocab_size - 1) for c in text], dtype=torch.int64)
    n_valid = int(len(ids) * valid_fraction)
    train, valid = ids[: len(ids) - n_valid], ids[len(ids) - n_valid :]
    freq = torch.bincount(train, minlength=vocab_size).double() / len(train)
    entropy = -sum(p * math.log(p) for p in freq.tolist() if p > 0)
    return CharCorpus(train, valid, chars + other, entropy)
