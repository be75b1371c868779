"""3D tensor parallelism: activations and weights split over a ``q x q x q`` cube.

Rank ``(i, j, l)`` (position ``i*q*q + j*q + l``) of a linear layer ``Y = X A`` whose input
layout is given by three grid axes ``(a, b, c)``:

* holds ``X``'s block with batch block ``(coord[a], coord[b])`` (``q²`` blocks, ``a`` major) and
  feature block ``coord[c]``: ``(b/q², s, K/q)``;
* holds a ``1/q`` shard (split over axis ``a``) of the weight block ``A_{cb}`` (input block
  ``coord[c]``, output block ``coord[b]``): ``weight (N/q², K/q)``.

Forward: all-gather ``X`` along axis ``b`` (-> ``X_{a,c}``, ``(b/q, s, K/q)``) and the weight
along axis ``a`` (-> ``A_{cb}``); multiply; the products are partial sums over the input blocks
``c``, so reduce-scatter them along axis ``c``. The output has batch block
``(coord[a], coord[c])`` and feature block ``coord[b]``: the input layout with axes ``b`` and
``c`` swapped. Consecutive linears therefore alternate between layout ``(0, 1, 2)`` and
``(0, 2, 1)``; a transformer block has two linears per branch, so the residual stream stays in
``(0, 1, 2)``.

Backward: all-gather ``dY`` along ``c``; re-gather ``X`` and ``A`` (only the shards were saved,
so activation memory is ``1/q³`` of serial); ``dX`` is a partial sum over output blocks ``b``:
reduce-scatter along ``b``; ``dA`` is a partial sum over batch blocks ``a``: reduce-scatter
along ``a`` back to the shard.

The bias block ``b_{coord[b]}`` is replicated over axes ``a`` and ``c`` (gradient summed over
both); a layer norm on layout ``(a, b, c)`` sums its statistics along ``c`` and its parameters'
gradients over ``a`` and ``b``. Attention is local: after ``qkv`` a rank holds whole heads
(head group ``coord[b]``) for whole sequences.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import FunctionCtx

from cai_labs.comm import (
    all_gather,
    all_reduce_both,
    copy_to_group,
    reduce_scatter,
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
    "EVEN",
    "ODD",
    "linear_3d",
    "Linear3D",
    "LayerNorm3D",
    "Attention3D",
    "MLP3D",
    "Block3D",
    "parallelize_block",
    "split_input",
    "gather_output",
    "gather_full",
]

#: Layout of the residual stream and of the first linear of each pair: rows (i, j), features l.
EVEN = (0, 1, 2)
#: Layout after one linear: rows (i, l), features j.
ODD = (0, 2, 1)


class _Linear3D(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        grid: Grid,
        axes: tuple[int, int, int],
    ) -> torch.Tensor:
        a, b, c = axes
        g = grid.axis_groups
        x = x.contiguous()
        ctx.save_for_backward(x, weight)  # shards only
        ctx.grid, ctx.axes = grid, axes
        xg = all_gather(x, g[b], 0)  # (b/q, s, K/q): batch block a, input block c
        wg = all_gather(weight.detach(), g[a], 0)  # (N/q, K/q): A_{cb} transposed
        return reduce_scatter(xg @ wg.t(), g[c], 0)  # sum over c; keep batch sub-block c

    @staticmethod
    def backward(ctx: FunctionCtx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        a, b, c = ctx.axes
        g = ctx.grid.axis_groups
        dyg = all_gather(dy.contiguous(), g[c], 0)  # (b/q, s, N/q)
        xg = all_gather(x, g[b], 0)
        wg = all_gather(weight.detach(), g[a], 0)
        dx = reduce_scatter(dyg @ wg, g[b], 0)  # partial over output blocks b
        dwg = dyg.reshape(-1, dyg.shape[-1]).t() @ xg.reshape(-1, xg.shape[-1])
        dw = reduce_scatter(dwg, g[a], 0)  # partial over batch blocks a
        return dx, dw, None, None


def linear_3d(x: torch.Tensor, weight: torch.Tensor, grid: Grid, axes: tuple) -> torch.Tensor:
    """``X A`` on the cube for input layout ``axes`` (see the module docstring)."""
    return _Linear3D.apply(x, weight, grid, tuple(axes))


class Linear3D(nn.Module):
    """``Y = X A + b`` on the cube. Input layout ``axes``, output layout ``axes`` with the last
    two swapped. Input ``(b/q², s, K/q)``, output ``(b/q², s, N/q)``, ``weight (N/q², K/q)``,
    ``bias (N/q,)`` replicated over axes ``a`` and ``c``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        grid: Grid,
        axes: tuple[int, int, int] = EVEN,
        bias: bool = True,
    ) -> None:
        super().__init__()
        q = grid.q
        check_divisible("in_features", in_features, q, "3D")
        check_divisible("out_features", out_features, q * q, "3D")
        self.grid, self.axes = grid, tuple(axes)
        self.in_features, self.out_features, self.chunks = in_features, out_features, 1
        self.weight = nn.Parameter(torch.empty(out_features // (q * q), in_features // q))
        self.bias = nn.Parameter(torch.zeros(out_features // q)) if bias else None
        init_like_linear(self.weight, self.bias, in_features)

    @classmethod
    def from_serial(
        cls, linear: nn.Linear, grid: Grid, axes: tuple[int, int, int] = EVEN, chunks: int = 1
    ) -> Linear3D:
        """This rank's shard of ``linear`` (``chunks=3`` for a fused qkv)."""
        out_f, in_f = linear.weight.shape
        m = cls(in_f, out_f, grid, axes, linear.bias is not None).to(linear.weight.device)
        m.chunks = chunks
        a, b, c = (grid.coord[ax] for ax in m.axes)
        q = grid.q
        with torch.no_grad():
            block = split_chunks(linear.weight, q, b, 0, chunks)  # output block b
            block = split_chunks(block, q, c, 1)  # input block c
            m.weight.copy_(split_chunks(block, q, a, 0))  # shard a of the block's rows
            if linear.bias is not None:
                m.bias.copy_(split_chunks(linear.bias, q, b, 0, chunks))
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear_3d(x, self.weight, self.grid, self.axes)
        if self.bias is None:
            return y
        a, _, c = self.axes
        g = self.grid.axis_groups
        return y + copy_to_group(copy_to_group(self.bias, g[a]), g[c])

    def serial_state(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Full-shape ``weight``/``bias`` (or gradients). Collective over the cube."""
        grid, q = self.grid, self.grid.q
        a, b, c = self.axes
        w = gather_by_position(self.weight.grad if grads else self.weight, grid)

        def at(coords: dict[int, int]) -> int:
            return coords[0] * q * q + coords[1] * q + coords[2]

        out_blocks = []
        for bb in range(q):
            cols = []
            for cc in range(q):
                shards = [w[at({a: t, b: bb, c: cc})] for t in range(q)]
                cols.append(torch.cat(shards, dim=0))
            out_blocks.append(torch.cat(cols, dim=1))
        out = {"weight": join_chunks(out_blocks, 0, self.chunks)}
        if self.bias is not None:
            bs = gather_by_position(self.bias.grad if grads else self.bias, grid)
            out["bias"] = join_chunks(
                [bs[at({a: 0, b: bb, c: 0})] for bb in range(q)], 0, self.chunks
            )
        return out


class LayerNorm3D(nn.Module):
    """Layer norm on layout ``axes``: features split along axis ``c`` (statistics summed
    there), ``weight``/``bias`` ``(d/q,)`` replicated over axes ``a`` and ``b``."""

    def __init__(self, ln: nn.LayerNorm, grid: Grid, axes: tuple[int, int, int] = EVEN) -> None:
        super().__init__()
        (h,) = ln.normalized_shape
        check_divisible("d_model", h, grid.q, "3D")
        self.grid, self.axes, self.eps, self.h = grid, tuple(axes), ln.eps, h
        c = grid.coord[self.axes[2]]
        self.weight = nn.Parameter(split_chunks(ln.weight.detach(), grid.q, c, 0))
        self.bias = nn.Parameter(split_chunks(ln.bias.detach(), grid.q, c, 0))

    def _replicated(self, p: torch.Tensor) -> torch.Tensor:
        a, b, _ = self.axes
        g = self.grid.axis_groups
        return copy_to_group(copy_to_group(p, g[a]), g[b])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.grid.axis_groups[self.axes[2]]
        mean = all_reduce_both(x.sum(-1, keepdim=True), feat) / self.h
        xc = x - mean
        var = all_reduce_both((xc * xc).sum(-1, keepdim=True), feat) / self.h
        y = xc * torch.rsqrt(var + self.eps)
        return y * self._replicated(self.weight) + self._replicated(self.bias)

    def serial_state(self, grads: bool = False) -> dict[str, torch.Tensor]:
        q, c = self.grid.q, self.axes[2]
        out = {}
        for name in ("weight", "bias"):
            p = getattr(self, name)
            parts = gather_by_position(p.grad if grads else p, self.grid)
            idx = [q ** (2 - c) * t for t in range(q)]  # positions with coord[c] = t, others 0
            out[name] = torch.cat([parts[k] for k in idx])
        return out


class Attention3D(ParallelAttention):
    """``qkv`` (layout EVEN -> ODD), local attention on head group ``j`` for batch block
    ``(i, l)``, ``proj`` (ODD -> EVEN). ``(b/q², s, d/q)`` in and out."""

    def __init__(self, attn: CausalSelfAttention, grid: Grid) -> None:
        check_divisible("n_heads", attn.n_heads, grid.q, "3D")
        super().__init__(
            Linear3D.from_serial(attn.qkv, grid, EVEN, chunks=3),
            Linear3D.from_serial(attn.proj, grid, ODD),
            attn.n_heads // grid.q,
            attn.causal,
        )


class MLP3D(ParallelMLP):
    """``fc1`` (EVEN -> ODD) -> GELU -> ``fc2`` (ODD -> EVEN)."""

    def __init__(self, mlp: MLPBlock, grid: Grid) -> None:
        super().__init__(
            Linear3D.from_serial(mlp.fc1, grid, EVEN), Linear3D.from_serial(mlp.fc2, grid, ODD)
        )


class Block3D(ParallelBlock):
    """The serial :class:`~cai_labs.models.gpt.Block` on the cube; residual stream in layout
    EVEN: ``(b/q², s, d/q)`` with batch block ``i*q + j`` and feature block ``l``."""

    def __init__(self, block: Block, grid: Grid) -> None:
        if grid.mode != "3d":
            raise ValueError(f"3D layers need a 3d grid (q x q x q); got a {grid.mode} grid")
        super().__init__(
            LayerNorm3D(block.ln1, grid),
            Attention3D(block.attn, grid),
            LayerNorm3D(block.ln2, grid),
            MLP3D(block.mlp, grid),
        )
        self.grid = grid


def parallelize_block(block: Block, grid: Grid) -> Block3D:
    """The 3D tensor-parallel twin of ``block`` (same weights) for this rank."""
    return Block3D(block, grid)


def split_input(x: torch.Tensor, grid: Grid, axes: tuple[int, int, int] = EVEN) -> torch.Tensor:
    """This rank's block of a whole ``(b, s, d)`` activation in layout ``axes``."""
    if grid.mode != "3d":
        raise ValueError(f"3D layers need a 3d grid (q x q x q); got a {grid.mode} grid")
    q = grid.q
    a, b, c = (grid.coord[ax] for ax in axes)
    check_divisible("the batch", x.shape[0], q * q, "3D")
    check_divisible("the features", x.shape[-1], q, "3D")
    return x.chunk(q * q, dim=0)[a * q + b].chunk(q, dim=-1)[c].contiguous()


def gather_output(y: torch.Tensor, grid: Grid, axes: tuple[int, int, int] = EVEN) -> torch.Tensor:
    """Whole ``(b, s, d)`` from every rank's block in layout ``axes``."""
    q = grid.q
    parts = gather_by_position(y, grid)
    a, b, c = axes
    rows = []
    for ra in range(q):
        for rb in range(q):
            blocks = []
            for rc in range(q):
                coords = {a: ra, b: rb, c: rc}
                blocks.append(parts[coords[0] * q * q + coords[1] * q + coords[2]])
            rows.append(torch.cat(blocks, dim=-1))
    return torch.cat(rows, dim=0)


def gather_full(module: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Full-shape parameters (or gradients) keyed like the serial module. Collective."""
    return module.serial_state(grads)
