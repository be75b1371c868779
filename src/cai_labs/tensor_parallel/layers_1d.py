"""1D tensor parallelism (Megatron-LM): split weight matrices by columns or by rows over N ranks.

A linear layer ``Y = X A + b`` (``A = weight.T``, shape ``(in, out)``) can be split two ways:

* **column-parallel**: rank ``r`` holds the columns ``A_r`` (``out/N`` of them) and computes
  ``Y_r = X A_r + b_r``. Every rank needs the whole ``X``; the output is split by columns.
  Backward: each rank only has ``dX_r = dY_r A_r^T``, a *partial* sum, so ``dX`` is all-reduced.
* **row-parallel**: rank ``r`` holds rows ``A_r`` (``in/N`` of them) and takes the matching
  columns ``X_r`` of its input; ``X_r A_r`` are partial sums, all-reduced in forward. The bias is
  added once, after the sum. Backward: ``dY`` is already whole on every rank, no communication.

Put column then row back to back (``fc1 -> GELU -> fc2``, ``qkv -> attention -> proj``) and the
split output of the first is exactly the split input of the second: one all-reduce in forward
(row-parallel's sum) and one in backward (column-parallel's ``dX``) per pair. Attention heads are
independent, so the column split of ``qkv`` by heads lets each rank run attention on its own
``n_heads/N`` heads with no communication at all.

Activations stay whole (replicated) between blocks: ``(b, s, d)`` on every rank. Layer norms are
replicated; they get identical gradients on every rank because ``dX`` is all-reduced.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cai_labs.comm import (
    copy_to_group,
    gather_from_group,
    reduce_from_group,
    scatter_to_group,
)
from cai_labs.models.gpt import Block, CausalSelfAttention, MLPBlock
from cai_labs.tensor_parallel.block import ParallelAttention, ParallelBlock, ParallelMLP
from cai_labs.tensor_parallel.grid import Grid, check_divisible
from cai_labs.tensor_parallel.sharding import (
    gather_by_position,
    init_like_linear,
    join_chunks,
    split_chunks,
)

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "ParallelAttention1D",
    "ParallelMLP1D",
    "ParallelBlock1D",
    "parallelize_block",
    "split_input",
    "gather_output",
    "gather_full",
]


def _shard(t: torch.Tensor, n: int, r: int, dim: int, chunks: int = 1) -> torch.Tensor:
    return split_chunks(t, n, r, dim, chunks)


def _unshard(t: torch.Tensor, grid: Grid, dim: int, chunks: int = 1) -> torch.Tensor:
    """Full tensor from every rank's part (collective; outside training, for comparisons)."""
    return join_chunks(gather_by_position(t, grid), dim, chunks)


class ColumnParallelLinear(nn.Module):
    """``Y = X A + b`` with ``A``'s output columns split over the grid.

    Shapes on each rank: input ``(..., in)`` whole; ``weight (out/N, in)``, ``bias (out/N,)``;
    output ``(..., out/N)``, or ``(..., out)`` with ``gather_output=True``.

    ``chunks`` > 1 treats the output as ``chunks`` stacked matrices split separately (a fused
    ``qkv`` is ``[q | k | v]``: each rank gets ``[q_r | k_r | v_r]``, so its heads are complete).

    ``reduce_input_grad=False`` leaves out the backward all-reduce of ``dX``: for several
    column-parallel layers reading the *same* input (separate ``q``, ``k``, ``v`` projections,
    as in Hugging Face models) the caller applies
    :func:`~cai_labs.comm.copy_to_group` once to that input, so the three
    partial ``dX`` are summed locally and all-reduced in one call, as with a fused ``qkv``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        grid: Grid,
        bias: bool = True,
        gather_output: bool = False,
        chunks: int = 1,
        reduce_input_grad: bool = True,
    ) -> None:
        super().__init__()
        check_divisible("out_features", out_features, grid.size * chunks, "1D")
        self.grid, self.gather_output, self.chunks = grid, gather_output, chunks
        self.reduce_input_grad = reduce_input_grad
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features // grid.size, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features // grid.size)) if bias else None
        init_like_linear(self.weight, self.bias, in_features)

    @classmethod
    def from_serial(
        cls,
        linear: nn.Linear,
        grid: Grid,
        gather_output: bool = False,
        chunks: int = 1,
        reduce_input_grad: bool = True,
    ) -> ColumnParallelLinear:
        """This rank's column slice of ``linear``'s weights (same initial values as serial)."""
        out_f, in_f = linear.weight.shape
        m = cls(
            in_f, out_f, grid, linear.bias is not None, gather_output, chunks, reduce_input_grad
        ).to(linear.weight.device, linear.weight.dtype)  # where the serial layer is
        n, r = grid.size, grid.position
        with torch.no_grad():
            m.weight.copy_(_shard(linear.weight, n, r, 0, chunks))
            if linear.bias is not None:
                m.bias.copy_(_shard(linear.bias, n, r, 0, chunks))
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduce_input_grad:
            x = copy_to_group(x, self.grid.group)  # backward: all-reduce dX
        y = F.linear(x, self.weight, self.bias)
        return gather_from_group(y, self.grid.group, -1) if self.gather_output else y

    def serial_state(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Full-shape ``weight``/``bias`` (or their gradients) as the serial layer has them."""
        out = {}
        for name in ("weight", "bias"):
            p = getattr(self, name)
            if p is not None:
                t = p.grad if grads else p
                out[name] = _unshard(t, self.grid, 0, self.chunks)
        return out


