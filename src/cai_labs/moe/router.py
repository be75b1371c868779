"""The top-k router: softmax gating, a capacity per expert, and the load-balancing loss.

Tokens come in groups (``[G, S, d]``); each group routes alone, with its own capacity
``C = ceil(capacity_factor * S * k / E)`` (GShard's groups; on expert-parallel ranks, one group
per rank). A token's ``k`` choices are the experts of its ``k`` largest router probabilities.
Slots are taken in a fixed order: all first choices in token order, then all second choices
(GShard), so a token's first choice is never dropped for another's second. An assignment whose
slot would be ``>= C`` is dropped: it contributes nothing, and the caller's residual carries
the token. Gates: the probability itself for ``k = 1`` (Switch; normalising would make it 1 and
cut the router's gradient), the two probabilities over their sum for ``k = 2`` (GShard).

The auxiliary loss of Switch/GShard, ``E * sum_e f_e P_e``, with ``f_e`` the share of the
group's ``S k`` assignments that chose expert ``e`` (before dropping) and ``P_e`` its mean
router probability, is 1 when routing is uniform and grows as it concentrates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cai_labs.moe.formulas import capacity

__all__ = ["Routing", "TopKRouter"]


@dataclass
class Routing:
    """Where each token's ``k`` assignments go; every field but ``capacity`` is per group.

    ``expert``, ``slot``: ``[G, S, k]`` expert index and slot in its buffer; ``kept``: ``[G, S,
    k]`` the slot is below ``capacity``; ``gate``: ``[G, S, k]`` weights (differentiable);
    ``tokens_per_expert``: ``[G, E]`` assignments per expert before dropping; ``aux_loss``:
    the load-balancing loss, mean over groups."""

    expert: torch.Tensor
    slot: torch.Tensor
    kept: torch.Tensor
    gate: torch.Tensor
    tokens_per_expert: torch.Tensor
    aux_loss: torch.Tensor
    capacity: int

    @property
    def dropped(self) -> int:
        """Assignments dropped for want of a slot."""
        return int((~self.kept).sum())


class TopKRouter(nn.Module):
    """A linear gate ``d_model -> num_experts`` (no bias), top-``k`` with a capacity factor."""

    def __init__(
        self, d_model: int, num_experts: int, k: int = 1, capacity_factor: float = 1.0
    ) -> None:
        super().__init__()
        if k not in (1, 2):
            raise ValueError(f"k (experts per token) must be 1 (Switch) or 2 (GShard); got {k}")
        if k > num_experts:
            raise ValueError(f"k={k} choices need at least {k} experts; got {num_experts}")
        capacity(1, num_experts, k, capacity_factor)  # checks the factor and the counts
        self.num_experts, self.k, self.capacity_factor = num_experts, k, capacity_factor
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> Routing:
        """Route ``x`` of shape ``[G, S, d_model]``, each of the ``G`` groups alone."""
        if x.dim() != 3 or x.shape[-1] != self.gate.in_features:
            raise ValueError(
                f"the router takes [groups, tokens, {self.gate.in_features}]; got {list(x.shape)}"
            )
        groups, tokens, _ = x.shape
        cap = capacity(tokens, self.num_experts, self.k, self.capacity_factor)
        probs = torch.softmax(self.gate(x), dim=-1)  # [G, S, E]
        top_p, expert = probs.topk(self.k, dim=-1)  # [G, S, k]
        gate = top_p if self.k == 1 else top_p / top_p.sum(dim=-1, keepdim=True)
        chosen = nn.functional.one_hot(expert, self.num_experts)  # [G, S, k, E]
        # Slots in order: choice-major, then token order; position among earlier takers.
        order = chosen.transpose(1, 2).reshape(groups, self.k * tokens, self.num_experts)
        taken = (order.cumsum(dim=1) - 1) * order
        slot = taken.sum(-1).view(groups, self.k, tokens).transpose(1, 2)  # [G, S, k]
        per_expert = chosen.sum(dim=(1, 2))  # [G, E]
        f = per_expert.to(probs.dtype) / (tokens * self.k)
        aux = self.num_experts * (f * probs.mean(dim=1)).sum(-1).mean()
        return Routing(expert, slot, slot < cap, gate, per_expert, aux, cap)
