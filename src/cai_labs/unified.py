"""One GPT, any layout: serial, data, pipeline, tensor (1D/2D/2.5D/3D) parallel, or a hybrid.

:class:`ParallelGPT` is built on every rank from the same :class:`~cai_labs.models.gpt.GPTConfig`
and the same seed, so every layout starts from exactly the weights of the serial
:class:`~cai_labs.models.gpt.GPT`. Each rank

1. builds the whole serial model from the seed (small models only: a real system would build
   only its shard, e.g. on the ``meta`` device, and load its slice of a checkpoint);
2. keeps its pipeline stage (:class:`~cai_labs.pipeline.partition.GPTStage`);
3. replaces the stage's blocks by their tensor-parallel twins on its tensor grid
   (``parallelize_block(block, grid)`` of :mod:`cai_labs.tensor_parallel`); embeddings, final
   norm and head stay replicated over the grid;
4. joins its data-parallel group, whose members hold the same parameter shard.

A training step (:meth:`ParallelGPT.train_step`) takes the *global* batch on every rank: each
replica keeps its ``B / dp`` samples, its pipeline runs them as ``n_micro`` micro-batches (GPipe or
1F1B), tensor-parallel layers communicate inside forward and backward, and the replicas average
gradients before the optimizer step. Every process group is created collectively, by every rank,
in the same order, as ``torch.distributed.new_group`` requires.
"""

from __future__ import annotations

import importlib

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch import nn

from cai_labs.data_parallel import allreduce_gradients, shard_batch
from cai_labs.launcher import device
from cai_labs.layouts import Layout
from cai_labs.ledger import Ledger
from cai_labs.models.gpt import GPT, GPTConfig
from cai_labs.pipeline import GPTStage, StageLinks, pipeline_step

__all__ = ["ParallelGPT", "lm_loss", "tensor_parallel_api"]

_TP_MODULES = {"1d": "layers_1d", "2d": "layers_2d", "2.5d": "layers_2p5d", "3d": "layers_3d"}


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits ``(b, s, V)``, targets ``(b, s)``."""
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def tensor_parallel_api(mode: str):
    """The module of ``cai_labs.tensor_parallel`` implementing ``mode``: it provides
    ``parallelize_block(block, grid)``, ``split_input(x, grid)`` and ``gather_output(y, grid)``."""
    return importlib.import_module(f"cai_labs.tensor_parallel.{_TP_MODULES[mode]}")


class _EnterGrid(torch.autograd.Function):
    """Replicated ``(b, s, d)`` -> this rank's part (the mode's ``split_input``).

    Backward: the embeddings before it are replicated, so each copy needs the gradient of the
    whole activation, i.e. every rank's part put together (the mode's ``gather_output``).
    """

    @staticmethod
    def forward(ctx, x, api, grid):
        ctx.api, ctx.grid = api, grid
        return api.split_input(x, grid)

    @staticmethod
    def backward(ctx, g):
        return ctx.api.gather_output(g.contiguous(), ctx.grid), None, None


class _LeaveGrid(torch.autograd.Function):
    """This rank's part -> the whole ``(b, s, d)`` on every rank (the mode's ``gather_output``).

    Backward: every rank computes the same loss from the same whole activation, so the gradient
    of the whole activation is the same everywhere; each rank keeps its part (``split_input``).
    """

    @staticmethod
    def forward(ctx, y, api, grid):
        ctx.api, ctx.grid = api, grid
        return api.gather_output(y, grid)

    @staticmethod
    def backward(ctx, g):
        return ctx.api.split_input(g, ctx.grid), None, None


class ParallelGPT(nn.Module):
    """This rank's part of a GPT laid out by ``layout``. Collective: every rank constructs it.

    Args:
        cfg: the model's sizes (the same on every rank).
        layout: the parallel layout; its ``world_size`` must equal the number of ranks.
        seed: seed of the serial model's initial weights.

    Attributes:
        stage: this rank's :class:`~cai_labs.pipeline.partition.GPTStage` (holds the parameters).
        coords: ``(d, s, t)``: replica, stage, tensor-grid position of this rank.
        grid: this rank's tensor grid (None when ``tp == 1``).
    """

    def __init__(self, cfg: GPTConfig, layout: Layout, seed: int = 0):
        super().__init__()
        layout.validate(cfg)
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        if world != layout.world_size:
            raise ValueError(
                f"layout {layout.name} needs dp*pp*tp = {layout.world_size} ranks; "
                f"this run has {world}. Launch {layout.world_size} ranks or change the layout"
            )
        self.cfg, self.layout = cfg, layout
        self.coords = d, s, t = layout.coords(rank)

        # Process groups: built by every rank, for every group, in one fixed order.
        self.dp_group = None
        if layout.dp > 1:
            for ranks in layout.dp_rank_lists():
                g = dist.new_group(ranks)
                if rank in ranks:
                    self.dp_group = g
        self.grid = None
        if layout.tp > 1:
            from cai_labs.tensor_parallel.grid import build_grids

            self.grid = build_grids(layout.tp_mode, layout.tp_rank_lists(), layout.tp_depth)

        stage = GPTStage(GPT(cfg, seed=seed), s, layout.pp)
        if self.grid is not None:
            api = tensor_parallel_api(layout.tp_mode)
            grid = self.grid
            stage.blocks = nn.ModuleList(api.parallelize_block(b, grid) for b in stage.blocks)
            stage.enter_blocks = lambda x: _EnterGrid.apply(x, api, grid)
            stage.leave_blocks = lambda y: _LeaveGrid.apply(y, api, grid)
        self.stage = stage.to(device())  # the rank's GPU on a GPU node, else the CPU
        prev = layout.rank_of(d, s - 1, t) if s > 0 else None
        nxt = layout.rank_of(d, s + 1, t) if s < layout.pp - 1 else None
        self.links = StageLinks(prev, nxt)

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

        Returns the loss of the whole global batch (the same number the serial model gets), on
        every rank. Reporting it takes one all-reduce of one number, made through
        ``torch.distributed.distributed_c10d`` so the ledger does not count it as training
        traffic. With ``report_loss=False`` that all-reduce is skipped (it synchronises all
        ranks, which a timing loop may not want) and the local loss of this rank's replica is
        returned on the last stage (None elsewhere); :meth:`global_loss` combines them later.
        """
        lay = self.layout
        lay.validate(self.cfg, batch_size=x.shape[0])
        d, s, _ = self.coords
        x, y = shard_batch(x.to(device()), y.to(device()), rank=d, world_size=lay.dp)
        optimizer.zero_grad(set_to_none=True)
        loss = pipeline_step(
            self.stage,
            self.links,
            stage=s,
            n_stages=lay.pp,
            inputs=x,
            targets=y,
            n_micro=lay.n_micro,
            loss_fn=lm_loss,
            schedule=lay.schedule,
            ledger=ledger,
            step=step,
        )
        if self.dp_group is not None:
            allreduce_gradients(self.stage, group=self.dp_group)
        optimizer.step()
        return self.global_loss(loss) if report_loss else loss

    def global_loss(self, loss: torch.Tensor | None) -> float:
        """The global batch loss on every rank, from each rank's ``train_step`` local loss."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return float(loss)
        d, s, t = self.coords
        mine = loss if (s == self.layout.pp - 1 and t == 0) else None
        buf = torch.zeros((), dtype=torch.float64, device=device())
        if mine is not None:
            buf += float(mine) / self.layout.dp
        c10d.all_reduce(buf)
        return float(buf)
