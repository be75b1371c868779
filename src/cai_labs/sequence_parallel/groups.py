"""Process groups for sequence parallelism combined with data parallelism (SP x DP).

``world = sp * dp`` ranks form a ``dp x sp`` grid: ``rank = dp_rank * sp + sp_rank``. The
ranks of one row share one batch slice and split its sequence (the ring or all-to-all runs among
them, on every attention layer, so they are made neighbours: on GPUs, the same node). The ranks
of one column hold the same sequence chunk of different batch slices; they only meet to sum
gradients once per step.

::

    sp=2, dp=2:      sp_rank 0   sp_rank 1
        dp_rank 0      rank 0      rank 1     <- one SP group (one ring)
        dp_rank 1      rank 2      rank 3
                         ^ one DP group
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["SequenceDataGroups", "make_sp_dp_groups"]


@dataclass
class SequenceDataGroups:
    """This rank's place in the SP x DP grid and the two groups it belongs to."""

    sp_rank: int
    dp_rank: int
    sp_size: int
    dp_size: int
    sp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None


def make_sp_dp_groups(sp: int) -> SequenceDataGroups:
    """Split the world into ``world // sp`` SP groups of ``sp`` consecutive ranks (and DP groups
    across them). Must be called by every rank (``new_group`` is collective)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if sp < 1 or world % sp:
        raise ValueError(f"sequence-parallel size {sp} must divide the world size {world}")
    dp = world // sp
    sp_group = dp_group = None
    for d in range(dp):
        g = dist.new_group(list(range(d * sp, (d + 1) * sp)))
        if rank // sp == d:
            sp_group = g
    for s in range(sp):
        g = dist.new_group(list(range(s, world, sp)))
        if rank % sp == s:
            dp_group = g
    return SequenceDataGroups(rank % sp, rank // sp, sp, dp, sp_group, dp_group)
