"""The expert-parallel layer: ``E/N`` experts per rank, tokens sent to them by all-to-all.

Each of the ``N`` ranks routes its own tokens (one group), writes them into the fixed
``[E, C, d]`` buffer of :func:`~cai_labs.moe.dispatch.dispatch`, and one all-to-all sends piece
``j`` (the slots of rank ``j``'s experts) to rank ``j``. Each rank runs its experts on what every
rank sent, and the same all-to-all sends the outputs back, where ``combine`` weights them by the
gates. The router is replicated: sum its gradient over the group as for any replicated weight
(data parallelism does); an expert's gradient is whole on its owner.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed import ProcessGroup

from cai_labs import comm
from cai_labs.moe.dispatch import combine, dispatch
from cai_labs.moe.formulas import experts_per_rank
from cai_labs.moe.layer import MoELayer, run_experts
from cai_labs.moe.router import Routing, TopKRouter

__all__ = ["ExpertParallelMoE", "to_experts", "from_experts"]

#: Dispatch and combine: the same all-to-all mapping (its backward is itself). Two names, so
#: that each step reads as what it does (and a test can break one of them).
to_experts = comm.all_to_all_group
from_experts = comm.all_to_all_group


class ExpertParallelMoE(nn.Module):
    """This rank's share of an MoE layer: the whole router, experts ``r E/N .. (r+1) E/N - 1``.

    ``forward(x [S, d])`` (this rank's tokens) returns ``(y [S, d], routing)``."""

    def __init__(
        self, router: TopKRouter, experts: nn.ModuleList, group: ProcessGroup | None
    ) -> None:
        super().__init__()
        n = comm.size(group)
        if len(experts) * n != router.num_experts:
            raise ValueError(
                f"{len(experts)} local experts on {n} ranks are not the router's "
                f"{router.num_experts}: give each rank num_experts / ep experts"
            )
        self.router, self.experts, self.group = router, experts, group

    @classmethod
    def from_serial(cls, serial: MoELayer, group: ProcessGroup | None) -> ExpertParallelMoE:
        """Copies of ``serial``'s router and of the experts this rank owns (exact weights)."""
        per_rank = experts_per_rank(serial.num_experts, comm.size(group))
        first = comm.rank(group) * per_rank
        mine = nn.ModuleList(copy.deepcopy(serial.experts[first : first + per_rank]))
        return cls(copy.deepcopy(serial.router), mine, group)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        if x.dim() != 2:
            raise ValueError(
                f"ExpertParallelMoE takes this rank's tokens [S, d]; got {list(x.shape)}"
            )
        n, local = comm.size(self.group), len(self.experts)
        routing = self.router(x.unsqueeze(0))  # this rank's tokens: one group
        buf = dispatch(x.unsqueeze(0), routing, self.router.num_experts)[0]  # [E, C, d]
        received = to_experts(buf, self.group)  # piece i: rank i's tokens for my experts
        out = run_experts(self.experts, received.view(n, local, *buf.shape[1:]))
        back = from_experts(out.reshape(buf.shape), self.group)  # [E, C, d] for my tokens
        return combine(back.unsqueeze(0), routing)[0], routing
