"""The per-rank account of model states measured by the ledger, next to the ZeRO formula.

:func:`zero_memory_formula` lives in :mod:`cai_labs.zero.formulas` (re-exported here).
"""

from __future__ import annotations

from cai_labs.zero.formulas import zero_memory_formula  # noqa: F401 (old import path)

__all__ = ["memory_by_kind"]  # zero_memory_formula: see zero.formulas


def memory_by_kind(snapshot: dict[str, int]) -> dict[str, int]:
    """Fold a ledger snapshot's ZeRO categories into params / grads / optimizer / total.

    ``param_shards`` count as parameters, ``grad_shards`` as gradients and the fp32
    ``master_shards`` of mixed precision as optimizer state, as the ZeRO paper counts them (see
    :meth:`cai_labs.zero.base.ZeroModel.watch`).
    """
    params = snapshot.get("params", 0) + snapshot.get("param_shards", 0)
    grads = snapshot.get("grads", 0) + snapshot.get("grad_shards", 0)
    optim = snapshot.get("optimizer", 0) + snapshot.get("master_shards", 0)
    return {"params": params, "grads": grads, "optimizer": optim, "total": params + grads + optim}
