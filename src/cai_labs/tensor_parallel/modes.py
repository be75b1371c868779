"""The four tensor-parallel modes as typed objects: one :class:`TPMode` per ``layers_*`` module.

Every mode offers the same entry points (``parallelize_block``, ``split_input``,
``gather_output``, ``gather_full``); :data:`TP_MODES` maps a mode's name to them, and
:meth:`TPMode.enter` / :meth:`TPMode.leave` move a whole activation onto the grid and back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from cai_labs.comm import conjugate
from cai_labs.models.gpt import Block
from cai_labs.tensor_parallel import layers_1d, layers_2d, layers_2p5d, layers_3d
from cai_labs.tensor_parallel.grid import Grid

__all__ = ["TPMode", "TP_MODES", "tp_mode"]


@dataclass(frozen=True)
class TPMode:
    """One tensor-parallel mode: its layers module and the four functions every mode has."""

    name: str
    layers: ModuleType
    parallelize_block: Callable[[Block, Grid], nn.Module]
    split_input: Callable[[torch.Tensor, Grid], torch.Tensor]
    gather_output: Callable[[torch.Tensor, Grid], torch.Tensor]
    gather_full: Callable[..., dict[str, torch.Tensor]]

    def __repr__(self) -> str:  # the module's name, not its path on this machine
        return f"TPMode({self.name!r}, {self.layers.__name__})"

    @classmethod
    def of(cls, name: str, layers: ModuleType) -> TPMode:
        """The mode whose functions are those of ``layers``."""
        return cls(
            name,
            layers,
            layers.parallelize_block,
            layers.split_input,
            layers.gather_output,
            layers.gather_full,
        )

    def enter(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Whole ``(b, s, d)`` -> this rank's part (``split_input``). Backward: the whole
        gradient from every rank's part (``gather_output``), since the whole ``x`` was used
        by replicated modules (embeddings) on every rank."""
        return conjugate(x, _split, _gather, self, grid)

    def leave(self, y: torch.Tensor, grid: Grid) -> torch.Tensor:
        """This rank's part -> the whole ``(b, s, d)`` on every rank (``gather_output``).
        Backward: every rank holds the whole, equal gradient and keeps its part."""
        return conjugate(y, _gather, _split, self, grid)


def _split(x: torch.Tensor, mode: TPMode, grid: Grid) -> torch.Tensor:
    return mode.split_input(x, grid)


def _gather(y: torch.Tensor, mode: TPMode, grid: Grid) -> torch.Tensor:
    return mode.gather_output(y.contiguous(), grid)


#: The registry: ``"1d"`` (Megatron), ``"2d"`` (SUMMA), ``"2.5d"`` (Tesseract), ``"3d"``.
TP_MODES: dict[str, TPMode] = {
    m.name: m
    for m in (
        TPMode.of("1d", layers_1d),
        TPMode.of("2d", layers_2d),
        TPMode.of("2.5d", layers_2p5d),
        TPMode.of("3d", layers_3d),
    )
}


def tp_mode(name: str) -> TPMode:
    """The :class:`TPMode` called ``name``; a ValueError lists the choices otherwise."""
    if name not in TP_MODES:
        raise ValueError(f"unknown tensor parallel mode {name!r}; choose one of {list(TP_MODES)}")
    return TP_MODES[name]
