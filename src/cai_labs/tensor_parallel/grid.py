"""Process grids for tensor parallelism: which ranks talk to which, for 1D, 2D, 2.5D and 3D.

Every tensor-parallel mode arranges its ranks on a grid and communicates along the grid's axes:

======  ===========  =============  ===========================================
mode    ranks        grid shape     coordinate of grid position ``p``
======  ===========  =============  ===========================================
1D      ``N``        ``(N,)``       ``(p,)``
2D      ``q*q``      ``(q, q)``     ``(i, j) = (p // q, p % q)``: row, column
2.5D    ``q*q*d``    ``(d, q, q)``  ``(k, i, j)``: depth layer ``k``, then 2D
3D      ``q*q*q``    ``(q, q, q)``  ``(i, j, l)``, ``p = i*q*q + j*q + l``
======  ===========  =============  ===========================================

For each axis of the grid there is one process group per *line* along that axis (all ranks that
share every other coordinate). In 2D the group along axis 1 (``j`` varies, ``i`` fixed) is the
*row group* of SUMMA and the group along axis 0 the *column group*.

``torch.distributed.new_group`` must be called by **every** rank of the default group, in the
same order, even by ranks that are not members. A hybrid layout (e.g. data x pipeline x tensor)
has several tensor grids on disjoint subsets of ranks, so :func:`build_grids` builds all of them
in one collective sweep and returns the one grid this rank belongs to.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = [
    "MODES",
    "Grid",
    "grid_shape",
    "check_divisible",
    "build_grids",
    "make_grid",
]

MODES = ("1d", "2d", "2.5d", "3d")


def _isqrt_exact(n: int) -> int | None:
    r = math.isqrt(n)
    return r if r * r == n else None


def _icbrt_exact(n: int) -> int | None:
    r = round(n ** (1 / 3))
    for c in (r - 1, r, r + 1):
        if c >= 1 and c**3 == n:
            return c
    return None


def grid_shape(mode: str, size: int, depth: int = 1) -> tuple[int, ...]:
    """The grid shape of ``size`` ranks in ``mode``, or a ValueError saying what to change.

    Needs no process group, so impossible layouts fail before any rank is launched.
    """
    if mode not in MODES:
        raise ValueError(f"unknown tensor parallel mode {mode!r}; choose one of {MODES}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor parallel size must be a positive integer; got {size!r}")
    if mode == "1d":
        return (size,)
    if mode == "2d":
        q = _isqrt_exact(size)
        if q is None:
            raise ValueError(
                f"2D tensor parallelism needs a square world size (q*q ranks); got {size}. "
                f"Use {math.isqrt(size) ** 2} or {(math.isqrt(size) + 1) ** 2} ranks"
            )
        return (q, q)
    if mode == "2.5d":
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"2.5D tensor parallelism needs a depth d >= 1; got {depth!r}")
        if size % depth or _isqrt_exact(size // depth) is None:
            raise ValueError(
                f"2.5D tensor parallelism needs q*q*d ranks; got {size} ranks with depth "
                f"d={depth}, and {size}/{depth} is not a square. E.g. 8 ranks with d=2 (q=2)"
            )
        q = _isqrt_exact(size // depth)
        return (depth, q, q)
    q = _icbrt_exact(size)
    if q is None:
        raise ValueError(
            f"3D tensor parallelism needs a cube world size (q*q*q ranks); got {size}. "
            "Use 1, 8, 27 or 64 ranks"
        )
    return (q, q, q)


def check_divisible(what: str, value: int, parts: int, mode: str) -> None:
    """Raise a clear ValueError unless ``value`` splits into ``parts`` equal pieces."""
    if value % parts:
        raise ValueError(
            f"{mode} tensor parallelism splits {what} into {parts} parts, but {what}={value} "
            f"is not divisible by {parts}; change {what} or the grid"
        )


@dataclass(frozen=True, eq=False)
class Grid:
    """One tensor-parallel grid, seen from one of its ranks.

    Attributes:
        mode: ``"1d"``, ``"2d"``, ``"2.5d"`` or ``"3d"``.
        shape: grid shape (see the module table).
        ranks: global ranks of the grid in grid order (position ``p`` -> ``ranks[p]``).
        coord: this rank's coordinate on the grid.
        group: the process group of the whole grid.
        axis_groups: for each axis, the group of the line through this rank along that axis.
        axis_ranks: for each axis, the global ranks of that line, ordered by the axis coordinate
            (so ``axis_ranks[a][t]`` is the rank at coordinate ``t`` on axis ``a``).
    """

    mode: str
    shape: tuple[int, ...]
    ranks: tuple[int, ...]
    coord: tuple[int, ...]
    group: ProcessGroup
    axis_groups: tuple[ProcessGroup, ...]
    axis_ranks: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        """Number of ranks in the grid."""
        return len(self.ranks)

    @property
    def q(self) -> int:
        """Side of the grid: ``N`` in 1D, ``q`` in 2D/2.5D/3D."""
        return self.shape[-1]

    @property
    def depth(self) -> int:
        """``d`` of 2.5D (1 for the other modes)."""
        return self.shape[0] if self.mode == "2.5d" else 1

    @property
    def position(self) -> int:
        """This rank's position in the grid (0 .. size-1)."""
        return self.ranks.index(dist.get_rank())

    # Names used by SUMMA (2D and 2.5D): the last two axes are (i, j).
    @property
    def row_group(self) -> ProcessGroup:
        """2D/2.5D: ranks of this rank's grid row (same ``i`` (and ``k``), ``j`` varies)."""
        return self.axis_groups[-1]

    @property
    def col_group(self) -> ProcessGroup:
        """2D/2.5D: ranks of this rank's grid column (same ``j`` (and ``k``), ``i`` varies)."""
        return self.axis_groups[-2]

    @property
    def depth_group(self) -> ProcessGroup | None:
        """2.5D: ranks with the same ``(i, j)`` in every depth layer; None in other modes."""
        return self.axis_groups[0] if self.mode == "2.5d" else None


