"""The two collectives of ZeRO, called through ``torch.distributed`` so the ledger sees them.

PyTorch 2.13 renamed ``reduce_scatter_tensor`` / ``all_gather_into_tensor`` (one flat input, one
flat output) to ``reduce_scatter_single`` / ``all_gather_single``; older releases only have the
first names. The functions look the name up at call time, on the ``torch.distributed`` module,
so that a :class:`~cai_labs.ledger.Ledger` that patched the module records the call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["reduce_scatter_flat", "all_gather_flat"]


def reduce_scatter_flat(
    output: torch.Tensor,
    flat: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    async_op: bool = False,
) -> dist.Work | None:
    """Sum ``flat`` ``(N * S,)`` over the group; rank ``r`` receives elements ``[r S, (r+1) S)``.

    ``output`` is ``(S,)``. Ring cost: each rank sends ``(N-1)/N`` of ``flat``'s bytes. With
    ``async_op=True`` the call returns at once with a work handle; ``output`` is valid (and
    ``flat`` may be dropped) only after ``work.wait()``.
    """
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, flat, group=group, async_op=async_op)


def all_gather_flat(
    flat: torch.Tensor,
    shard: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    async_op: bool = False,
) -> dist.Work | None:
    """Concatenate every rank's ``shard`` ``(S,)`` into ``flat`` ``(N * S,)``, in rank order.

    ``shard`` must not be a view of ``flat``. Ring cost: ``(N-1)/N`` of ``flat``'s bytes per rank.
    With ``async_op=True`` the call returns at once with a work handle (ZeRO-3's prefetch of the
    next unit); ``flat`` is valid only after ``work.wait()``, and ``shard`` must not change before.
    """
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(flat, shard, group=group, async_op=async_op)
