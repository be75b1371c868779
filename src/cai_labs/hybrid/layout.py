"""A :class:`Layout`: the degree of every parallel dimension, and the ranks of each group.

Rank ``r = d * (pp * n) + s * n + t`` (:class:`~cai_labs.mesh.RankMesh`): replica ``d``, stage
``s``, position ``t`` in the inner group of ``n = tp * sp`` ranks (a tensor grid, or a
sequence-parallel group). Everything checkable without a process group is checked by
:meth:`Layout.validate`, so an impossible layout fails before any rank starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from cai_labs.mesh import RankMesh
from cai_labs.models.gpt import GPTConfig
from cai_labs.tensor_parallel.grid import MODES

__all__ = ["Layout", "PRESETS", "SCHEDULES", "SP_ATTENTIONS"]

SCHEDULES = ("gpipe", "1f1b")
SP_ATTENTIONS = ("ring", "all_to_all", "ring_flash")


@dataclass(frozen=True)
class Layout:
    """Degrees of data (``dp``), pipeline (``pp``), tensor (``tp``), sequence (``sp``)
    parallelism and the ZeRO stage.

    Args:
        dp, pp, tp, sp: sizes of each dimension; the world size is their product (``tp`` and
            ``sp`` share the inner group, so at most one of them exceeds 1).
        tp_mode: ``"1d"``, ``"2d"``, ``"2.5d"`` or ``"3d"`` (used when ``tp > 1``).
        tp_depth: the depth ``d`` of the 2.5D grid (``tp = q*q*d``).
        vocab_parallel: with ``tp > 1``, split the token embedding, the head and the loss by
            vocabulary over the grid (False: replicate them on every rank of the grid).
        n_micro: micro-batches per step on each pipeline (1 without pipeline is plain training).
        schedule: ``"gpipe"`` or ``"1f1b"``.
        sp_attention: ``"ring"``, ``"all_to_all"`` or ``"ring_flash"`` (the online-softmax
            ring of :mod:`~cai_labs.sequence_parallel.ring_flash`; used when ``sp > 1``).
        zero: ZeRO stage over the data-parallel group: 0 (plain gradient all-reduce), 1, 2, 3.
    """

    dp: int = 1
    pp: int = 1
    tp: int = 1
    tp_mode: str = "1d"
    tp_depth: int = 1
    n_micro: int = 1
    schedule: str = "1f1b"
    sp: int = 1
    sp_attention: str = "ring"
    zero: int = 0
    vocab_parallel: bool = True

    @property
    def mesh(self) -> RankMesh:
        return RankMesh(self.dp, self.pp, self.tp * self.sp)

    @property
    def world_size(self) -> int:
        return self.mesh.world_size

    @property
    def name(self) -> str:
        parts = []
        if self.dp > 1:
            parts.append(f"DP{self.dp}" + (f" (ZeRO-{self.zero})" if self.zero else ""))
        if self.pp > 1:
            parts.append(f"PP{self.pp}")
        if self.tp > 1:
            depth = f", d={self.tp_depth}" if self.tp_mode == "2.5d" else ""
            parts.append(f"TP{self.tp}-{self.tp_mode.upper()}{depth}")
        if self.sp > 1:
            parts.append(f"SP{self.sp}")
        return " x ".join(parts) or "serial"

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(d, s, t)`` of global ``rank``."""
        return self.mesh.coords(rank)

    def rank_of(self, d: int, s: int, t: int) -> int:
        return self.mesh.rank_of(d, s, t)

    def tp_rank_lists(self) -> list[list[int]]:
        """One list of global ranks per inner group (tensor grid or SP group), in grid order."""
        return self.mesh.inner_rank_lists()

    def dp_rank_lists(self) -> list[list[int]]:
        """One list of global ranks per data-parallel group."""
        return self.mesh.dp_rank_lists()

    def validate(self, cfg: GPTConfig, batch_size: int | None = None) -> None:
        """Raise a ValueError saying what to change if ``cfg`` cannot be laid out this way."""
        _check_degrees(self)
        _check_model(self, cfg)
        if batch_size is not None:
            _check_batch(self, batch_size)


