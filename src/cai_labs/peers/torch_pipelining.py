"""The GPT under ``torch.distributed.pipelining``: PyTorch's GPipe and 1F1B schedules.

Each rank wraps the same :class:`~cai_labs.pipeline.partition.GPTStage` that cai_labs uses in a
``torch.distributed.pipelining.PipelineStage`` and drives it with ``ScheduleGPipe`` or
``Schedule1F1B``. PyTorch computes each micro-batch's loss, and by default divides the gradients
by the number of micro-batches, which is what dividing each loss by ``m`` does in cai_labs: the
gradients are those of the full batch's mean loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from cai_labs.launcher import device
from cai_labs.models.gpt import GPT, GPTConfig
from cai_labs.pipeline.partition import GPTStage

__all__ = ["TorchPipeline"]


class TorchPipeline:
    """This rank's stage of the GPT of ``seed`` under a PyTorch pipeline schedule, on
    :func:`cai_labs.device`. Collective.

    Args:
        cfg, seed: the model (same weights as the serial GPT of ``seed``).
        n_micro: micro-batches per step.
        schedule: ``"gpipe"`` or ``"1f1b"``.
        loss_fn: ``loss_fn(logits, targets)`` mean loss of a micro-batch.
    """

    def __init__(
        self,
        cfg: GPTConfig,
        n_micro: int,
        schedule: str,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        seed: int = 0,
    ) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.rank, self.n = dist.get_rank(), dist.get_world_size()
        self.module = GPTStage(GPT(cfg, seed=seed), self.rank, self.n).to(device())
        stage = PipelineStage(self.module, self.rank, self.n, device())
        kinds = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
        if schedule not in kinds:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {sorted(kinds)}")
        self.schedule = kinds[schedule](stage, n_microbatches=n_micro, loss_fn=loss_fn)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.module.parameters()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Forward and backward of the batch; returns the mean loss on the last stage."""
        x, y = x.to(device()), y.to(device())
        if self.rank == 0 and self.n == 1:
            losses: list[torch.Tensor] = []
            self.schedule.step(x, target=y, losses=losses)
            return torch.stack(losses).mean().detach()
        if self.rank == 0:
            self.schedule.step(x)
            return None
        if self.rank == self.n - 1:
            losses = []
            self.schedule.step(target=y, losses=losses)
            return torch.stack(losses).mean().detach()
        self.schedule.step()
        return None
