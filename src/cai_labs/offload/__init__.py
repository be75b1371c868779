"""Heterogeneous memory, Gemini-style: model states in fixed-size chunks moved between pools.

* :mod:`~cai_labs.offload.pool` — a byte-accounted memory pool with an optional hard budget;
* :mod:`~cai_labs.offload.chunk` — one chunk: a flat buffer with a host copy and a device copy;
* :mod:`~cai_labs.offload.manager` — placement: fetch on demand, prefetch, evict (LRU);
* :mod:`~cai_labs.offload.offloaded_adamw` — AdamW whose moments are chunks homed in host memory
  (what :class:`~cai_labs.lightning.zero_strategy.ZeroStrategy` uses with ``offload=True``);
* :mod:`~cai_labs.offload.chunked_model` — a model whose parameters, gradients and Adam states
  live in chunks, trained data-parallel with each chunk's optimizer state on one owner rank.
"""

from cai_labs.offload.chunk import Chunk
from cai_labs.offload.chunked_model import ChunkedAdam, ChunkedModel
from cai_labs.offload.manager import ChunkManager
from cai_labs.offload.offloaded_adamw import OffloadedAdamW
from cai_labs.offload.pool import MemoryPool, PoolBudgetExceeded

__all__ = [
    "MemoryPool",
    "PoolBudgetExceeded",
    "Chunk",
    "ChunkManager",
    "ChunkedModel",
    "ChunkedAdam",
    "OffloadedAdamW",
]
