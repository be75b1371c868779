"""The running batch of continuous batching: requests decoded together and their KV cache.

Every row is one request. Its keys and values live in a transformers ``DynamicCache`` whose
layers hold ``(b, heads, L, head_dim)`` tensors, **left**-padded to the longest row ``L``; the
mask ``(b, L)`` marks real positions with 1 (OPT derives its position ids from it, so a padded
row computes what the request computes alone). A request joins by concatenating its own cache,
made by its prefill, padded to a common length (:meth:`RunningBatch.extend`); it leaves by
dropping its row, after which columns that only held padding are cut (:meth:`RunningBatch.keep`).
This is the batch surgery of Orca-style iteration-level scheduling on a contiguous cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["RunningBatch"]


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """Pad the sequence axis (-2 for keys/values, -1 for masks) of ``t`` with ``n`` zeros."""
    if n == 0:
        return t
    return F.pad(t, (0, 0, n, 0)) if t.dim() == 4 else F.pad(t, (n, 0))


@dataclass
class RunningBatch:
    """Rows ``seqs``, their ``cache`` and ``mask (b, L)``, and each row's last token ``(b,)``."""

    seqs: list[Any]
    cache: Any
    mask: torch.Tensor
    last: torch.Tensor

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def length(self) -> int:
        """Padded length ``L`` of the cache."""
        return self.mask.shape[1]

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order), then cut leading columns that are padding in all."""
        index = torch.tensor(rows, dtype=torch.long)
        self.seqs = [self.seqs[i] for i in rows]
        self.mask = self.mask[index]
        self.last = self.last[index]
        real = self.mask.any(dim=0)
        start = int(real.float().argmax()) if bool(real.any()) else self.length
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def extend(self, other: RunningBatch) -> None:
        """Append ``other``'s rows, left-padding the shorter of the two caches."""
        length = max(self.length, other.length)
        a, b = length - self.length, length - other.length
        self.mask = torch.cat([_pad_left(self.mask, a), _pad_left(other.mask, b)])
        self.last = torch.cat([self.last, other.last])
        self.seqs = self.seqs + other.seqs
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, a), _pad_left(theirs.keys, b)])
            mine.values = torch.cat([_pad_left(mine.values, a), _pad_left(theirs.values, b)])

    def kv_bytes(self) -> int:
        """Bytes held by the cache's keys and values (padding included)."""
        return sum(
            layer.keys.numel() * layer.keys.element_size() * 2 for layer in self.cache.layers
        )
