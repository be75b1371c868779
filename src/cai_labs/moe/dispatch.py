"""Tokens into fixed per-expert buffers, and the experts' outputs back to the tokens.

A group's kept assignments are written into a ``[G, E, C, d]`` buffer at ``(group, expert,
slot)``; empty slots stay zero. A fixed shape is what lets expert parallelism send the buffer
with an equal-split all-to-all. Combine reads each kept assignment's output back and sums it,
weighted by its gate; a dropped assignment adds zero.
"""

from __future__ import annotations

import torch

from cai_labs.moe.router import Routing

__all__ = ["dispatch", "combine"]


def _flat_slots(r: Routing, num_experts: int) -> torch.Tensor:
    """``[G, S, k]`` index of each assignment's row in the ``[G * E * C, d]`` buffer."""
    group = torch.arange(r.expert.shape[0], device=r.expert.device).view(-1, 1, 1)
    return (group * num_experts + r.expert) * r.capacity + r.slot


def dispatch(x: torch.Tensor, r: Routing, num_experts: int) -> torch.Tensor:
    """``x`` ``[G, S, d]`` -> ``[G, E, C, d]``: each kept assignment's token in its slot."""
    groups, _, d = x.shape
    rows = _flat_slots(r, num_experts)[r.kept]
    tokens = x.unsqueeze(2).expand(*r.expert.shape, d)[r.kept]
    buf = x.new_zeros(groups * num_experts * r.capacity, d).index_add(0, rows, tokens)
    return buf.view(groups, num_experts, r.capacity, d)


def combine(out: torch.Tensor, r: Routing) -> torch.Tensor:
    """``[G, E, C, d]`` expert outputs -> ``[G, S, d]``: sum of gate x output over kept ones."""
    groups, num_experts, cap, d = out.shape
    rows = torch.where(r.kept, _flat_slots(r, num_experts), 0)
    picked = out.reshape(groups * num_experts * cap, d)[rows]  # [G, S, k, d]
    weight = (r.gate * r.kept).unsqueeze(-1)
    return (weight * picked).sum(dim=2)