class RowParallelLinear(nn.Module):
    """``Y = X A + b`` with ``A``'s input rows split over the grid; partial sums all-reduced.

    Shapes on each rank: input ``(..., in/N)`` if ``input_is_parallel`` (the output of a
    :class:`ColumnParallelLinear`), else ``(..., in)`` whole and split here; ``weight
    (out, in/N)``; ``bias (out,)`` replicated, added after the all-reduce; output ``(..., out)``
    whole on every rank.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        grid: Grid,
        bias: bool = True,
        input_is_parallel: bool = True,
    ) -> None:
        super().__init__()
        check_divisible("in_features", in_features, grid.size, "1D")
        self.grid, self.input_is_parallel = grid, input_is_parallel
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features // grid.size))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        init_like_linear(self.weight, self.bias, in_features)

    @classmethod
    def from_serial(
        cls, linear: nn.Linear, grid: Grid, input_is_parallel: bool = True
    ) -> RowParallelLinear:
        """This rank's row slice of ``linear`` (same initial values as serial)."""
        out_f, in_f = linear.weight.shape
        m = cls(in_f, out_f, grid, linear.bias is not None, input_is_parallel).to(
            linear.weight.device, linear.weight.dtype
        )
        with torch.no_grad():
            m.weight.copy_(_shard(linear.weight, grid.size, grid.position, 1))
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_group(x, self.grid.group, -1)  # backward: all-gather dX
        y = reduce_from_group(F.linear(x, self.weight), self.grid.group)  # sum of partials
        return y + self.bias if self.bias is not None else y

    def serial_state(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Full-shape ``weight``/``bias`` (or their gradients)."""
        w = self.weight.grad if grads else self.weight
        out = {"weight": _unshard(w, self.grid, 1)}
        if self.bias is not None:
            out["bias"] = (self.bias.grad if grads else self.bias).detach().clone()
        return out


class ParallelAttention1D(ParallelAttention):
    """Causal self-attention with ``n_heads/N`` heads per rank.

    ``(b, s, d)`` whole -> qkv column-parallel ``(b, s, 3d/N)`` = this rank's heads' q, k, v ->
    attention on those heads -> ``(b, s, d/N)`` -> proj row-parallel -> ``(b, s, d)`` whole.
    """

    def __init__(self, attn: CausalSelfAttention, grid: Grid) -> None:
        check_divisible("n_heads", attn.n_heads, grid.size, "1D")
        super().__init__(
            ColumnParallelLinear.from_serial(attn.qkv, grid, chunks=3),
            RowParallelLinear.from_serial(attn.proj, grid),
            attn.n_heads // grid.size,
            attn.causal,
        )


class ParallelMLP1D(ParallelMLP):
    """``fc1`` column-parallel ``(b, s, r*d/N)`` -> GELU (elementwise, local) -> ``fc2``
    row-parallel ``(b, s, d)``."""

    def __init__(self, mlp: MLPBlock, grid: Grid) -> None:
        super().__init__(
            ColumnParallelLinear.from_serial(mlp.fc1, grid),
            RowParallelLinear.from_serial(mlp.fc2, grid),
        )


class ParallelBlock1D(ParallelBlock):
    """The serial :class:`~cai_labs.models.gpt.Block` with 1D-parallel attention and MLP.

    Input and output ``(b, s, d)`` whole on every rank; layer norms replicated.
    Communication per forward+backward: 4 all-reduces of ``b*s*d`` elements.
    """

    def __init__(self, block: Block, grid: Grid) -> None:
        super().__init__(
            copy.deepcopy(block.ln1),
            ParallelAttention1D(block.attn, grid),
            copy.deepcopy(block.ln2),
            ParallelMLP1D(block.mlp, grid),
        )
        self.grid = grid


def parallelize_block(block: Block, grid: Grid) -> ParallelBlock1D:
    """The 1D tensor-parallel twin of ``block`` (same weights), for this rank of ``grid``."""
    return ParallelBlock1D(block, grid)


def split_input(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """1D keeps activations whole: every rank gets the full ``(b, s, d)`` input."""
    return x


def gather_output(y: torch.Tensor, grid: Grid) -> torch.Tensor:
    """1D outputs are already whole on every rank."""
    return y


def gather_full(module: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Full-shape parameters (or gradients) of a parallel module, keyed like the serial one.

    Collective over the module's grid: every rank of the grid must call it.
    """
    return module.serial_state(grads)


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split over the grid (Megatron): rank ``r`` holds rows
    ``[r*V/N, (r+1)*V/N)`` of the table, ``(V/N, d)``.

    Each rank looks up the ids it owns and writes zeros for the others; the all-reduce of the
    ``(b, s, d)`` result (forward only) fills in every id. Backward needs no communication: the
    gradient ``(b, s, d)`` is whole on every rank and each rank scatters it into its own rows.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, grid: Grid) -> None:
        super().__init__()
        check_divisible("the vocabulary", num_embeddings, grid.size, "1D")
        self.grid, self.num_embeddings = grid, num_embeddings
        self.per_rank = num_embeddings // grid.size
        self.start = grid.position * self.per_rank
        self.weight = nn.Parameter(torch.randn(self.per_rank, embedding_dim))  # as nn.Embedding

    @classmethod
    def from_serial(cls, emb: nn.Embedding, grid: Grid) -> VocabParallelEmbedding:
        m = cls(emb.num_embeddings, emb.embedding_dim, grid).to(emb.weight.device)
        with torch.no_grad():
            m.weight.copy_(split_chunks(emb.weight, grid.size, grid.position, 0))
        return m

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        local = idx - self.start
        mine = (local >= 0) & (local < self.per_rank)
        out = F.embedding(local.clamp(0, self.per_rank - 1), self.weight)
        out = out * mine.unsqueeze(-1)
        return reduce_from_group(out, self.grid.group)

    def serial_state(self, grads: bool = False) -> dict[str, torch.Tensor]:
        return {"weight": _unshard(self.weight.grad if grads else self.weight, self.grid, 0)}
