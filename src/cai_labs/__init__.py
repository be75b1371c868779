"""cai-labs: the parallel techniques of large-model training, written out small and checked.

Each module holds one technique and is checked against its serial twin in ``tests/``:

* :mod:`cai_labs.launcher` — run a function on N ranks (fork + gloo on CPU,
  ``cpu:gloo,cuda:nccl`` on GPUs, or on torchrun's first N ranks) and get rank 0's result back;
  :func:`device` is the device each rank's model and data go on.
* :mod:`cai_labs.ledger` — per-rank record of communication bytes, memory and a timeline.
* :mod:`cai_labs.comm` — collectives, and the autograd mappings that pair each with its
  conjugate in backward (used by every technique).
* :mod:`cai_labs.data_parallel` — gradient all-reduce, then bucketed and overlapped.
* :mod:`cai_labs.tensor_parallel` — 1D, 2D (SUMMA), 2.5D and 3D tensor-parallel layers.
* :mod:`cai_labs.pipeline` — stages, micro-batches, GPipe and 1F1B schedules.
* :mod:`cai_labs.hybrid` — ``parallelize(model, layout)``: one GPT in any DP x PP x TP (x SP,
  ZeRO) layout, from one :class:`~cai_labs.hybrid.layout.Layout`.
* :mod:`cai_labs.sequence_parallel` — ring and all-to-all self-attention, BERT on sequence chunks.
* :mod:`cai_labs.moe` — mixture of experts: top-k router with capacity, expert parallelism by
  all-to-all.
* :mod:`cai_labs.auto_parallel` — trace, sharding strategies, cost model, solver, runtime, and
  automatic activation checkpointing.
* :mod:`cai_labs.optim` — LARS, LAMB and their learning-rate schedules.
* :mod:`cai_labs.zero` and :mod:`cai_labs.offload` — ZeRO stages 1-3 and chunk-based offload.
* :mod:`cai_labs.serving` — an HTTP service with dynamic batching, and its load generator.
* :mod:`cai_labs.peers` — PyTorch's own engines (DTensor, pipelining), run side by side.
"""

from cai_labs.hybrid import Layout, parallelize
from cai_labs.launcher import LaunchTimeout, RankFailed, device, launch, rank_info
from cai_labs.ledger import Ledger, comm_totals, gather_reports, tensor_bytes

__all__ = [
    "launch",
    "device",
    "rank_info",
    "RankFailed",
    "LaunchTimeout",
    "Ledger",
    "comm_totals",
    "gather_reports",
    "tensor_bytes",
    "Layout",
    "parallelize",
]
__version__ = "0.1.0"
