"""A Lightning cluster environment that reads ranks from an existing process group.

Lightning normally starts its own processes (``strategy="ddp"`` re-runs the script) or reads ranks
from the environment of a cluster launcher. On a tutorial page the ranks are already forked by
:func:`cai_labs.launch` and the default process group is already initialised. This environment
tells Lightning exactly that: it "creates processes externally", and rank and world size are those
of ``torch.distributed``. Each rank is one "node" with one device, so the Trainer is built with
``devices=1, num_nodes=world_size``; Lightning's DDP set-up finds the group initialised and uses it.
"""

from __future__ import annotations

import torch.distributed as dist
from lightning.fabric.plugins.environments import ClusterEnvironment

__all__ = ["ProcessGroupEnvironment"]


class ProcessGroupEnvironment(ClusterEnvironment):
    """Ranks come from the initialised default process group (one rank per "node")."""

    def __init__(self) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise ValueError(
                "ProcessGroupEnvironment needs an initialised process group: build the Trainer "
                "inside a worker started by cai_labs.launch (or after dist.init_process_group)"
            )

    @property
    def creates_processes_externally(self) -> bool:
        """True: the ranks exist already."""
        return True

    @property
    def main_address(self) -> str:
        """Unused: the process group exists."""
        return "127.0.0.1"  # unused: the process group exists already

    @property
    def main_port(self) -> int:
        """Unused: the process group exists."""
        return 0

    @staticmethod
    def detect() -> bool:
        """True when a default process group is initialised."""
        return dist.is_available() and dist.is_initialized()

    def world_size(self) -> int:
        """Ranks in the default process group."""
        return dist.get_world_size()

    def set_world_size(self, size: int) -> None:
        """Check Lightning's count against the process group."""
        if size != dist.get_world_size():
            raise ValueError(
                f"the Trainer asks for {size} processes but the process group has "
                f"{dist.get_world_size()}: use devices=1, num_nodes={dist.get_world_size()}"
            )

    def global_rank(self) -> int:
        """This process's rank in the default group."""
        return dist.get_rank()

    def set_global_rank(self, rank: int) -> None:
        """Check Lightning's rank against the process group."""
        if rank != dist.get_rank():
            raise ValueError(
                f"Lightning computed rank {rank}, the process group says "
                f"{dist.get_rank()}: use devices=1, num_nodes=world_size"
            )

    def local_rank(self) -> int:
        """0: one device per rank."""
        return 0

    def node_rank(self) -> int:
        """The global rank: each rank is its own node."""
        return dist.get_rank()
