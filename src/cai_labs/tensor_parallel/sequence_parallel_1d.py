"""Megatron sequence parallelism: 1D tensor parallelism with the sequence split between the linears.

Korthikanti et al. 2022, *Reducing Activation Recomputation in Large Transformer Models*. In a
1D tensor-parallel block (:mod:`~cai_labs.tensor_parallel.layers_1d`) the layer norms and the
residual adds run on the whole ``(b, s, h)`` activation on every one of the ``t`` ranks, so their
saved inputs do not shrink with ``t``. Here they run on a *sequence shard*: layout
``(b, s/t, h)``, rank ``r`` holding tokens ``[r*s/t, (r+1)*s/t)`` of every sequence (the
serial :class:`~cai_labs.models.gpt.Block`'s ``(b, s, h)``, split on dim 1). Between them:

* before each column-parallel linear (``qkv``, ``fc1``) Megatron's ``f`` (identity forward,
  all-reduce backward) becomes ``g``: an all-gather along the sequence in forward, a
  reduce-scatter of ``dX`` in backward;
* after each row-parallel linear (``proj``, ``fc2``) ``g-bar`` (all-reduce forward) becomes a
  reduce-scatter along the sequence in forward and an all-gather of ``dY`` in backward.

On a ring an all-gather plus a reduce-scatter move what one all-reduce moves, so the replaced
collectives cost the same; every saved activation is now ``1/t`` of the serial one, except the
causal mask (the same ``s^2`` bools on every rank).

The column-parallel linear keeps only its *shard* of the input for backward and all-gathers it
again there (as Megatron does, which overlaps that gather with the ``dX`` matmul): two more
all-gathers per block. ``regather=False`` saves the gathered input instead (no extra
collective, ``(t-1)/t * b*s*h`` more saved per column linear).

Layer norms and the row-parallel biases are replicated but now see only this rank's tokens:
their gradients are partial sums over the group. Each enters forward through
:func:`~cai_labs.comm.copy_to_group`, whose backward all-reduces its gradient (Megatron instead
all-reduces these gradients in one call after backward). The block has no dropout; a dropout
after ``proj``/``fc2`` would run on the shard too, with a different mask per rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx
from torch.distributed import ProcessGroup

from cai_labs.comm import (
    all_gather,
    copy_to_group,
    gather_from_group,
    gather_rs_group,
    reduce_scatter,
    reduce_scatter_group,
    scatter_to_group,
)
from cai_labs.models.gpt import Block
from cai_labs.tensor_parallel.block import ParallelAttention, ParallelBlock, ParallelMLP
from cai_labs.tensor_parallel.grid import Grid, check_divisible
from cai_labs.tensor_parallel.layers_1d import ColumnParallelLinear, RowParallelLinear

__all__ = [
    "SEQ_DIM",
    "SequenceParallelLayerNorm",
    "SequenceParallelColumnLinear",
    "SequenceParallelRowLinear",
    "SequenceParallelBlock",
    "parallelize_block",
    "split_input",
    "gather_output",
    "gather_full",
]

#: The sequence dimension of the ``(b, s, h)`` activations: shards are ``(b, s/t, h)``.
SEQ_DIM = 1


class _GatherLinear(torch.autograd.Function):
    """``F.linear(all_gather(x), weight, bias)`` that saves only the shard ``x``.

    Backward all-gathers ``x`` again for ``dW = dY^T X`` and reduce-scatters ``dX = dY W``
    (every rank used the whole ``X``, so each shard's gradient is a sum over ranks).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        group: ProcessGroup,
        dim: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.dim, ctx.has_bias = group, dim, bias is not None
        return F.linear(all_gather(x, group, dim), weight, bias)

    @staticmethod
    def backward(ctx: FunctionCtx, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        x_full = all_gather(x, ctx.group, ctx.dim)  # the gather Megatron overlaps with dX
        gx = reduce_scatter(gy @ weight, ctx.group, ctx.dim)
        gy2 = gy.reshape(-1, gy.shape[-1])
        gw = gy2.t() @ x_full.reshape(-1, x_full.shape[-1])
        gb = gy2.sum(0) if ctx.has_bias else None
        return gx, gw, gb, None, None


class SequenceParallelLayerNorm(nn.LayerNorm):
    """A replicated ``nn.LayerNorm`` on a sequence shard; ``weight``/``bias`` gradients are
    all-reduced over ``group`` in backward (each rank saw only its tokens)."""

    def __init__(self, ln: nn.LayerNorm, grid: Grid):
        if ln.weight is None or ln.bias is None:
            raise ValueError("SequenceParallelLayerNorm mirrors an affine nn.LayerNorm with a bias")
        w = ln.weight
        super().__init__(ln.normalized_shape, ln.eps, device=w.device, dtype=w.dtype)
        self.load_state_dict(ln.state_dict())
        self.group = grid.group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = copy_to_group(self.weight, self.group), copy_to_group(self.bias, self.group)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


class SequenceParallelColumnLinear(ColumnParallelLinear):
    """Column-parallel linear fed a sequence shard: ``(b, s/t, in)`` -> ``(b, s, out/t)``.

    Forward all-gathers the input along the sequence; backward reduce-scatters ``dX``. With
    ``regather`` (the default) only the shard is saved and gathered again in backward.
    """

    regather: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.grid.group
        if self.regather:
            return _GatherLinear.apply(x, self.weight, self.bias, g, SEQ_DIM)
        return F.linear(gather_rs_group(x, g, SEQ_DIM), self.weight, self.bias)


class SequenceParallelRowLinear(RowParallelLinear):
    """Row-parallel linear whose partial sums are reduce-scattered along the sequence:
    ``(b, s, in/t)`` -> ``(b, s/t, out)``; the replicated bias is added to the shard."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.grid.group
        y = reduce_scatter_group(F.linear(x, self.weight), g, SEQ_DIM)
        return y + copy_to_group(self.bias, g) if self.bias is not None else y


def _column(
    linear: nn.Linear, grid: Grid, regather: bool, chunks: int = 1
) -> SequenceParallelColumnLinear:
    m = SequenceParallelColumnLinear.from_serial(linear, grid, chunks=chunks)
    m.regather = regather
    return m


class SequenceParallelBlock(ParallelBlock):
    """The serial :class:`~cai_labs.models.gpt.Block` in tensor + sequence parallelism.

    Input and output ``(b, s/t, h)`` (this rank's sequence shard); inside attention and the MLP
    ``(b, s, h/t)`` as in 1D tensor parallelism. Per forward+backward: 4 all-gathers and
    4 reduce-scatters of ``b*s*h`` elements (plus 2 all-gathers with ``regather``) and 6
    all-reduces of ``h`` (the replicated norms' and biases' gradients).
    """

    def __init__(self, block: Block, grid: Grid, regather: bool = True):
        if grid.mode != "1d":
            raise ValueError(f"sequence parallelism runs on a 1d grid; got {grid.mode!r}")
        attn, mlp = block.attn, block.mlp
        check_divisible("n_heads", attn.n_heads, grid.size, "1D")
        super().__init__(
            SequenceParallelLayerNorm(block.ln1, grid),
            ParallelAttention(
                _column(attn.qkv, grid, regather, chunks=3),
                SequenceParallelRowLinear.from_serial(attn.proj, grid),
                attn.n_heads // grid.size,
                attn.causal,
            ),
            SequenceParallelLayerNorm(block.ln2, grid),
            ParallelMLP(
                _column(mlp.fc1, grid, regather),
                SequenceParallelRowLinear.from_serial(mlp.fc2, grid),
            ),
        )
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[SEQ_DIM] * self.grid.size
        if x.dim() != 3 or s > self.attn.causal.shape[0]:
            raise ValueError(
                f"expected this rank's sequence shard (b, s/t, h) with s <= "
                f"{self.attn.causal.shape[0]}; got {tuple(x.shape)} on {self.grid.size} ranks "
                "(split the input with split_input)"
            )
        return super().forward(x)


def parallelize_block(block: Block, grid: Grid, regather: bool = True) -> SequenceParallelBlock:
    """The tensor + sequence parallel twin of ``block`` (same weights) for this rank."""
    return SequenceParallelBlock(block, grid, regather)


def split_input(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Whole ``(b, s, h)`` -> this rank's ``(b, s/t, h)``; backward all-gathers the gradient."""
    if x.dim() != 3:
        raise ValueError(f"expected activations (b, s, h); got shape {tuple(x.shape)}")
    if x.shape[SEQ_DIM] % grid.size:
        raise ValueError(
            f"sequence parallelism splits the sequence (dim {SEQ_DIM} of (b, s, h)) into "
            f"{grid.size} equal shards; got shape {tuple(x.shape)}: choose a sequence length "
            f"divisible by {grid.size} or another number of ranks"
        )
    return scatter_to_group(x, grid.group, SEQ_DIM, copy=True)


def gather_output(y: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Every rank's ``(b, s/t, h)`` -> the whole ``(b, s, h)``; backward keeps this shard."""
    return gather_from_group(y.contiguous(), grid.group, SEQ_DIM)


def gather_full(module: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Full-shape parameters (or gradients) keyed like the serial Block (collective)."""
    return module.serial_state(grads)
