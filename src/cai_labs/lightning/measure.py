"""A Lightning callback that measures each rank with a :class:`~cai_labs.ledger.Ledger`.

Lightning owns the training loop, so measurement hooks into it. At ``on_train_start`` (after the
strategy has wrapped model and optimizer) the callback opens a ledger on this rank and registers
what the strategy holds: for DDP the module's parameters, gradients and optimizer state; for the
:class:`~cai_labs.lightning.zero_strategy.ZeroStrategy` the same plus the ZeRO shards, with the
optimizer state being only this rank's shard. While it is open the ledger counts activations saved
for backward. It takes a memory snapshot when gradients are complete (just before the optimizer
step: the usual peak) and after the step, and times every step from batch start to batch end.
The ledger is closed at ``on_train_end``; :meth:`report` gives its plain-data report.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl

from cai_labs.ledger import Ledger
from cai_labs.lightning.zero_strategy import ZeroStrategy

__all__ = ["LedgerCallback"]


class LedgerCallback(pl.Callback):
    """Open a ledger for the training run on this rank; record step times (seconds)."""

    def __init__(self, track_activations: bool = True) -> None:
        self.track_activations = track_activations
        self.ledger: Ledger | None = None
        self.step_times: list[float] = []
        self._start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Open the ledger on what the strategy now holds."""
        ledger = Ledger(track_activations=self.track_activations)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        strategy = trainer.strategy
        if isinstance(strategy, ZeroStrategy) and strategy.zero_model is not None:
            strategy.zero_model.watch(ledger, optimizer)
            inner = getattr(optimizer, "inner", None)
            if hasattr(inner, "memory_tensors"):  # offloaded moments: count the resident part
                ledger.watch(**inner.memory_tensors())
        else:
            ledger.watch(model=pl_module, optimizer=optimizer)
        self.ledger = ledger.__enter__()  # after watch: parameters are not counted as activations

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close the ledger."""
        if self.ledger is not None:
            self.ledger.__exit__(None, None, None)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Start the step clock."""
        self._start = time.perf_counter()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        """Snapshot memory with gradients complete."""
        if self.ledger is not None:
            self.ledger.snapshot(f"step {trainer.global_step}: gradients ready")

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Snapshot memory after the step; stop the clock."""
        if self.ledger is not None:
            self.ledger.snapshot(f"step {trainer.global_step}: after step")
        self.step_times.append(time.perf_counter() - self._start)

    def report(self) -> dict[str, Any]:
        """The ledger's report plus ``step_times``."""
        if self.ledger is None:
            raise ValueError(
                "the callback has not run: pass it to Trainer(callbacks=[...]) and call fit first"
            )
        return {**self.ledger.report(), "step_times": list(self.step_times)}
