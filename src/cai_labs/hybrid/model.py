""":class:`ParallelGPT`: this rank's part of a GPT under a :class:`~.layout.Layout`.

Built by :func:`~cai_labs.hybrid.apply.parallelize`. Holds this rank's pipeline stage
(:class:`~cai_labs.pipeline.partition.GPTStage`), its process groups and its loss, and runs a
training step on the *global* batch: each replica keeps its rows, each SP rank its tokens, the
pipeline runs micro-batches, and gradients are summed and averaged before the optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch import nn

from cai_labs.comm import gather_from_group
from cai_labs.data_parallel import allreduce_gradients, shard_batch
from cai_labs.hybrid.layout import Layout
from cai_labs.launcher import device
from cai_labs.ledger import Ledger
from cai_labs.models.gpt import GPT
from cai_labs.pipeline import GPTStage, StageLinks, pipeline_step
from cai_labs.sequence_parallel.chunking import split_sequence
from cai_labs.tensor_parallel.grid import Grid, build_grids

__all__ = ["LayoutGroups", "ParallelGPT", "lm_loss"]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits ``(b, s, V)``, targets ``(b, s)``."""
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _new_groups(rank_lists: list[list[int]], rank: int) -> dist.ProcessGroup | None:
    mine = None
    for ranks in rank_lists:
        g = dist.new_group(ranks)
        if rank in ranks:
            mine = g
    return mine


