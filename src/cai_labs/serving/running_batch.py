"""The running batch of continuous batching: requests decoded together and their KV cache.

Every row is one request. Its keys and values live in a transformers ``DynamicCache`` whose
layers hold ``(b, heads, L, head_dim)`` tensors, **left**-padded to the longest row ``L``; the
mask ``(b, L)`` marks real positions with 1 (OPT derives its position ids from it, so a padded
row computes what the request computes alone). A request joins by concatenating its own cache,
made by its prefill, padded to a common length (:meth:`RunningBatch.extend`), or is prefilled
inside a decoding step (:meth:`RunningBatch.add_rows`, then :meth:`RunningBatch.close_gap`); it
leaves by dropping its row (a row from the end moves into its place, so only moved rows are
copied), after which columns that only held padding are cut (:meth:`RunningBatch.keep`). This
is the batch surgery of Orca-style iteration-level scheduling on a contiguous cache.
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
        """Keep only ``rows`` (increasing), then cut leading columns that are padding in all.

        Each leaving row's place is taken by a kept row from the end of the batch, copied in
        place; the batch is then the first ``len(rows)`` rows, a view. A leave thus copies the
        rows moved, not the whole cache (which every layer's keys and values would cost).
        """
        n, kept = len(rows), set(rows)
        movers = iter(r for r in rows if r >= n)
        order = [i if i in kept else next(movers) for i in range(n)]
        index = torch.tensor(order, dtype=torch.long)
        self.seqs = [self.seqs[i] for i in order]
        self.mask = self.mask[index]
        self.last = self.last[index]
        holes = torch.tensor([i for i in range(n) if i not in kept], dtype=torch.long)
        with torch.inference_mode():  # the cache's tensors were made in inference mode
            for layer in self.cache.layers:
                if len(holes):
                    layer.keys[holes] = layer.keys[index[holes]]
                    layer.values[holes] = layer.values[index[holes]]
                layer.keys, layer.values = layer.keys[:n], layer.values[:n]
        self._trim()

    def _trim(self) -> None:
        real = self.mask.any(dim=0)
        start = int(real.float().argmax()) if bool(real.any()) else self.length
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, start:]
                layer.values = layer.values[:, :, start:]

    def add_rows(self, n: int) -> None:
        """Append ``n`` rows of padding to the cache (new requests prefilled by the next step)."""
        for layer in self.cache.layers:
            layer.keys = torch.cat([layer.keys, layer.keys.new_zeros((n, *layer.keys.shape[1:]))])
            layer.values = torch.cat(
                [layer.values, layer.values.new_zeros((n, *layer.values.shape[1:]))]
            )

    def close_gap(self, rows: int, at: int, size: int) -> None:
        """The first ``rows`` rows hold ``size`` padding columns at ``at``: move them to the
        front of those rows (masked either way; at the front they can be cut)."""
        if size == 0:
            return

        def move(t: torch.Tensor, dim: int) -> torch.Tensor:
            old, end = t[:rows], t.shape[dim] - at - size
            parts = [old.narrow(dim, at, size), old.narrow(dim, 0, at)]
            moved = torch.cat([*parts, old.narrow(dim, at + size, end)], dim)
            return torch.cat([moved, t[rows:]])

        self.mask = move(self.mask, 1)
        for layer in self.cache.layers:
            layer.keys, layer.values = move(layer.keys, 2), move(layer.values, 2)
        self._trim()

    def extend(self, other: RunningBatch) -> None:
        """Append ``other``'s rows, left-padding the shorter of the two caches (in place when
        the running rows need no padding: only the new rows are copied)."""
        length = max(self.length, other.length)
        a, b = length - self.length, length - other.length
        self.mask = torch.cat([_pad_left(self.mask, a), _pad_left(other.mask, b)])
        self.last = torch.cat([self.last, other.last])
        self.seqs = self.seqs + other.seqs
        with torch.inference_mode():
            for mine, theirs in zip(self.cache.layers, other.cache.layers):
                mine.append_rows(theirs.keys, theirs.values, a, b)

    def kv_bytes(self) -> int:
        """Bytes held by the cache's keys and values (padding included)."""
        return sum(
            layer.keys.numel() * layer.keys.element_size() * 2 for layer in self.cache.layers
        )
