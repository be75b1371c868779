"""The ZeRO paper's memory formulas, and the per-rank account measured by the ledger.

Rajbhandari et al. (2020), *ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models*, count model-state bytes per rank for ``Ψ`` parameters on ``N`` data-parallel ranks, in
mixed precision with Adam: fp16 parameters ``2Ψ``, fp16 gradients ``2Ψ``, and ``KΨ`` of optimizer
state with ``K = 12`` (fp32 master weights, momentum, variance):

* data parallel: ``(2 + 2 + K) Ψ``
* stage 1 (P_os): ``2Ψ + 2Ψ + KΨ/N``
* stage 2 (P_os+g): ``2Ψ + (2 + K)Ψ/N``
* stage 3 (P_os+g+p): ``(2 + 2 + K)Ψ/N``

On CPU these tutorials train in fp32 with plain Adam: parameters ``4Ψ``, gradients ``4Ψ``, and
``K = 8`` (momentum and variance, 4 bytes each; no master copy, the parameters already are
fp32). :func:`zero_memory_formula` takes the byte counts as arguments so either convention can
be shown.
"""

from __future__ import annotations

__all__ = ["zero_memory_formula", "memory_by_kind"]


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
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0 (data parallel), 1, 2 or 3; got {stage}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}")
    n = world_size
    params = numel * param_bytes / (n if stage >= 3 else 1)
    grads = numel * grad_bytes / (n if stage >= 2 else 1)
    optim = numel * optimizer_bytes / (n if stage >= 1 else 1)
    return {"params": params, "grads": grads, "optimizer": optim, "total": params + grads + optim}


def memory_by_kind(snapshot: dict[str, int]) -> dict[str, int]:
    """Fold a ledger snapshot's ZeRO categories into params / grads / optimizer / total.

    ``param_shards`` count as parameters and ``grad_shards`` as gradients (see
    :meth:`cai_labs.zero.base.ZeroModel.watch`).
    """
    params = snapshot.get("params", 0) + snapshot.get("param_shards", 0)
    grads = snapshot.get("grads", 0) + snapshot.get("grad_shards", 0)
    optim = snapshot.get("optimizer", 0)
    return {"params": params, "grads": grads, "optimizer": optim, "total": params + grads + optim}
