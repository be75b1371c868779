"""PyTorch FSDP2 (``fully_shard``), set up like ZeRO-3 here, for side-by-side measurements.

FSDP2 is PyTorch's production ZeRO-3: each parameter becomes a ``DTensor`` sharded on dim 0
over a 1-D device mesh; ``fully_shard`` on a module makes it one all-gather / reduce-scatter
group (our "unit"). It runs on CPU with gloo. In torch 2.13 it calls
``torch.distributed.all_gather_single`` / ``reduce_scatter_single`` from Python, so the ledger
records its communication like ours. Its parameters are ``DTensor`` objects, which the ledger's
storage-based memory account does not read; :func:`fsdp2_memory` sums their local shards.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from cai_labs.devices import device
from cai_labs.zero.base import default_units

__all__ = ["fsdp2_wrap", "fsdp2_memory"]


def fsdp2_wrap(module: nn.Module, units: list[nn.Module] | None = None) -> nn.Module:
    """``fully_shard`` each unit (default: the model's layers), then the root; returns it.

    The module is moved to :func:`cai_labs.device` (the mesh's device) and rank 0's parameters
    are broadcast first so that every rank starts from the same model, as
    :class:`~cai_labs.zero.base.ZeroModel` does.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns that a layer returned a view (its pre-backward hook could be lost by a later
    # in-place op); OPT's layers do not modify their outputs in place, which the equality with
    # data parallel in the tests confirms.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")

    module.to(device())
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t, src=0)
    mesh = init_device_mesh(device().type, (dist.get_world_size(),))
    for m in default_units(module) if units is None else units:
        fully_shard(m, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def fsdp2_memory(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Bytes this rank holds of parameters, gradients and optimizer state (local shards)."""

    def nbytes(ts: Iterable[torch.Tensor]) -> int:
        seen: dict[int, int] = {}
        for t in ts:
            loc = _local(t)
            seen[loc.untyped_storage().data_ptr()] = loc.untyped_storage().nbytes()
        return sum(seen.values())

    params = list(module.parameters())
    out = {
        "params": nbytes(params),
        "grads": nbytes(p.grad for p in params if p.grad is not None),
        "optimizer": nbytes(
            v
            for s in (optimizer.state.values() if optimizer else [])
            for v in s.values()
            if isinstance(v, torch.Tensor)
        ),
    }
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out
