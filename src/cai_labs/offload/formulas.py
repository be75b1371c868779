"""Offload's costs: where the model states live, and the bytes that cross the host link.

**Optimizer state in host memory** (ZeRO-Offload, Ren et al. 2021; :class:`OffloadedAdamW`):
the device keeps parameters and gradients, the host the optimizer state. Per step, an optimizer
state of ``S`` bytes whose device pool holds ``budget < S`` bytes is brought in and written back
whole (the chunks are visited in the same order every step, so least-recently-used eviction
never finds the next chunk still resident): ``S`` host-to-device and ``S`` device-to-host per
step (after a final flush). With ``budget >= S`` it is loaded once and stays.

**Mixed precision at scale** (the paper's setup): the fp32 master weights and Adam moments,
``12 Ψ/N`` with ZeRO-2, live on the host; each step sends the fp16 gradient shard ``2 Ψ/N`` to
the host and the updated fp16 parameters ``2 Ψ/N`` back.
"""

from __future__ import annotations

__all__ = ["optimizer_offload_traffic", "offload_step_link_bytes"]


def optimizer_offload_traffic(state_bytes: int, device_budget: int | None, steps: int) -> dict:
    """``h2d`` and ``d2h`` bytes of ``steps`` optimizer steps over ``state_bytes`` of moments
    with a device pool of ``device_budget`` bytes (``None``: unlimited), flushed at the end."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    visits = steps if device_budget is not None and device_budget < state_bytes else 1
    return {"h2d": visits * state_bytes, "d2h": visits * state_bytes}


def offload_step_link_bytes(numel: int, world_size: int, half_bytes: int = 2) -> dict:
    """Bytes per rank over the host link per step in ZeRO-Offload: gradients down, parameters
    up, each the rank's ``1/N`` shard in half precision."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}")
    shard = numel * half_bytes / world_size
    return {"d2h": shard, "h2d": shard}
