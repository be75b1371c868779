"""Process groups for sequence parallelism combined with data and pipeline parallelism.

``world = dp * pp * sp`` ranks form a 3D grid with the rank order of
:class:`cai_labs.mesh.RankMesh`, the sequence-parallel group being the inner group (it talks
most: a ring step in every attention layer)::

    rank = dp_rank * (pp * sp) + pp_rank * sp + sp_rank

* an **SP group** (fixed ``dp_rank``, ``pp_rank``): the ``sp`` ranks that split the sequence of
  one micro-batch at one pipeline stage; the ring (or all-to-all) runs among them. On GPUs they
  should share a node;
* a **pipeline** (fixed ``dp_rank``, ``sp_rank``): stage ``s`` sends its chunk of the activation
  to stage ``s+1`` *of the same sp_rank*, which holds the same tokens;
* a **DP group** (fixed ``pp_rank``, ``sp_rank``): replicas holding the same layers and the same
  sequence chunk of different batch slices; they meet once per step to sum gradients;
* a **replica group** (fixed ``pp_rank``): all ``sp * dp`` ranks of one pipeline stage. They
  hold identical copies of the stage's parameters, and each computed a share of the global loss
  (its tokens of its batch rows), so *one* sum all-reduce over this group gives every one of
  them the serial gradient. It replaces the two sums over the SP group then the DP group: a
  ring all-reduce over ``n`` ranks sends ``2 (n-1)/n P`` bytes per rank, so one ring over
  ``sp * dp`` ranks sends less than two rings (``2 (sp-1)/sp P + 2 (dp-1)/dp P``), e.g. ``1.5 P``
  instead of ``2 P`` for ``sp = dp = 2``. When ``dp == 1`` it *is* the SP group, when
  ``sp == 1`` the DP group (no extra communicator);
* an **embedding group** (fixed ``dp_rank``, ``sp_rank``, stages ``0`` and ``pp-1``): BERT ties
  its word embeddings to the MLM decoder, so the first and the last stage each hold a copy of that
  matrix and must add their gradient contributions (Megatron-LM's "embedding group").

::

    sp=2, pp=2, dp=2      sp_rank 0  sp_rank 1
      dp 0, stage 0         rank 0     rank 1    <- one SP group (one ring)
      dp 0, stage 1         rank 2     rank 3       pipeline: 0 -> 2 and 1 -> 3
      dp 1, stage 0         rank 4     rank 5
      dp 1, stage 1         rank 6     rank 7       DP groups: {0, 4}, {1, 5}, {2, 6}, {3, 7}
                                                    replica groups: {0, 1, 4, 5}, {2, 3, 6, 7}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from cai_labs.mesh import RankMesh

__all__ = ["SequenceDataGroups", "sequence_layout", "make_sequence_groups", "make_sp_dp_groups"]


@dataclass
class SequenceDataGroups:
    """This rank's place in the SP x DP (x PP) grid and the groups it belongs to.

    ``prev_stage`` / ``next_stage`` are the global ranks of the neighbouring pipeline stages
    with the same ``dp_rank`` and ``sp_rank`` (None at the ends); ``replica_group`` holds all
    ``sp * dp`` ranks of this rank's stage; ``embedding_group`` joins this rank's first and last
    stage (None when ``pp == 1`` or the rank is on a middle stage).
    """

    sp_rank: int
    dp_rank: int
    sp_size: int
    dp_size: int
    sp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    pp_rank: int = 0
    pp_size: int = 1
    prev_stage: int | None = None
    next_stage: int | None = None
    embedding_group: dist.ProcessGroup | None = None
    replica_group: dist.ProcessGroup | None = None


def sequence_layout(sp: int, dp: int = 1, pp: int = 1, world_size: int | None = None) -> RankMesh:
    """The :class:`~cai_labs.mesh.RankMesh` ``(dp, pp, inner=sp)`` of the SP grid; raise a
    ValueError saying what to change if ``world_size`` does not factor."""
    for what, v in (("sp", sp), ("dp", dp), ("pp", pp)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a positive integer; got {v!r}")
    need = sp * dp * pp
    if world_size is not None and world_size != need:
        names = " x ".join(n for n, v in (("SP", sp), ("DP", dp), ("PP", pp)) if v > 1) or "serial"
        raise ValueError(
            f"{names} needs world_size = sp*dp*pp = {sp}*{dp}*{pp} = {need}; got {world_size}. "
            f"Launch {need} ranks or change sp, dp, pp"
        )
    return RankMesh(dp=dp, pp=pp, inner=sp)


def make_sequence_groups(sp: int, dp: int = 1, pp: int = 1) -> SequenceDataGroups:
    """Build the SP, DP, replica and embedding groups of a ``dp x pp x sp`` grid (module
    docstring).

    Collective: every rank calls it, and every rank creates every group in the same order, as
    ``torch.distributed.new_group`` requires.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = sequence_layout(sp, dp, pp, world_size=world)
    d, s, t = layout.coords(rank)
    mine: dict[str, dist.ProcessGroup | None] = {
        "sp": None,
        "dp": None,
        "emb": None,
        "replica": None,
    }
    # The replica group of stage s: every (replica, sp rank) pair of that stage. With dp == 1
    # or sp == 1 it has the ranks of the SP or DP group and reuses that communicator.
    replica_lists = layout.stage_rank_lists() if sp > 1 and dp > 1 else []
    for kind, lists in (
        ("sp", layout.inner_rank_lists()),
        ("dp", layout.dp_rank_lists()),
        ("replica", replica_lists),
    ):
        for ranks in lists:
            g = dist.new_group(ranks)
            if rank in ranks:
                mine[kind] = g
    if not replica_lists:
        mine["replica"] = mine["sp"] if dp == 1 else mine["dp"]
    if pp > 1:
        for dd in range(dp):
            for tt in range(sp):
                ranks = [layout.rank_of(dd, 0, tt), layout.rank_of(dd, pp - 1, tt)]
                g = dist.new_group(ranks)
                if rank in ranks:
                    mine["emb"] = g
    return SequenceDataGroups(
        sp_rank=t,
        dp_rank=d,
        sp_size=sp,
        dp_size=dp,
        sp_group=mine["sp"],
        dp_group=mine["dp"],
        pp_rank=s,
        pp_size=pp,
        prev_stage=layout.rank_of(d, s - 1, t) if s > 0 else None,
        next_stage=layout.rank_of(d, s + 1, t) if s < pp - 1 else None,
        embedding_group=mine["emb"],
        replica_group=mine["replica"],
    )


def make_sp_dp_groups(sp: int) -> SequenceDataGroups:
    """SP x DP without a pipeline: ``world // sp`` SP groups of ``sp`` consecutive ranks, and DP
    groups across them. Must be called by every rank (``new_group`` is collective)."""
    world = dist.get_world_size()
    if not isinstance(sp, int) or sp < 1 or world % sp:
        raise ValueError(f"sequence-parallel size {sp} must divide the world size {world}")
    return make_sequence_groups(sp, dp=world // sp, pp=1)
