"""Cutting serial tensors into the blocks a rank holds, and putting them back together.

Every parallel module is built *from* the serial module (so all layouts start from the same
weights) by cutting its tensors with :func:`split_chunks`, and can hand back full-shape tensors
(to compare gradients with the serial twin) by gathering every rank's block with
:func:`gather_by_position` and joining them with :func:`join_chunks`.

A fused projection such as ``qkv`` (output ``[q | k | v]``) is cut *per chunk*: rank ``r`` gets
``[q_r | k_r | v_r]``, so the heads it holds are complete for q, k and v alike.
"""

from __future__ import annotations

import torch

from cai_labs.comm import all_gather
from cai_labs.tensor_parallel.grid import Grid

__all__ = ["split_chunks", "join_chunks", "gather_by_position", "init_like_linear"]


def split_chunks(t: torch.Tensor, n: int, r: int, dim: int, chunks: int = 1) -> torch.Tensor:
    """Part ``r`` of ``n`` of ``t`` along ``dim``; with ``chunks`` > 1, ``dim`` is first cut into
    ``chunks`` stacked pieces and each piece is split (then the parts are concatenated)."""
    if t.shape[dim] % (n * chunks):
        raise ValueError(
            f"cannot split size {t.shape[dim]} into {n} parts of {chunks} chunk(s) each"
        )
    pieces = t.chunk(chunks, dim=dim)
    return torch.cat([p.chunk(n, dim=dim)[r] for p in pieces], dim=dim).clone()


def join_chunks(parts: list[torch.Tensor], dim: int, chunks: int = 1) -> torch.Tensor:
    """Inverse of :func:`split_chunks`: ``parts[r]`` is part ``r``."""
    per_part = [p.chunk(chunks, dim=dim) for p in parts]
    return torch.cat(
        [torch.cat([pp[c] for pp in per_part], dim=dim) for c in range(chunks)], dim=dim
    )


def gather_by_position(t: torch.Tensor, grid: Grid) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape on all ranks), listed by grid position. Collective."""
    return list(all_gather(t.detach().unsqueeze(0), grid.group, 0).unbind(0))


def init_like_linear(weight: torch.Tensor, bias: torch.Tensor | None, fan_in: int) -> None:
    """Initialise a shard as ``nn.Linear`` initialises the whole matrix: uniform in
    ``±1/sqrt(fan_in)`` with the *full* layer's ``fan_in`` (bias zero).

    For layers built directly rather than with ``from_serial``; each rank draws its own shard,
    so the layer is not the twin of any one serial layer. Use ``from_serial`` to compare.
    """
    bound = 1.0 / fan_in**0.5
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        if bias is not None:
            bias.zero_()
