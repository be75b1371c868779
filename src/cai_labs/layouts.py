"""Layouts: how a world of ranks is divided into data, pipeline and tensor parallel groups.

A :class:`Layout` ``(dp, pp, tp)`` uses ``dp * pp * tp`` ranks. Rank ``r`` has the coordinate

.. code-block:: text

    r = d * (pp * tp) + s * tp + t      d: data-parallel replica, s: pipeline stage,
                                         t: position in the tensor-parallel grid

Tensor parallel ranks are adjacent (they talk most, every layer: on a GPU node they should share
the fast links); the stages of one replica come next; replicas are the outer loop.

* the **tensor grid** of ``(d, s)``: ranks ``d*pp*tp + s*tp + [0 .. tp)``, arranged as the
  ``tp_mode`` grid (1D line, 2D ``q x q``, 2.5D ``d x q x q``, 3D ``q x q x q``);
* the **pipeline** of ``(d, t)``: ranks ``d*pp*tp + [0 .. pp)*tp + t``, stage ``s`` sends to
  stage ``s+1`` of the same ``t``;
* the **data-parallel group** of ``(s, t)``: ranks ``[0 .. dp)*pp*tp + s*tp + t``; they hold the
  same shard of parameters and average its gradients.

Everything that can be checked without a process group is checked in :meth:`Layout.validate`,
so an impossible layout fails with a message saying what to change before any rank starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from cai_labs.models.gpt import GPTConfig

__all__ = ["Layout", "PRESETS"]

TP_MODES = ("1d", "2d", "2.5d", "3d")


@dataclass(frozen=True)
class Layout:
    """Degrees of data (``dp``), pipeline (``pp``) and tensor (``tp``) parallelism.

    Args:
        dp, pp, tp: sizes of each dimension; the world size is their product.
        tp_mode: ``"1d"``, ``"2d"``, ``"2.5d"`` or ``"3d"`` (used when ``tp > 1``).
        tp_depth: the depth ``d`` of the 2.5D grid (``tp = q*q*d``).
        n_micro: micro-batches per step on each pipeline (1 without pipeline is plain training).
        schedule: ``"gpipe"`` or ``"1f1b"``.
    """

    dp: int = 1
    pp: int = 1
    tp: int = 1
    tp_mode: str = "1d"
    tp_depth: int = 1
    n_micro: int = 1
    schedule: str = "1f1b"

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def name(self) -> str:
        parts = []
        if self.dp > 1:
            parts.append(f"DP{self.dp}")
        if self.pp > 1:
            parts.append(f"PP{self.pp}")
        if self.tp > 1:
            depth = f", d={self.tp_depth}" if self.tp_mode == "2.5d" else ""
            parts.append(f"TP{self.tp}-{self.tp_mode.upper()}{depth}")
        return " x ".join(parts) or "serial"

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(d, s, t)`` of global ``rank``."""
        return rank // (self.pp * self.tp), (rank // self.tp) % self.pp, rank % self.tp

    def rank_of(self, d: int, s: int, t: int) -> int:
        return d * self.pp * self.tp + s * self.tp + t

    def tp_rank_lists(self) -> list[list[int]]:
        """One list of global ranks per tensor grid, in grid order."""
        return [
            [self.rank_of(d, s, t) for t in range(self.tp)]
            for d in range(self.dp)
            for s in range(self.pp)
        ]

    def dp_rank_lists(self) -> list[list[int]]:
        """One list of global ranks per data-parallel group."""
        return [
            [self.rank_of(d, s, t) for d in range(self.dp)]
            for s in range(self.pp)
            for t in range(self.tp)
        ]

    def validate(self, cfg: GPTConfig, batch_size: int | None = None) -> None:
        """Raise a ValueError saying what to change if ``cfg`` cannot be laid out this way."""
        for what, v in (
            ("dp", self.dp),
            ("pp", self.pp),
            ("tp", self.tp),
            ("n_micro", self.n_micro),
        ):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{what} must be a positive integer; got {v!r}")
        if self.tp_mode not in TP_MODES:
            raise ValueError(f"unknown tp_mode {self.tp_mode!r}; choose one of {TP_MODES}")
        if self.schedule not in ("gpipe", "1f1b"):
            raise ValueError(f"unknown schedule {self.schedule!r}; choose 'gpipe' or '1f1b'")
        if self.pp > cfg.n_layers:
            raise ValueError(
                f"pp={self.pp} pipeline stages need at least {self.pp} transformer blocks; the "
                f"model has n_layers={cfg.n_layers}. Lower pp or raise n_layers"
            )
        if self.tp > 1:
            from cai_labs.tensor_parallel.grid import grid_shape

            grid_shape(self.tp_mode, self.tp, self.tp_depth)  # raises on impossible grids
        if batch_size is not None:
            if batch_size % self.dp:
                raise ValueError(
                    f"a batch of {batch_size} samples does not split over dp={self.dp} "
                    f"replicas; use a batch size divisible by {self.dp}"
                )
            local = batch_size // self.dp
            if local % self.n_micro:
                raise ValueError(
                    f"each replica's {local} samples do not split into n_micro={self.n_micro} "
                    f"equal micro-batches; use a batch size divisible by {self.dp * self.n_micro}"
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
