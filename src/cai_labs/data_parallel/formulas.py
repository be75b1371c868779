"""Data parallelism's costs: what a replica holds and what its gradient sum sends per step.

``N`` replicas each hold the whole model (``Ψ`` parameters), their gradients and the optimizer
state, and sum the gradients once per step. Communication is counted two ways, as the
:class:`~cai_labs.Ledger` does: *buffer bytes* (the all-reduced tensors, whatever the
algorithm) and *sent bytes* under the bandwidth-optimal ring (``2 (N-1)/N`` of the buffer).
Bucketing changes the number of messages and their overlap with backward, never the bytes.
"""

from __future__ import annotations

__all__ = [
    "ring_allreduce_sent",
    "ring_gather_sent",
    "gradient_allreduce_bytes",
    "replica_state_bytes",
]


def ring_allreduce_sent(buffer_bytes: float, n: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``buffer_bytes`` over ``n`` ranks:
    ``2 (n-1)/n`` of the buffer (a reduce-scatter, then an all-gather)."""
    if n < 1:
        raise ValueError(f"a group has at least one rank; got n={n}")
    return 2 * (n - 1) / n * buffer_bytes


def ring_gather_sent(buffer_bytes: float, n: int) -> float:
    """Bytes one rank sends in a ring all-gather or reduce-scatter of a ``buffer_bytes``
    (full-size) buffer over ``n`` ranks, and in an all-to-all: ``(n-1)/n`` of it."""
    if n < 1:
        raise ValueError(f"a group has at least one rank; got n={n}")
    return (n - 1) / n * buffer_bytes


def gradient_allreduce_bytes(grad_bytes: int, n: int) -> dict[str, float]:
    """One step's gradient sum over ``n`` replicas: ``buffer`` bytes (the gradients, once;
    nothing for one replica) and ``sent`` bytes per rank under the ring."""
    buffer = grad_bytes if n > 1 else 0
    return {"buffer": buffer, "sent": ring_allreduce_sent(buffer, n)}


def replica_state_bytes(
    numel: int, param_bytes: int = 4, grad_bytes: int = 4, optimizer_bytes: int = 8
) -> dict[str, int]:
    """Model states of one replica: all of them, on every rank (ZeRO's stage 0).

    Defaults are fp32 with Adam (two moments); mixed precision is ``2, 2, 12``."""
    p, g, o = numel * param_bytes, numel * grad_bytes, numel * optimizer_bytes
    return {"params": p, "grads": g, "optimizer": o, "total": p + g + o}
