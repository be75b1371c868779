"""Tensor-parallel serving: every rank of a 1D grid holds a slice of OPT and runs the same
scheduler; rank 0 decides.

Each rank loads the checkpoint and splits it with
:func:`~cai_labs.tensor_parallel.opt_1d.parallelize_opt` (heads and MLP columns; the hidden
states are whole on every rank between layers). Every forward pass is a collective, so all ranks
must run the same iterations over the same batch. :class:`TensorParallelScheduler` keeps them in
step: at the start of each iteration, rank 0 (the one that talks to clients) broadcasts the
requests it received and the ones cancelled since the last iteration; every rank then admits,
prefills and decodes identically, and the tokens chosen are rank 0's (broadcast), so sampling
without a seed cannot make the ranks drift apart. Ranks other than 0 call :meth:`follow`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TypeVar

import torch.distributed as dist

from cai_labs.launcher import device
from cai_labs.serving.engine import GenerationEngine, GenerationJob
from cai_labs.serving.scheduler import Scheduler, Sequence, StepReport
from cai_labs.tensor_parallel import Grid, make_grid
from cai_labs.tensor_parallel.opt_1d import parallelize_opt

__all__ = ["tensor_parallel_engine", "TensorParallelScheduler"]

T = TypeVar("T")


def tensor_parallel_engine(
    checkpoint: str | Path, grid: Grid | None = None, torch_threads: int | None = None
) -> tuple[GenerationEngine, Grid]:
    """Load ``checkpoint`` on this rank and split it over ``grid`` (default: a 1D grid of all
    ranks). Returns ``(engine, grid)``."""
    grid = grid or make_grid("1d")
    engine = GenerationEngine.from_pretrained(checkpoint, torch_threads=torch_threads)
    parallelize_opt(engine.model, grid)
    engine.model.to(device())
    return engine, grid


class TensorParallelScheduler(Scheduler):
    """A :class:`Scheduler` whose iterations are the same on every rank of ``grid``."""

    def __init__(self, engine: GenerationEngine, grid: Grid, **settings: int | str) -> None:
        super().__init__(engine, **settings)
        self.grid = grid
        self.root = grid.ranks[0]
        self.is_root = dist.get_rank() == self.root
        self.agree = self._agree
        self._new: list[Sequence] = []
        self._by_uid: dict[int, Sequence] = {}
        self._uids = 0

    def _broadcast(self, obj: T) -> T:
        box = [obj]
        dist.broadcast_object_list(box, src=self.root, group=self.grid.group)
        return box[0]

    def _agree(self, tokens: list[int]) -> list[int]:
        return self._broadcast(tokens)

    def add(self, job: GenerationJob, arrived: float | None = None) -> Sequence:
        seq = super().add(job, arrived)
        seq.uid, self._uids = self._uids, self._uids + 1
        self._by_uid[seq.uid] = seq
        self._new.append(seq)
        return seq

    def _sync(self, stop: bool = False) -> bool:
        """Rank 0 sends this iteration's new and cancelled requests; the others add them."""
        message = None
        if self.is_root:
            new = [dataclasses.replace(s.job, on_token=None) for s in self._new]
            gone = [uid for uid, s in self._by_uid.items() if s.cancelled]
            message = (new, gone, stop)
        new, gone, stop = self._broadcast(message)
        if not self.is_root:
            for job in new:
                self.add(job)
            for uid in gone:
                self._by_uid[uid].cancelled = True
        self._new = []
        return stop

    def step(self) -> StepReport:
        self._sync()
        report = super().step()
        for seq in report.finished:
            self._by_uid.pop(seq.uid, None)
        return report

    def follow(self) -> None:
        """Ranks other than 0: run iterations as rank 0 does until it calls :meth:`close`."""
        while not self._sync():
            report = super().step()
            for seq in report.finished:
                self._by_uid.pop(seq.uid, None)

    def close(self) -> None:
        """Rank 0: release the followers."""
        self._sync(stop=True)
