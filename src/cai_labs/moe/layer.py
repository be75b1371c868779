"""The serial mixture-of-experts layer: a router and ``E`` small MLP experts on one process.

``y = sum over kept assignments of gate * expert(x)``; a dropped token gets zero (its residual
is the caller's). Tokens are routed in ``groups`` equal groups of consecutive tokens, each with
its own capacity: the serial twin of ``groups`` expert-parallel ranks, each holding one group.
"""

from __future__ import annotations

import torch
from torch import nn

from cai_labs.moe.dispatch import combine, dispatch
from cai_labs.moe.router import Routing, TopKRouter

__all__ = ["Expert", "MoELayer", "run_experts"]


class Expert(nn.Module):
    """A two-layer MLP, ``d_model -> d_hidden -> d_model`` with a GELU between."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, d_hidden), nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


def run_experts(experts: nn.ModuleList, buf: torch.Tensor) -> torch.Tensor:
    """``buf`` ``[P, E_here, C, d]`` (``P`` pieces: groups, or source ranks) -> the outputs of
    expert ``i`` on every piece's slots ``buf[:, i]``, same shape."""
    pieces, _, cap, d = buf.shape
    outs = [
        e(buf[:, i].reshape(pieces * cap, d)).view(pieces, cap, d) for i, e in enumerate(experts)
    ]
    return torch.stack(outs, dim=1)


class MoELayer(nn.Module):
    """Router + experts. ``forward(x [T, d], groups)`` returns ``(y [T, d], routing)``."""

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        k: int = 1,
        capacity_factor: float = 1.0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        with torch.random.fork_rng(enabled=seed is not None, devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.router = TopKRouter(d_model, num_experts, k, capacity_factor)
            self.experts = nn.ModuleList(Expert(d_model, d_hidden) for _ in range(num_experts))

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    def forward(self, x: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, Routing]:
        if x.dim() != 2 or x.shape[0] % groups:
            raise ValueError(
                f"MoELayer takes tokens [T, d] with T a multiple of groups={groups}; "
                f"got {list(x.shape)}"
            )
        x = x.view(groups, -1, x.shape[-1])
        routing = self.router(x)
        out = run_experts(self.experts, dispatch(x, routing, self.num_experts))
        return combine(out, routing).reshape(-1, x.shape[-1]), routing
