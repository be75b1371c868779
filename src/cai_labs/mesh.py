"""How a world of ranks is numbered: ``dp`` replicas x ``pp`` stages x an inner group.

Rank ``r = d * (pp * n) + s * n + t`` (replica ``d``, stage ``s``, position ``t`` in the inner
group of ``n`` ranks: a tensor grid or a sequence-parallel group). The inner group talks most
(every layer), so its ranks are adjacent: on a GPU node they share the fast links.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RankMesh"]


@dataclass(frozen=True)
class RankMesh:
    """``dp x pp x inner`` ranks and the rank lists of their groups."""

    dp: int = 1
    pp: int = 1
    inner: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.inner

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(d, s, t)`` of global ``rank``."""
        return rank // (self.pp * self.inner), (rank // self.inner) % self.pp, rank % self.inner

    def rank_of(self, d: int, s: int, t: int) -> int:
        """The global rank at ``(d, s, t)``."""
        return d * self.pp * self.inner + s * self.inner + t

    def inner_rank_lists(self) -> list[list[int]]:
        """One list per inner group (fixed ``d, s``), in inner order."""
        return [
            [self.rank_of(d, s, t) for t in range(self.inner)]
            for d in range(self.dp)
            for s in range(self.pp)
        ]

    def dp_rank_lists(self) -> list[list[int]]:
        """One list per data-parallel group (fixed ``s, t``)."""
        return [
            [self.rank_of(d, s, t) for d in range(self.dp)]
            for s in range(self.pp)
            for t in range(self.inner)
        ]

    def stage_rank_lists(self) -> list[list[int]]:
        """One list per pipeline stage: its ``dp * inner`` ranks."""
        return [
            [self.rank_of(d, s, t) for d in range(self.dp) for t in range(self.inner)]
            for s in range(self.pp)
        ]
