"""A Lightning callback that feeds a :class:`~cai_labs.ledger.Ledger` and times steps.

Lightning owns the training loop, so the measurements hook into it: the ledger (opened around
``trainer.fit`` on each rank) takes a memory snapshot when gradients are complete (just before the
optimizer step: parameters + gradients + optimizer state + live activations) and after the step;
activations saved for backward are counted by the ledger itself while it is open. Each step's
wall time is taken from the start of the batch to its end.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl

from cai_labs.ledger import Ledger

__all__ = ["LedgerCallback"]


class LedgerCallback(pl.Callback):
    """Snapshot ``ledger`` around each optimizer step and record step times (seconds)."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.step_times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        self.ledger.snapshot(f"step {trainer.global_step}: gradients ready")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.ledger.snapshot(f"step {trainer.global_step}: after step")
        self.step_times.append(time.perf_counter() - self._start)
