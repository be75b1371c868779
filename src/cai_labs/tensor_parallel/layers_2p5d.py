"""2.5D tensor parallelism (Tesseract): ``d`` stacked 2D grids, ``q x q x d`` ranks.

2D's communication per rank falls only as ``1/q`` while its ranks grow as ``q²``. 2.5D adds a
depth axis: the batch is cut into ``d*q`` row blocks, depth layer ``k`` runs an ordinary SUMMA
(:mod:`.layers_2d`) on batch blocks ``k*q .. k*q+q-1``, and every layer holds the *same* weight
blocks ``A_ij`` (weights are split ``q x q`` as in 2D, activations ``d*q x q``).

Rank ``(k, i, j)`` holds activations ``(b/(dq), s, d_model/q)`` and weights ``(N/q, K/q)``.
Because each depth layer saw only its own part of the batch, the gradients of the replicated
weights, biases and norm parameters are summed across the depth axis (one all-reduce over the
``d`` ranks sharing ``(i, j)``). Activation and compute per rank fall as ``1/(dq²)``; the SUMMA
broadcasts of activations shrink by ``d`` while weight traffic stays as in 2D.

The layers are those of :mod:`.layers_2d` — they read the depth group from the grid — so this
module gives them their 2.5D names and checks the grid.
"""

from __future__ import annotations

import torch
from torch import nn

from cai_labs.models.gpt import Block
from cai_labs.tensor_parallel import layers_2d as _2d
from cai_labs.tensor_parallel.grid import Grid

__all__ = [
    "Linear2p5D",
    "LayerNorm2p5D",
    "Attention2p5D",
    "MLP2p5D",
    "Block2p5D",
    "parallelize_block",
    "split_input",
    "gather_output",
    "gather_full",
]

Linear2p5D = _2d.Linear2D
LayerNorm2p5D = _2d.LayerNorm2D
Attention2p5D = _2d.Attention2D
MLP2p5D = _2d.MLP2D
Block2p5D = _2d.Block2D


def _check(grid: Grid) -> None:
    if grid.mode != "2.5d":
        raise ValueError(f"2.5D layers need a 2.5d grid (q x q x d); got a {grid.mode} grid")


def parallelize_block(block: Block, grid: Grid) -> nn.Module:
    """The 2.5D tensor-parallel twin of ``block`` (same weights) for this rank."""
    _check(grid)
    return _2d.Block2D(block, grid)


def split_input(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Block ``(k, i, j)``: batch block ``k*q + i`` of ``d*q``, feature block ``j`` of ``q``."""
    _check(grid)
    return _2d.split_input(x, grid)


def gather_output(y: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Whole ``(b, s, d)`` from every rank's block."""
    return _2d.gather_output(y, grid)


def gather_full(module: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Full-shape parameters (or gradients) keyed like the serial module. Collective."""
    return _2d.gather_full(module, grads)
