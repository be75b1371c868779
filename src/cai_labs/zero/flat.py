"""Flat parameter units: the data structure every ZeRO stage is built on.

ZeRO partitions *flat* buffers rather than individual tensors: the parameters of one module (a
"unit", e.g. one transformer layer) are copied into one contiguous 1-D buffer of ``numel``
elements, padded with zeros to ``N * S`` elements for ``N`` ranks, and rank ``r`` owns the slice
``[r S, (r+1) S)``. Every parameter then becomes a *view* into that buffer, so the model code is
unchanged while the optimizer, the gradient reduction and the parameter gathering all work on
one large tensor per unit: one collective per unit instead of one per parameter, and an equal
share for every rank whatever the parameter shapes.

Padding elements have zero gradient, so Adam-type optimizers leave them at zero.

When a stage shards the parameters themselves (ZeRO-3), the full buffer's *storage* is released
(``untyped_storage().resize_(0)``) between uses and re-allocated before an all-gather refills it.
The parameter views keep pointing at the same storage object, so autograd, which saved those
parameters for backward, sees the refilled values when backward runs.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from cai_labs.zero.collectives import all_gather_flat

__all__ = ["FlatParamUnit"]


class FlatParamUnit:
    """One module's parameters as a padded flat buffer split into ``world_size`` shards.

    Args:
        name: a label (the module's qualified name, ``""`` for the root).
        params: the unit's parameters, each listed once (shared parameters belong to one unit).
        rank, world_size, group: this rank's place in the data-parallel group.

    Attributes:
        full: ``(N * S,)`` flat buffer; ``params`` are views into it.
        numel: elements before padding; ``shard_numel``: ``S``.
        shard: ``(S,)`` this rank's slice, an ``nn.Parameter`` the sharded optimizer updates
            (set by the stage: a view of ``full`` for ZeRO-1/2, its own storage for ZeRO-3).
        low: ``(S,)`` ZeRO-3 under mixed precision: the low-precision copy of the fp32 master
            ``shard`` that :meth:`gather` all-gathers (``None`` otherwise).
    """

    def __init__(
        self,
        name: str,
        params: list[nn.Parameter],
        rank: int,
        world_size: int,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if not params:
            raise ValueError(f"unit {name!r} has no parameters")
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"unit {name!r} mixes dtypes {dtypes}; give each dtype its own unit")
        self.name = name
        self.params = params
        self.rank, self.world_size, self.group = rank, world_size, group
        self.numel = sum(p.numel() for p in params)
        self.shard_numel = math.ceil(self.numel / world_size)
        self.padded_numel = self.shard_numel * world_size
        self.offsets: list[int] = []
        full = torch.zeros(self.padded_numel, dtype=params[0].dtype, device=params[0].device)
        offset = 0
        with torch.no_grad():
            for p in params:
                self.offsets.append(offset)
                full[offset : offset + p.numel()].copy_(p.detach().reshape(-1))
                p.data = full[offset : offset + p.numel()].view(p.shape)
                offset += p.numel()
        self.full = full
        self.shard: nn.Parameter | None = None
        self.low: torch.Tensor | None = None
        self.gathered = True  # storage allocated (and filled, once ``_work`` is waited for)
        self._work: dist.Work | None = None  # an all-gather started with ``async_op=True``
        self.reduced = False  # gradients of this backward already reduce-scattered
        self.ready = 0  # parameters whose gradient is complete in this backward

    @property
    def lo(self) -> int:
        return self.rank * self.shard_numel

    @property
    def hi(self) -> int:
        return self.lo + self.shard_numel

    def full_slice(self) -> torch.Tensor:
        """This rank's slice of the full buffer ``(S,)``, a view (valid while gathered)."""
        return self.full[self.lo : self.hi]

    def flat_grad(self) -> torch.Tensor:
        """The unit's gradients, flattened and padded: ``(N * S,)`` (missing ones are zeros)."""
        parts = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params
        ]
        pad = self.padded_numel - self.numel
        if pad:
            parts.append(self.full.new_zeros(pad))
        return torch.cat(parts)

    # -- ZeRO-3: free and re-gather the full buffer ------------------------------------------
    def free(self) -> None:
        """Release the full buffer's memory; the parameter views stay, pointing at no data.

        A pending asynchronous all-gather is waited for first: its output is this storage."""
        if self.gathered:
            self.wait()
            self.full.untyped_storage().resize_(0)
            self.gathered = False

    def gather(self, async_op: bool = False) -> None:
        """Re-allocate the full buffer and all-gather every rank's shard into it.

        ``async_op=True`` only *starts* the all-gather (a prefetch): the buffer is filled once
        :meth:`wait` returns. A plain ``gather()`` of a unit whose prefetch is in flight waits for
        it instead of communicating again, so every unit is gathered once per use either way.
        """
        if self.gathered:
            if not async_op:
                self.wait()
            return
        assert self.shard is not None
        source = self.shard.detach() if self.low is None else self.low
        self.full.untyped_storage().resize_(self.padded_numel * self.full.element_size())
        work = all_gather_flat(self.full, source, self.group, async_op=async_op)
        self._work = work if async_op else None
        self.gathered = True

    def wait(self) -> None:
        """Wait for a prefetch started by ``gather(async_op=True)`` (no-op if none is pending)."""
        if self._work is not None:
            self._work.wait()
            self._work = None

    @property
    def gathered_bytes(self) -> int:
        """Bytes of the full buffer ``(N * S,)`` while gathered."""
        return self.padded_numel * self.full.element_size()

    def __repr__(self) -> str:
        return (
            f"FlatParamUnit({self.name!r}, params={len(self.params)}, numel={self.numel}, "
            f"shard={self.shard_numel} x {self.world_size})"
        )