def _coords(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(s) for s in shape)))


def build_grids(
    mode: str, rank_lists: list[list[int]] | None = None, depth: int = 1
) -> Grid | None:
    """Build one grid per list of ranks, collectively; return this rank's grid (or None).

    Must be called by **every** rank of the default group with the same arguments, because
    ``dist.new_group`` is collective over the default group. ``rank_lists`` defaults to one grid
    over all ranks. The grids must be disjoint, all the same size, each in increasing order.

    Example (DP2 x TP4 in 2D on 8 ranks): ``build_grids("2d", [[0, 1, 2, 3], [4, 5, 6, 7]])``.
    """
    world = dist.get_world_size()
    if rank_lists is None:
        rank_lists = [list(range(world))]
    sizes = {len(r) for r in rank_lists}
    if len(sizes) != 1:
        raise ValueError(f"all tensor parallel grids must have the same size; got {sizes}")
    flat = [r for ranks in rank_lists for r in ranks]
    if len(set(flat)) != len(flat) or not all(0 <= r < world for r in flat):
        raise ValueError(
            f"grid ranks must be distinct ranks of the world (0..{world - 1}); got {rank_lists}"
        )
    for ranks in rank_lists:
        # new_group orders a group's ranks by global rank; coordinates must agree with that.
        if list(ranks) != sorted(ranks):
            raise ValueError(f"list the ranks of a grid in increasing order; got {list(ranks)}")
    shape = grid_shape(mode, sizes.pop(), depth)
    me = dist.get_rank()
    coords = _coords(shape)
    mine: Grid | None = None
    for ranks in rank_lists:
        ranks = tuple(ranks)
        whole = dist.new_group(list(ranks))
        at = {c: ranks[p] for p, c in enumerate(coords)}
        # lines[axis][rest] = global ranks along `axis` with the other coordinates = rest
        my_axis_groups: list[ProcessGroup] = []
        my_axis_ranks: list[tuple[int, ...]] = []
        for axis in range(len(shape)):
            others = [range(s) for a, s in enumerate(shape) if a != axis]
            for rest in itertools.product(*others):
                line = tuple(at[rest[:axis] + (t,) + rest[axis:]] for t in range(shape[axis]))
                g = dist.new_group(list(line))
                if me in line:
                    my_axis_groups.append(g)
                    my_axis_ranks.append(line)
        if me in ranks:
            mine = Grid(
                mode=mode,
                shape=shape,
                ranks=ranks,
                coord=coords[ranks.index(me)],
                group=whole,
                axis_groups=tuple(my_axis_groups),
                axis_ranks=tuple(my_axis_ranks),
            )
    return mine


def make_grid(mode: str, ranks: list[int] | None = None, depth: int = 1) -> Grid:
    """One grid over ``ranks`` (default: all ranks). Collective: every rank must call it.

    Ranks outside ``ranks`` get a ValueError after taking part in the group creation; use
    :func:`build_grids` when several grids cover the world.
    """
    grid = build_grids(mode, None if ranks is None else [list(ranks)], depth)
    if grid is None:
        raise ValueError(f"rank {dist.get_rank()} is not in the grid's ranks {ranks}")
    return grid
