"""Which backend a process group uses and which device a rank computes on.

With GPUs, the group is ``cpu:gloo,cuda:nccl``: CUDA tensors go through NCCL and CPU tensors
(a counter, an object list, a tensor a page kept on the host) through gloo, so no CPU tensor
ever reaches NCCL. Workers put their model and data on :func:`device`, which is the rank's own
GPU under that backend and the CPU otherwise; the same worker code runs on both.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["GPU_BACKEND", "pick_backend", "device", "use_rank_device", "to_host"]

GPU_BACKEND = "cpu:gloo,cuda:nccl"


def pick_backend(world_size: int, backend: str | None = None, *, local: bool = False) -> str:
    """The backend for ``world_size`` ranks: ``backend`` if given, else ``CAI_LABS_BACKEND``,
    else :data:`GPU_BACKEND` when every rank of this machine can have its own GPU, else gloo.

    ``local=True`` (torchrun) counts only this machine's ranks (``LOCAL_WORLD_SIZE``).
    """
    backend = backend or os.environ.get("CAI_LABS_BACKEND")
    if backend:
        return backend
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if local else world_size
    if torch.cuda.is_available() and torch.cuda.device_count() >= min(ranks_here, world_size):
        return GPU_BACKEND
    return "gloo"


def uses_cuda(backend: str) -> bool:
    """True for a backend that carries CUDA tensors (``nccl`` alone or in a device map)."""
    return "nccl" in backend


def use_rank_device(backend: str, local_rank: int) -> None:
    """Make ``cuda:local_rank`` this process's current GPU when the backend uses CUDA."""
    if uses_cuda(backend):
        torch.cuda.set_device(local_rank)


def device() -> torch.device:
    """The device of this rank: its own GPU when the group carries CUDA tensors, else the CPU."""
    if dist.is_initialized() and uses_cuda(str(dist.get_backend())):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_host(obj: Any) -> Any:
    """``obj`` with every tensor moved to the CPU (through dicts, lists, tuples, dataclasses'
    fields are left alone). A rank's result crosses to a process that may not use its GPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if obj.device.type != "cpu" else obj
    if isinstance(obj, dict):
        return type(obj)((k, to_host(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_host(v) for v in obj)
    return obj
