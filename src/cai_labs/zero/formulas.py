"""ZeRO's costs: model-state bytes per rank (the paper's formula) and the bytes of each step.

Rajbhandari et al. (2020), *ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models*, count model-state bytes per rank for ``Ψ`` parameters on ``N`` data-parallel ranks, in
mixed precision with Adam: fp16 parameters ``2Ψ``, fp16 gradients ``2Ψ``, and ``KΨ`` of optimizer
state with ``K = 12`` (fp32 master weights, momentum, variance):

* data parallel: ``(2 + 2 + K) Ψ``
* stage 1 (P_os): ``2Ψ + 2Ψ + KΨ/N``
* stage 2 (P_os+g): ``2Ψ + (2 + K)Ψ/N``
* stage 3 (P_os+g+p): ``(2 + 2 + K)Ψ/N``

On CPU these tutorials train in fp32 with plain Adam by default: parameters ``4Ψ``, gradients
``4Ψ``, and ``K = 8`` (momentum and variance; no master copy). With ``param_dtype=torch.bfloat16``
(or fp16) :mod:`cai_labs.zero` holds the paper's case: 2-byte parameters and gradients and
``K = 12``. The byte counts are arguments, so either convention can be computed;
:func:`zero_unit_memory` gives the exact bytes of the flat units, padding included.

Communication per step (buffer bytes, as the ledger counts them) of :mod:`cai_labs.zero`'s flat
units, each padded to ``N ceil(numel/N)`` elements: every stage reduce-scatters each unit's
gradient once; stages 1 and 2 all-gather each unit once after the step; stage 3 all-gathers each
unit before its forward and again before its backward, except the root unit (the parameters
outside the layers), which stays gathered from forward into backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "zero_memory_formula",
    "zero_unit_memory",
    "zero_step_comm",
    "zero_sent_factor",
    "padded_numel",
]


def zero_memory_formula(
    numel: int,
    stage: int,
    world_size: int,
    param_bytes: int = 4,
    grad_bytes: int = 4,
    optimizer_bytes: int = 8,
) -> dict[str, float]:
    """Bytes per rank of parameters, gradients and optimizer state under ZeRO ``stage``.

    ``stage=0`` is plain data parallel. ``numel`` is Ψ, the number of parameters.
    """
    _check(stage, world_size)
    n = world_size
    params = numel * param_bytes / (n if stage >= 3 else 1)
    grads = numel * grad_bytes / (n if stage >= 2 else 1)
    optim = numel * optimizer_bytes / (n if stage >= 1 else 1)
    return {"params": params, "grads": grads, "optimizer": optim, "total": params + grads + optim}


def zero_unit_memory(
    unit_numels: Sequence[int],
    stage: int,
    world_size: int,
    param_bytes: int = 4,
    grad_bytes: int = 4,
    optimizer_bytes: int = 8,
    counter_bytes: int = 0,
) -> dict[str, int]:
    """Exact bytes per rank that :mod:`cai_labs.zero` holds after a step, for flat units of
    ``unit_numels`` parameters each padded to ``N S`` elements (``S = ceil(numel / N)``).

    Parameters: the padded full buffers (stages 1-2) or one shard ``S`` per unit (stage 3).
    Gradients: stage 1 keeps every parameter's full gradient until ``zero_grad`` (``numel``, no
    padding); stages 2-3 one shard each. Optimizer: ``optimizer_bytes`` per shard element
    (``K``) plus ``counter_bytes`` per unit (torch Adam's step count: one 4-byte scalar).
    """
    _check(stage, world_size)
    if stage == 0:
        raise ValueError("stage 0 is data parallel: use zero_memory_formula")
    shards = sum(math.ceil(n / world_size) for n in unit_numels)
    padded = sum(padded_numel(n, world_size) for n in unit_numels)
    params = param_bytes * (shards if stage == 3 else padded)
    grads = grad_bytes * (sum(unit_numels) if stage == 1 else shards)
    optim = optimizer_bytes * shards + counter_bytes * len(unit_numels)
    return {"params": params, "grads": grads, "optimizer": optim, "total": params + grads + optim}


def padded_numel(numel: int, world_size: int) -> int:
    """Elements of a flat unit of ``numel`` parameters padded to split evenly over the ranks."""
    return math.ceil(numel / world_size) * world_size


def zero_step_comm(
    unit_numels: Sequence[int],
    stage: int,
    world_size: int,
    elem: int = 4,
    root: int | None = None,
) -> dict[str, int]:
    """Buffer bytes of one training step: ``reduce_scatter`` and ``all_gather``.

    ``unit_numels`` are the flat units' parameter counts, ``root`` the index of the root unit
    (ZeRO-3 gathers it once per step, not twice), ``None`` if there is none.
    """
    _check(stage, world_size)
    if stage == 0:
        raise ValueError("stage 0 is data parallel: use data_parallel.formulas")
    padded = [padded_numel(n, world_size) * elem for n in unit_numels]
    gathers = sum(padded)
    if stage == 3:
        gathers += sum(b for i, b in enumerate(padded) if i != root)
    return {"reduce_scatter": sum(padded), "all_gather": gathers}


def zero_sent_factor(stage: int, world_size: int) -> float:
    """Bytes one rank sends per step, as a multiple of the parameter bytes ``Ψ`` under ring
    collectives: ``2 (N-1)/N`` for data parallel and stages 1-2, ``3 (N-1)/N`` for stage 3
    (parameters gathered twice, root unit ignored)."""
    _check(stage, world_size)
    n = world_size
    return (3 if stage == 3 else 2) * (n - 1) / n


def _check(stage: int, world_size: int) -> None:
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0 (data parallel), 1, 2 or 3; got {stage}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}")
