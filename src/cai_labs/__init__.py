"""cai-labs: the parallel techniques of large-model training, written out small and checked.

Each module holds one technique and is checked against its serial twin in ``tests/``:

* :mod:`cai_labs.launcher` — run a function on N ranks (fork + gloo on CPU, NCCL on GPUs,
  or in place under ``torchrun``) and get rank 0's result back.
* :mod:`cai_labs.ledger` — per-rank record of communication bytes, memory and a timeline.
* :mod:`cai_labs.data_parallel` — gradient all-reduce, then bucketed and overlapped.
"""

from cai_labs.launcher import LaunchTimeout, RankFailed, launch, rank_info
from cai_labs.ledger import Ledger, comm_totals, gather_reports, tensor_bytes

__all__ = [
    "launch",
    "rank_info",
    "RankFailed",
    "LaunchTimeout",
    "Ledger",
    "comm_totals",
    "gather_reports",
    "tensor_bytes",
]
__version__ = "0.1.0"