@dataclass
class LayoutGroups:
    """This rank's coordinates and process groups under a layout (None where a degree is 1)."""

    coords: tuple[int, int, int]
    dp_group: dist.ProcessGroup | None
    grid: Grid | None
    sp_group: dist.ProcessGroup | None

    @classmethod
    def build(cls, layout: Layout) -> LayoutGroups:
        """Collective: every rank creates every group, in one fixed order."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        if world != layout.world_size:
            dims = "dp*pp*sp" if layout.sp > 1 else "dp*pp*tp"
            raise ValueError(
                f"layout {layout.name} needs {dims} = {layout.world_size} ranks; this run has "
                f"{world}. Launch {layout.world_size} ranks or change the layout"
            )
        dp = _new_groups(layout.dp_rank_lists(), rank) if layout.dp > 1 else None
        grid = None
        if layout.tp > 1:
            grid = build_grids(layout.tp_mode, layout.tp_rank_lists(), layout.tp_depth)
        sp = _new_groups(layout.tp_rank_lists(), rank) if layout.sp > 1 else None
        return cls(layout.coords(rank), dp, grid, sp)


class ParallelGPT(nn.Module):
    """This rank's part of a GPT. Build it with ``parallelize(gpt, layout)`` (collective).

    Attributes:
        stage: this rank's :class:`~cai_labs.pipeline.partition.GPTStage` (the parameters).
        coords: ``(d, s, t)``: replica, stage, position in the tensor grid or SP group.
        grid: the tensor grid (None when ``tp == 1``); ``sp_group``: the SP group or None.
        dp_group: the group whose gradients are averaged before the step (set by ``apply_dp``).
        loss_fn: ``loss_fn(logits, targets)`` of one micro-batch, as the stage's output needs.
        grad_sum_groups: groups over which gradients are *summed* first (SP ranks hold
            partial gradients of the same parameters).
        zero: the :class:`~cai_labs.zero.ZeroModel` around the stage (set by ``apply_zero``).
    """

    def __init__(self, gpt: GPT, layout: Layout, groups: LayoutGroups) -> None:
        super().__init__()
        self.cfg, self.layout, self.groups = gpt.cfg, layout, groups
        self.coords, self.grid, self.sp_group = groups.coords, groups.grid, groups.sp_group
        self.stage = GPTStage(gpt, 0, 1)  # the whole model, until apply_pp keeps one stage
        self.links = StageLinks(None, None)
        self.loss_fn = lm_loss
        self.grad_sum_groups: list[dist.ProcessGroup] = []
        self.dp_group: dist.ProcessGroup | None = None
        self.zero = None

    # -- training ------------------------------------------------------------------------------
    def make_optimizer(
        self, cls: type[torch.optim.Optimizer], **kwargs: Any
    ) -> torch.optim.Optimizer:
        """``cls`` over this rank's parameters (sharded over the replicas under ZeRO)."""
        if self.zero is not None:
            from cai_labs.zero import ZeroOptimizer

            return ZeroOptimizer(self.zero, cls, **kwargs)
        return cls(self.parameters(), **kwargs)

    def local_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows (its replica) and tokens (its SP chunk) of the global batch."""
        d, _, t = self.coords
        x, y = shard_batch(x.to(device()), y.to(device()), rank=d, world_size=self.layout.dp)
        if self.layout.sp > 1:
            x, y = (split_sequence(v, t, self.layout.sp) for v in (x, y))
        return x, y

    def sync_gradients(self) -> None:
        """Sum gradients over the SP group, then average them over the replicas (ZeRO does the
        latter in its optimizer step)."""
        for group in self.grad_sum_groups:
            for p in self.stage.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=group)
        if self.dp_group is not None and self.zero is None:
            allreduce_gradients(self.stage, group=self.dp_group)

    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        ledger: Ledger | None = None,
        step: int = 0,
        report_loss: bool = True,
    ) -> float | torch.Tensor | None:
        """One optimizer step on the global batch ``x``, ``y`` (both ``(B, s)`` int64).

        Returns the loss of the whole global batch (the serial model's number) on every rank,
        via one all-reduce of one number made through ``distributed_c10d`` so the ledger does
        not count it. With ``report_loss=False`` it returns this rank's share on the last
        stage (None elsewhere); :meth:`global_loss` combines the shares later.
        """
        lay = self.layout
        lay.validate(self.cfg, batch_size=x.shape[0])
        x, y = self.local_batch(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss = pipeline_step(
            self.stage,
            self.links,
            stage=self.coords[1],
            n_stages=lay.pp,
            inputs=x,
            targets=y,
            n_micro=lay.n_micro,
            loss_fn=self.loss_fn,
            schedule=lay.schedule,
            ledger=ledger,
            step=step,
        )
        self.sync_gradients()
        optimizer.step()
        return self.global_loss(loss) if report_loss else loss

    def global_loss(self, loss: torch.Tensor | None) -> float:
        """The global batch loss on every rank, from each rank's ``train_step`` local loss."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return float(loss)
        _, s, t = self.coords
        counted = s == self.layout.pp - 1 and (t == 0 or self.layout.sp > 1)
        buf = torch.zeros((), dtype=torch.float64, device=device())
        if counted and loss is not None:
            buf += float(loss) / self.layout.dp
        c10d.all_reduce(buf)
        return float(buf)

    # -- one whole model on this rank's grid (pp == 1) ----------------------------------------
    def _whole(self) -> None:
        lay = self.layout
        if lay.pp > 1 or lay.sp > 1:
            raise ValueError(
                f"layout {lay.name}: forward/loss need the whole model and sequence on each "
                "rank (pp=1, sp=1); use train_step for pipelined or sequence-parallel layouts"
            )

    def head_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits as the loss consumes them: ``(b, s, V/tp)`` (this rank's vocabulary slice)
        with a vocabulary-parallel head, else ``(b, s, V)``."""
        self._whole()
        return self.stage(idx)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """The whole logits ``(b, s, V)`` on every rank (gathered from the vocabulary slices)."""
        logits = self.head_logits(idx)
        if self.grid is not None and logits.shape[-1] != self.cfg.vocab_size:
            logits = gather_from_group(logits, self.grid.group, -1)
        return logits

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all ``b*s`` tokens of ``idx``, the same on every rank."""
        return self.loss_fn(self.head_logits(idx), targets)

    def serial_state(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """This stage's parameters (or gradients) at full shape, keyed like the serial
        ``GPT.named_parameters()``. Collective over the tensor grid."""
        st, out = self.stage, {}
        for name in ("tok_emb", "pos_emb", "ln_f", "head"):
            if hasattr(st, name):
                out.update({f"{name}.{k}": v for k, v in _state(getattr(st, name), grads).items()})
        for i, block in zip(st.layer_ids, st.blocks):
            out.update({f"blocks.{i}.{k}": v for k, v in _state(block, grads).items()})
        return out


def _state(mod: nn.Module, grads: bool) -> dict[str, torch.Tensor]:
    if hasattr(mod, "serial_state"):
        return mod.serial_state(grads)
    if hasattr(mod, "emb"):  # OffsetPositions
        mod = mod.emb
    return {n: (p.grad if grads else p).detach().clone() for n, p in mod.named_parameters()}
