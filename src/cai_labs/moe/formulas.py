"""Expert parallelism's closed forms: capacity, all-to-all bytes, expert parameters per rank.

A group of ``S`` tokens is routed to ``k`` of ``E`` experts each. Every expert takes at most
``C = ceil(capacity_factor * S * k / E)`` of them (its *capacity*); the rest are dropped. On
``N`` expert-parallel ranks each rank's ``S`` tokens are one group, and dispatch sends a fixed
``[E, C, d]`` buffer through one all-to-all (piece ``i``, the slots of rank ``i``'s experts, to
rank ``i``); combine sends the experts' outputs back through the inverse all-to-all. Fixed
buffers make both all-to-alls equal-split, so their bytes depend on sizes only, never on where
the tokens went. The backward of each all-to-all is the same all-to-all of the gradient.
"""

from __future__ import annotations

import math
from fractions import Fraction

__all__ = [
    "capacity",
    "experts_per_rank",
    "all_to_all_bytes",
    "all_to_all_sent_bytes",
    "expert_params",
    "expert_params_per_rank",
]


def capacity(tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """Slots per expert, ``ceil(capacity_factor * tokens * k / num_experts)``.

    ``capacity_factor`` is taken as the decimal it prints as (1.1 is 11/10, not the binary float
    just above it), so that a capacity the factor makes exact is not rounded up by one."""
    if tokens < 1 or num_experts < 1 or k < 1:
        raise ValueError(
            f"tokens, num_experts and k must be >= 1; got {tokens}, {num_experts}, {k}"
        )
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0 (1.0: no slack); got {capacity_factor}")
    return math.ceil(Fraction(repr(float(capacity_factor))) * tokens * k / num_experts)


def experts_per_rank(num_experts: int, ep: int) -> int:
    """Experts each of ``ep`` ranks owns; a ValueError unless they spread evenly."""
    if ep < 1:
        raise ValueError(f"an expert-parallel group has at least one rank; got ep={ep}")
    if num_experts % ep:
        raise ValueError(
            f"{num_experts} experts cannot be spread evenly over {ep} expert-parallel ranks: "
            f"choose num_experts a multiple of {ep}, or an ep that divides {num_experts}"
        )
    return num_experts // ep


def all_to_all_bytes(num_experts: int, cap: int, d_model: int, element_size: int) -> dict:
    """Buffer bytes of the all-to-alls one rank makes per MoE layer, as the ledger counts them
    (the send buffer of each ``all_to_all_single``, ``E C d`` elements).

    ``{"forward": 2 E C d s, "backward": 2 E C d s}``: dispatch and combine, then their
    twins. The dispatch's twin runs only when the layer's input needs a gradient."""
    one = num_experts * cap * d_model * element_size
    return {"forward": 2 * one, "backward": 2 * one}


def all_to_all_sent_bytes(buffer_bytes: int, ep: int) -> float:
    """Bytes that leave a rank in one all-to-all of ``buffer_bytes``: all pieces but its own,
    ``(N-1)/N`` of the buffer."""
    return (ep - 1) / ep * buffer_bytes if ep >= 1 else 0.0


def expert_params(d_model: int, d_hidden: int, bias: bool = True, gated: bool = False) -> int:
    """Parameters of one expert MLP: two matrices (three for a gated, SwiGLU expert), and the
    biases of ``d_hidden`` and ``d_model`` outputs when ``bias``."""
    matrices = (3 if gated else 2) * d_model * d_hidden
    return matrices + ((d_hidden * (2 if gated else 1) + d_model) if bias else 0)


def expert_params_per_rank(
    num_experts: int, ep: int, d_model: int, d_hidden: int, bias: bool = True, gated: bool = False
) -> int:
    """Expert parameters one of ``ep`` ranks holds: ``E/N`` experts (the router is replicated
    and not counted)."""
    return experts_per_rank(num_experts, ep) * expert_params(d_model, d_hidden, bias, gated)
