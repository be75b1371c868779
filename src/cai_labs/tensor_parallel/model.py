"""The whole GPT on a tensor-parallel grid: embeddings, blocks, final norm, head and loss.

:class:`TensorParallelGPT` is built from a serial :class:`~cai_labs.models.gpt.GPT` (same
weights) for any mode. Around the blocks:

* **embeddings** — 1D splits the token table by vocabulary (:class:`~.layers_1d.
  VocabParallelEmbedding`, one all-reduce) and replicates the position table; 2D/2.5D/3D split
  both tables by feature columns, so each rank's local lookup of its batch block is already its
  activation block (the tables' gradients are summed over the ranks that share a block);
* **final layer norm** — the mode's norm (replicated in 1D);
* **classifier head** ``d -> V`` — the mode's linear; its logits are split by vocabulary. In
  2D/2.5D/3D they are all-gathered along the vocabulary (backward: keep the own slice) so that
  each rank computes the cross-entropy of its own batch block. In 1D the head is a
  column-parallel linear that keeps its output split, ``(b, s, V/N)``, and the loss is
  :func:`~cai_labs.tensor_parallel.cross_entropy.vocab_parallel_cross_entropy`: three
  all-reduces of ``b*s`` numbers instead of an all-gather of ``b*s*V``, and no rank ever holds
  the whole ``(b, s, V)`` (``forward`` still gathers, for users who want the logits);
* **loss** — the sum of the local cross-entropies, all-reduced over the ranks holding different
  batch blocks, divided by the number of tokens: the same mean loss on every rank, and its
  backward gives every rank exactly its share of the gradient.

Input: the whole batch of token ids ``(b, s)`` on every rank (ids are tiny); each rank takes its
batch block itself.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cai_labs.models.gpt import GPT
from cai_labs.tensor_parallel import layers_1d, layers_2d, layers_3d
from cai_labs.tensor_parallel.check import mode_module
from cai_labs.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from cai_labs.tensor_parallel.grid import Grid
from cai_labs.tensor_parallel.mappings import gather_from_group, reduce_from_group

__all__ = ["TensorParallelGPT"]


def _plain_state(mod: nn.Module, grads: bool) -> dict[str, torch.Tensor]:
    return {n: (p.grad if grads else p).detach().clone() for n, p in mod.named_parameters()}


class TensorParallelGPT(nn.Module):
    """:class:`~cai_labs.models.gpt.GPT` in ``grid.mode`` tensor parallelism, for this rank.

    ``forward(idx)`` returns this rank's logits ``(b_local, s, V)`` (whole vocabulary, local
    batch block); ``loss(idx, targets)`` the mean cross-entropy over the whole batch, equal on
    every rank; ``serial_state(grads)`` every parameter (or gradient) at full shape under the
    serial model's names (collective).
    """

    def __init__(self, gpt: GPT, grid: Grid):
        super().__init__()
        self.cfg, self.grid, self.mode = gpt.cfg, grid, grid.mode
        layers = mode_module(grid.mode)
        if self.mode == "1d":
            self.tok_emb = layers_1d.VocabParallelEmbedding.from_serial(gpt.tok_emb, grid)
            self.pos_emb = copy.deepcopy(gpt.pos_emb)
            self.ln_f = copy.deepcopy(gpt.ln_f)
            # logits stay split by vocabulary: (b, s, V/N); see loss()
            self.head = layers_1d.ColumnParallelLinear.from_serial(gpt.head, grid)
        elif self.mode in ("2d", "2.5d"):
            self.tok_emb = layers_2d.Embedding2D(gpt.tok_emb, grid)
            self.pos_emb = layers_2d.Embedding2D(gpt.pos_emb, grid)
            self.ln_f = layers_2d.LayerNorm2D(gpt.ln_f, grid)
            self.head = layers_2d.Linear2D.from_serial(gpt.head, grid)
        else:
            self.tok_emb = layers_3d.Embedding3D(gpt.tok_emb, grid)
            self.pos_emb = layers_3d.Embedding3D(gpt.pos_emb, grid)
            self.ln_f = layers_3d.LayerNorm3D(gpt.ln_f, grid, layers_3d.EVEN)
            self.head = layers_3d.Linear3D.from_serial(gpt.head, grid, layers_3d.EVEN)
        self.blocks = nn.ModuleList(layers.parallelize_block(b, grid) for b in gpt.blocks)

    def split_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's batch block of ``idx`` ``(b, s)`` (the block its activations hold)."""
        if self.mode == "1d":
            return idx
        if self.mode == "3d":
            return layers_3d.split_ids(idx, self.grid)
        return layers_2d.split_ids(idx, self.grid)

    def split_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """This rank's batch block of the targets, matching the logits' rows (in 3D the head
        swaps layout axes, so the logits' batch block is ``i*q + l``)."""
        if self.mode == "3d":
            q, (i, _, l_coord) = self.grid.q, self.grid.coord
            return targets.chunk(q * q, dim=0)[i * q + l_coord]
        return self.split_ids(targets)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = self.head_logits(idx)
        if self.mode == "1d":
            logits = gather_from_group(logits, self.grid.group, -1)
        return logits

    def head_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """The logits as the loss consumes them: in 1D this rank's vocabulary slice of every
        token ``(b, s, V/N)``; in the other modes the whole vocabulary of the local batch block
        ``(b_local, s, V)``."""
        b, s = idx.shape
        if s > self.cfg.seq_len:
            raise ValueError(f"sequence of {s} tokens is longer than seq_len={self.cfg.seq_len}")
        pos = torch.arange(s, device=idx.device)
        x = self.tok_emb(self.split_ids(idx)) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if self.mode in ("2d", "2.5d"):
            logits = gather_from_group(logits, self.grid.row_group, -1)
        elif self.mode == "3d":
            logits = gather_from_group(logits, self.grid.axis_groups[1], -1)
        return logits

    def _batch_groups(self) -> list:
        """Groups over which the batch blocks of the logits differ."""
        g = self.grid
        if self.mode == "1d":
            return []
        if self.mode == "3d":
            return [g.axis_groups[0], g.axis_groups[2]]
        return [g.col_group] + ([g.depth_group] if g.depth > 1 else [])

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all ``b*s`` tokens, the same value on every rank."""
        logits = self.head_logits(idx)
        t = self.split_targets(targets)
        if self.mode == "1d":
            total = vocab_parallel_cross_entropy(
                logits, t, self.grid.group, reduction="sum", vocab_size=self.cfg.vocab_size
            )
        else:
            total = F.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="sum")
        for group in self._batch_groups():
            total = reduce_from_group(total, group)
        return total / targets.numel()

    def serial_state(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Every parameter (or gradient) at full shape, keyed like ``GPT.named_parameters()``."""
        out: dict[str, torch.Tensor] = {}
        for name in ("tok_emb", "pos_emb", "ln_f", "head"):
            mod = getattr(self, name)
            state = (
                mod.serial_state(grads)
                if hasattr(mod, "serial_state")
                else _plain_state(mod, grads)
            )
            out.update({f"{name}.{k}": v for k, v in state.items()})
        for i, block in enumerate(self.blocks):
            out.update({f"blocks.{i}.{k}": v for k, v in block.serial_state(grads).items()})
        return out
