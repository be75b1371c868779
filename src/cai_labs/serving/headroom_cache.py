"""A KV cache whose layers keep spare columns, so that a decoding step writes in place.

transformers' ``DynamicLayer`` appends a step's keys and values with ``torch.cat``: every step
copies every layer's whole cache, ``(b, heads, L, head_dim)`` twice, to add one column. Here a
layer's keys and values are views of buffers with ``spare`` more columns on the right; a step
writes its columns there and widens the view. Only when the spare columns run out (once every
``spare`` steps), or after batch surgery made a fresh tensor, is the cache copied into a new
buffer. Requests joining are written into spare rows the same way
(:meth:`HeadroomLayer.append_rows`). The values are the same either way, only where they are
stored differs.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["HeadroomCache", "HeadroomLayer"]


def _view_of(t: torch.Tensor, buffer: torch.Tensor | None) -> bool:
    """Whether ``t`` is a view of ``buffer`` ``(B, h, cap, d)`` cut along rows and columns only."""
    return (
        buffer is not None
        and t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        and t.stride() == buffer.stride()
    )


def _room(t: torch.Tensor, buffer: torch.Tensor) -> tuple[int, int]:
    """``(rows, columns)`` of ``buffer`` free below and right of its view ``t``."""
    row = buffer.stride(1)  # elements of one (request, head) row of the buffer
    first_row = t.storage_offset() // buffer.stride(0)
    start = (t.storage_offset() % row) // t.shape[3]  # t's first column in the buffer
    return buffer.shape[0] - first_row - t.shape[0], buffer.shape[2] - start - t.shape[2]


class HeadroomLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends in place into buffers with spare columns and rows."""

    spare = 16  # columns: a new buffer every 16 decoding steps
    spare_rows = 8  # rows: requests joining up to this many more need no new buffer

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.buffers: dict[str, torch.Tensor] = {}
        self.keys = self._append("keys", key_states)
        self.values = self._append("values", value_states)
        return self.keys, self.values

    def append_rows(self, keys: torch.Tensor, values: torch.Tensor, pad: int, pad_new: int) -> None:
        """Put the rows ``keys``/``values`` below this layer's, left-padding this layer's rows
        with ``pad`` zero columns and the new ones with ``pad_new``. In place when no old row
        needs padding and the buffers have the rows: then only the new rows are written."""
        for name, new in (("keys", keys), ("values", values)):
            t, buffer = getattr(self, name), self.buffers.get(name)
            n, k, length = t.shape[0], new.shape[0], t.shape[2] + pad
            if pad == 0 and _view_of(t, buffer) and _room(t, buffer)[0] >= k:
                out = t.as_strided((n + k, *t.shape[1:]), t.stride(), t.storage_offset())
                out[n:, :, :pad_new] = 0  # padding must be finite under the mask
            else:
                shape = (n + k + self.spare_rows, t.shape[1], length + self.spare, t.shape[3])
                buffer = self.buffers[name] = t.new_zeros(shape)
                out = buffer[: n + k, :, :length]
                out[:n, :, pad:] = t
            out[n:, :, pad_new:] = new
            setattr(self, name, out)

    def _append(self, name: str, new: torch.Tensor) -> torch.Tensor:
        """``cat([self.<name>, new], -2)``, in place when the buffer has room."""
        t, buffer = getattr(self, name), self.buffers.get(name)
        n, s = (t.shape[2] if t.numel() else 0), new.shape[2]
        if n and t.shape[:2] == new.shape[:2] and _view_of(t, buffer) and _room(t, buffer)[1] >= s:
            out = t.as_strided((*t.shape[:2], n + s, t.shape[3]), t.stride(), t.storage_offset())
        else:
            b, h, _, d = new.shape
            buffer = new.new_empty((b + self.spare_rows, h, n + s + self.spare, d))
            self.buffers[name] = buffer
            out = buffer[:b, :, : n + s]
            if n:
                out[:, :, :n] = t
        out[:, :, n:] = new
        return out


class HeadroomCache(DynamicCache):
    """A ``DynamicCache`` made of :class:`HeadroomLayer` s (created lazily, one per layer)."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=HeadroomLayer)