def _check_degrees(lay: Layout) -> None:
    for what, v in (("dp", lay.dp), ("pp", lay.pp), ("tp", lay.tp), ("sp", lay.sp)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a positive integer; got {v!r}")
    if not isinstance(lay.n_micro, int) or lay.n_micro < 1:
        raise ValueError(f"n_micro must be a positive integer; got {lay.n_micro!r}")
    for what, v, choices in (
        ("tp_mode", lay.tp_mode, MODES),
        ("schedule", lay.schedule, SCHEDULES),
        ("sp_attention", lay.sp_attention, SP_ATTENTIONS),
        ("zero", lay.zero, (0, 1, 2, 3)),
    ):
        if v not in choices:
            raise ValueError(f"unknown {what} {v!r}; choose one of {choices}")
    if lay.tp > 1 and lay.sp > 1:
        raise ValueError(
            f"tp={lay.tp} and sp={lay.sp} both split the inner group; use one of them (set the "
            "other to 1)"
        )
    if lay.zero and lay.dp == 1:
        raise ValueError(f"ZeRO-{lay.zero} shards over data-parallel replicas; it needs dp > 1")
    if lay.zero == 3 and lay.pp > 1:
        raise ValueError("ZeRO-3 re-gathers parameters per forward; use it with pp=1, or zero<=2")


def _check_model(lay: Layout, cfg: GPTConfig) -> None:
    if lay.pp > cfg.n_layers:
        raise ValueError(
            f"pp={lay.pp} pipeline stages need at least {lay.pp} transformer blocks; the "
            f"model has n_layers={cfg.n_layers}. Lower pp or raise n_layers"
        )
    if lay.tp > 1:
        from cai_labs.tensor_parallel.grid import check_divisible, grid_shape

        grid_shape(lay.tp_mode, lay.tp, lay.tp_depth)  # raises on impossible grids
        if lay.vocab_parallel:
            check_divisible("the vocabulary", cfg.vocab_size, lay.tp, lay.tp_mode.upper())
    if lay.sp > 1:
        from cai_labs.sequence_parallel.chunking import check_sequence_split

        check_sequence_split(cfg.seq_len, lay.sp)
        if lay.sp_attention == "all_to_all" and cfg.n_heads % lay.sp:
            raise ValueError(
                f"all-to-all attention splits the {cfg.n_heads} heads over sp={lay.sp} ranks; "
                f"use sp dividing n_heads, or sp_attention='ring'"
            )
        if lay.sp_attention == "ring_flash" and cfg.seq_len % (2 * lay.sp):
            raise ValueError(
                f"the online-softmax ring cuts each rank's chunk in two: seq_len={cfg.seq_len} "
                f"must be a multiple of 2N = {2 * lay.sp}; change seq_len or sp"
            )


def _check_batch(lay: Layout, batch_size: int) -> None:
    if batch_size % lay.dp:
        raise ValueError(
            f"a batch of {batch_size} samples does not split over dp={lay.dp} "
            f"replicas; use a batch size divisible by {lay.dp}"
        )
    local = batch_size // lay.dp
    if local % lay.n_micro:
        raise ValueError(
            f"each replica's {local} samples do not split into n_micro={lay.n_micro} "
            f"equal micro-batches; use a batch size divisible by {lay.dp * lay.n_micro}"
        )


#: The layouts the tutorial trains, by name.
PRESETS: dict[str, Layout] = {
    "serial": Layout(),
    "DP2": Layout(dp=2),
    "PP2 (1F1B)": Layout(pp=2, n_micro=4),
    "TP2-1D": Layout(tp=2, tp_mode="1d"),
    "TP4-1D": Layout(tp=4, tp_mode="1d"),
    "TP4-2D": Layout(tp=4, tp_mode="2d"),
    "TP8-2.5D": Layout(tp=8, tp_mode="2.5d", tp_depth=2),
    "TP8-3D": Layout(tp=8, tp_mode="3d"),
    "DP2 x PP2 x TP2-1D": Layout(dp=2, pp=2, tp=2, tp_mode="1d", n_micro=2),
}
