"""One chunk: a fixed-size flat buffer of model state with a home in host memory.

Colossal-AI's Gemini stores parameters (and, for the optimizer, master weights and Adam moments)
in *chunks* of a fixed number of elements rather than tensor by tensor: moving one 64 MB chunk is
far more efficient than moving thousands of small tensors, and equal sizes make placement a
simple bin problem. Tensors are packed into a chunk in model order; a tensor never straddles two
chunks, so the chunk size must be at least the largest tensor.

``host`` always holds the chunk's values (``(numel,)``, the backing store). ``data`` is the copy
"on the device", the tensor computations read (parameters are views into it); its storage is
allocated only while the chunk is resident (``untyped_storage().resize_``), so the views stay
valid across evictions and autograd's saved parameters see the refetched values.

``data`` lives on :func:`cai_labs.device` (the rank's GPU on a GPU node) and ``host`` on the
CPU (pinned when the device is a GPU, so copies between them can overlap computation).
"""

from __future__ import annotations

import torch

from cai_labs.devices import device as rank_device

__all__ = ["Chunk"]


class Chunk:
    """A flat chunk of ``numel`` elements of kind ``kind`` (``"param"``, ``"grad"``, ``"exp_avg"``,
    ``"exp_avg_sq"``), index ``index`` among its kind; ``device``: where ``data`` lives
    (default :func:`cai_labs.device`)."""

    def __init__(
        self,
        kind: str,
        index: int,
        numel: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        self.kind, self.index, self.numel = kind, index, numel
        self.data = torch.zeros(numel, dtype=dtype, device=device or rank_device())
        self.host = torch.zeros(numel, dtype=dtype, pin_memory=self.data.is_cuda)
        self.data.untyped_storage().resize_(0)  # not resident yet
        self.resident = False
        self.dirty = False  # device copy changed since it was fetched
        self.pins = 0  # > 0: in use, must not be evicted
        self.last_use = 0
        self.used = 0  # elements occupied by tensors (the rest is padding)

    def view(self, offset: int, shape: torch.Size) -> torch.Tensor:
        """A view of ``data[offset : offset + numel(shape)]`` shaped ``shape``.

        Views can only be cut from allocated storage, so a non-resident chunk's storage is
        allocated for the moment of the cut and released again; the view outlives that.
        """
        storage = self.data.untyped_storage()
        empty = storage.nbytes() == 0
        if empty:
            storage.resize_(self.nbytes)
        v = self.data[offset : offset + shape.numel()].view(shape)
        if empty:
            storage.resize_(0)
        return v

    @property
    def nbytes(self) -> int:
        return self.numel * self.host.element_size()

    @property
    def name(self) -> str:
        return f"{self.kind}[{self.index}]"

    def __repr__(self) -> str:
        where = "device" if self.resident else "host"
        return f"Chunk({self.name}, {self.nbytes:,} B, on {where}, pins={self.pins})"
