"""ZeRO stages 1, 2 and 3 over flat buffers, with ``torch.distributed`` collectives.

Usage on every rank (inside :func:`cai_labs.launch` or ``torchrun``)::

    from cai_labs.zero import zero_wrap

    model, optimizer = zero_wrap(model, torch.optim.Adam, stage=2, lr=1e-3)
    for x, y in batches:                       # this rank's slice of the global batch
        loss = model(x, labels=y).loss
        loss.backward()                        # ZeRO-2/3 reduce-scatter during backward
        optimizer.step()                       # sharded step (+ all-gather for stages 1/2)
        optimizer.zero_grad()
    state = model.full_state_dict()            # collective: the unsharded weights

Modules: :mod:`~cai_labs.zero.flat` (flat units), :mod:`~cai_labs.zero.base` (shared),
:mod:`~cai_labs.zero.stage1`, :mod:`~cai_labs.zero.stage2`, :mod:`~cai_labs.zero.stage3`,
:mod:`~cai_labs.zero.optimizer` (sharded optimizer), :mod:`~cai_labs.zero.formulas` (the paper's
formulas and the bytes per step), :mod:`~cai_labs.zero.memory` (the measured account),
:mod:`~cai_labs.zero.loss_scale` (fp16 dynamic loss scaling),
:mod:`~cai_labs.zero.fsdp2` (PyTorch FSDP2 side by side).
``zero_wrap(..., param_dtype=torch.bfloat16)`` trains in mixed precision (fp32 master shards,
``K = 12``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cai_labs.zero.base import ZeroModel, default_units
from cai_labs.zero.flat import FlatParamUnit
from cai_labs.zero.loss_scale import DynamicLossScaler
from cai_labs.zero.memory import memory_by_kind, zero_memory_formula
from cai_labs.zero.optimizer import ZeroOptimizer
from cai_labs.zero.stage1 import Zero1
from cai_labs.zero.stage2 import Zero2
from cai_labs.zero.stage3 import Zero3

__all__ = [
    "zero_wrap",
    "ZeroModel",
    "Zero1",
    "Zero2",
    "Zero3",
    "ZeroOptimizer",
    "FlatParamUnit",
    "default_units",
    "zero_memory_formula",
    "memory_by_kind",
    "DynamicLossScaler",
    "STAGES",
]

STAGES: dict[int, type[ZeroModel]] = {1: Zero1, 2: Zero2, 3: Zero3}


def zero_wrap(
    module: nn.Module,
    optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer = torch.optim.Adam,
    stage: int = 1,
    units: list[nn.Module] | None = None,
    group: dist.ProcessGroup | None = None,
    param_dtype: torch.dtype | None = None,
    **optimizer_kwargs: Any,
) -> tuple[ZeroModel, ZeroOptimizer]:
    """Wrap ``module`` for ZeRO ``stage`` and build its sharded optimizer.

    Args:
        module: the model, built the same way on every rank (rank 0's values are broadcast).
        optimizer: an optimizer class (hyper-parameters in ``optimizer_kwargs``) or an optimizer
            already built over ``module.parameters()`` whose class and hyper-parameters are
            reused (its state, if any, is not carried over).
        stage: 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters).
        units: modules that each become one flat unit (default: the model's layers).
        group: data-parallel process group (default: all ranks).
        param_dtype: ``torch.bfloat16`` / ``torch.float16`` for mixed precision (low-precision
            parameters, gradients and collectives; fp32 master shards and optimizer state).

    Returns:
        ``(zero_model, zero_optimizer)``: call ``zero_model(...)`` like the module,
        ``loss.backward()``, then ``zero_optimizer.step()`` and ``zero_optimizer.zero_grad()``.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be 1, 2 or 3; got {stage!r}")
    model = STAGES[stage](module, units=units, group=group, param_dtype=param_dtype)
    if isinstance(optimizer, torch.optim.Optimizer):
        if optimizer_kwargs:
            raise ValueError("pass hyper-parameters either in the optimizer or as kwargs, not both")
        return model, ZeroOptimizer.from_optimizer(model, optimizer)
    return model, ZeroOptimizer(model, optimizer, **optimizer_kwargs)
