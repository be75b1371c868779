"""2D tensor parallelism (Optimus / SUMMA): activations AND weights split on a ``q x q`` grid.

1D keeps every activation whole on every rank. 2D splits them too: rank ``(i, j)`` holds

* the activation block ``X_ij``: batch block ``i`` (of ``q``), feature block ``j`` (of ``q``),
  shape ``(b/q, s, d/q)``;
* the weight block ``A_ij`` of ``A = weight.T`` (``(K, N)``): input block ``i``, output block
  ``j``, stored as ``weight`` ``(N/q, K/q)``.

``Y = X A`` is computed by SUMMA in ``q`` steps: at step ``t`` rank ``(i, t)`` broadcasts
``X_it`` along its grid row and rank ``(t, j)`` broadcasts ``A_tj`` along its grid column, and
every rank adds ``X_it A_tj`` to its ``Y_ij``. The output has the same layout as the input
(batch block ``i``, feature block ``j``), so linears chain with no re-layout.

Backward is two more SUMMAs: ``dX_it = sum_j dY_ij A_tj^T`` (broadcast ``A_tj`` down columns,
*reduce* the partial products along rows to ``(i, t)``) and ``dA_tj = sum_i X_it^T dY_ij``
(broadcast ``X_it`` along rows, reduce down columns to ``(t, j)``). Only the local blocks are
saved for backward: activation memory ``1/q²`` of serial.

Around the linears: the bias block ``b_j`` and the layer-norm weights are replicated down a
column, so their gradients are summed over the column (:func:`~cai_labs.comm.copy_to_group`); a
layer norm's mean and variance are sums over features split along a row, so they are
all-reduced along the row (:func:`~cai_labs.comm.all_reduce_both`). Attention: ``qkv``'s output
block ``j`` is ``[q_j | k_j | v_j]`` of head group ``j``, and each rank holds whole sequences,
so attention is local.

The same code runs 2.5D (:mod:`.layers_2p5d`): ``d`` independent 2D grids on ``d`` batch blocks
whose weight, bias and norm gradients are additionally summed over the depth axis.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import FunctionCtx

from cai_labs.comm import all_reduce, all_reduce_both, broadcast_, copy_to_group, reduce_
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
    "summa_linear",
    "Linear2D",
    "LayerNorm2D",
    "Attention2D",
    "MLP2D",
    "Block2D",
    "parallelize_block",
    "split_input",
    "gather_output",
    "gather_full",
]

_MODE_NAME = {"2d": "2D", "2.5d": "2.5D"}


def _ijk(grid: Grid) -> tuple[int, int, int]:
    """``(i, j, k)``: row, column and depth layer of this rank (``k = 0`` in 2D)."""
    i, j = grid.coord[-2:]
    return i, j, (grid.coord[0] if grid.mode == "2.5d" else 0)


def _reduce_to(x: torch.Tensor, dst: int, group: dist.ProcessGroup, keep: bool) -> torch.Tensor:
    buf = reduce_(x.contiguous().clone(), dst, group)
    return buf if keep else x


class _Summa(torch.autograd.Function):
    """``Y_ij = sum_t X_it A_tj`` with its two backward SUMMAs (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: torch.Tensor, weight: torch.Tensor, grid: Grid
    ) -> torch.Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.grid = grid
        q = grid.q
        rows, cols = grid.axis_ranks[-1], grid.axis_ranks[-2]  # (i, .) and (., j) lines
        out = None
        for t in range(q):
            xt = x.detach() if grid.coord[-1] == t else torch.empty_like(x)
            wt = weight.detach() if grid.coord[-2] == t else torch.empty_like(weight)
            if q > 1:
                broadcast_(xt, rows[t], grid.row_group)
                broadcast_(wt, cols[t], grid.col_group)
            y = xt @ wt.t()
            out = y if out is None else out + y
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grid = ctx.grid
        q, (i, j, _) = grid.q, _ijk(grid)
        rows, cols = grid.axis_ranks[-1], grid.axis_ranks[-2]
        dy = dy.contiguous()
        dx = dw = None
        for t in range(q):
            # dX_it = sum_j dY_ij A_tj^T: A_tj comes down column j, partials meet at (i, t).
            wt = weight.detach() if i == t else torch.empty_like(weight)
            if q > 1:
                broadcast_(wt, cols[t], grid.col_group)
            part = dy @ wt
            dx_t = _reduce_to(part, rows[t], grid.row_group, j == t) if q > 1 else part
            if j == t:
                dx = dx_t
        for t in range(q):
            # dA_tj = sum_i X_it^T dY_ij: X_it comes along row i, partials meet at (t, j).
            xt = x.detach() if j == t else torch.empty_like(x)
            if q > 1:
                broadcast_(xt, rows[t], grid.row_group)
            part = dy.reshape(-1, dy.shape[-1]).t() @ xt.reshape(-1, xt.shape[-1])
            dw_t = _reduce_to(part, cols[t], grid.col_group, i == t) if q > 1 else part
            if i == t:
                dw = dw_t
        if grid.depth_group is not None and grid.depth > 1:
            dw = all_reduce(dw, grid.depth_group)  # each depth layer saw its own batch block
        return dx, dw, None


def summa_linear(x: torch.Tensor, weight: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``X A`` on the grid: ``x`` ``(..., K/q)`` block ``(i, j)``, ``weight`` ``(N/q, K/q)``
    (``A_ij`` transposed); returns ``(..., N/q)`` block ``(i, j)`` of ``Y``."""
    return _Summa.apply(x, weight, grid)


def _replicated(p: torch.Tensor, grid: Grid) -> torch.Tensor:
    """A parameter shard replicated down the grid column (and across depth): identity forward,
    gradient summed over the ranks that share it."""
    p = copy_to_group(p, grid.col_group)
    if grid.depth_group is not None and grid.depth > 1:
        p = copy_to_group(p, grid.depth_group)
    return p


class Linear2D(nn.Module):
    """``Y = X A + b`` by SUMMA. Input ``(b/q, s, K/q)``, output ``(b/q, s, N/q)`` (2.5D: batch
    block ``b/(dq)``); ``weight (N/q, K/q)``; ``bias (N/q,)`` replicated down the column."""

    def __init__(self, in_features: int, out_features: int, grid: Grid, bias: bool = True) -> None:
        super().__init__()
        name = _MODE_NAME[grid.mode]
        check_divisible("in_features", in_features, grid.q, name)
        check_divisible("out_features", out_features, grid.q, name)
        self.grid, self.in_features, self.out_features = grid, in_features, out_features
        q = grid.q
        self.weight = nn.Parameter(torch.empty(out_features // q, in_features // q))
        self.bias = nn.Parameter(torch.zeros(out_features // q)) if bias else None
        init_like_linear(self.weight, self.bias, in_features)
        self.chunks = 1

    @classmethod
    def from_serial(cls, linear: nn.Linear, grid: Grid, chunks: int = 1) -> Linear2D:
        """Block ``(i, j)`` of ``linear`` (``chunks=3`` for a fused qkv: see :mod:`.sharding`)."""
        out_f, in_f = linear.weight.shape
        m = cls(in_f, out_f, grid, linear.bias is not None).to(linear.weight.device)
        m.chunks = chunks
        q, (i, j, _) = grid.q, _ijk(grid)
        with torch.no_grad():
            rows = split_chunks(linear.weight, q, j, 0, chunks)  # output block j
            m.weight.copy_(split_chunks(rows, q, i, 1))  # input block i
            if linear.bias is not None:
                m.bias.copy_(split_chunks(linear.bias, q, j, 0, chunks))
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = summa_linear(x, self.weight, self.grid)
        return y + _replicated(self.bias, self.grid) if self.bias is not None else y

    def serial_state(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Full-shape ``weight``/``bias`` (or gradients), from depth layer 0."""
        q = self.grid.q
        w = gather_by_position(self.weight.grad if grads else self.weight, self.grid)
        # position i*q + j holds (output block j, input block i)
        out_blocks = [torch.cat([w[i * q + j] for i in range(q)], dim=1) for j in range(q)]
        out = {"weight": join_chunks(out_blocks, 0, self.chunks)}
        if self.bias is not None:
            b = gather_by_position(self.bias.grad if grads else self.bias, self.grid)
            out["bias"] = join_chunks([b[j] for j in range(q)], 0, self.chunks)
        return out


class LayerNorm2D(nn.Module):
    """Layer norm over features split along the grid row: ``(b/q, s, d/q)`` in and out.

    Mean and variance are row sums (all-reduced in forward and backward); ``weight`` and
    ``bias`` ``(d/q,)`` are replicated down the column.
    """

    def __init__(self, ln: nn.LayerNorm, grid: Grid) -> None:
        super().__init__()
        (h,) = ln.normalized_shape
        check_divisible("d_model", h, grid.q, _MODE_NAME[grid.mode])
        self.grid, self.eps, self.h = grid, ln.eps, h
        _, j, _ = _ijk(grid)
        self.weight = nn.Parameter(split_chunks(ln.weight.detach(), grid.q, j, 0))
        self.bias = nn.Parameter(split_chunks(ln.bias.detach(), grid.q, j, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        row = self.grid.row_group
        mean = all_reduce_both(x.sum(-1, keepdim=True), row) / self.h
        xc = x - mean
        var = all_reduce_both((xc * xc).sum(-1, keepdim=True), row) / self.h
        y = xc * torch.rsqrt(var + self.eps)
        return y * _replicated(self.weight, self.grid) + _replicated(self.bias, self.grid)

    def serial_state(self, grads: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for name in ("weight", "bias"):
            p = getattr(self, name)
            parts = gather_by_position(p.grad if grads else p, self.grid)
            out[name] = torch.cat(parts[: self.grid.q])  # row i = 0: blocks j = 0..q-1
        return out


class Attention2D(ParallelAttention):
    """Causal self-attention on head group ``j`` for batch block ``i``: no communication
    besides the two SUMMA linears. ``(b/q, s, d/q) -> (b/q, s, d/q)``."""

    def __init__(self, attn: CausalSelfAttention, grid: Grid) -> None:
        check_divisible("n_heads", attn.n_heads, grid.q, _MODE_NAME[grid.mode])
        super().__init__(
            Linear2D.from_serial(attn.qkv, grid, chunks=3),
            Linear2D.from_serial(attn.proj, grid),
            attn.n_heads // grid.q,
            attn.causal,
        )


class MLP2D(ParallelMLP):
    """``fc1`` SUMMA ``(b/q, s, r*d/q)`` -> GELU -> ``fc2`` SUMMA ``(b/q, s, d/q)``."""

    def __init__(self, mlp: MLPBlock, grid: Grid) -> None:
        super().__init__(Linear2D.from_serial(mlp.fc1, grid), Linear2D.from_serial(mlp.fc2, grid))


class Block2D(ParallelBlock):
    """The serial :class:`~cai_labs.models.gpt.Block` on a 2D (or 2.5D) grid.

    Input and output: block ``(i, j)`` of ``(b, s, d)``, shape ``(b/q, s, d/q)`` (2.5D:
    ``(b/(dq), s, d/q)``); the residual adds are local.
    """

    def __init__(self, block: Block, grid: Grid) -> None:
        super().__init__(
            LayerNorm2D(block.ln1, grid),
            Attention2D(block.attn, grid),
            LayerNorm2D(block.ln2, grid),
            MLP2D(block.mlp, grid),
        )
        self.grid = grid


def _check_mode(grid: Grid) -> None:
    if grid.mode not in _MODE_NAME:
        raise ValueError(f"a {grid.mode} grid cannot run 2D/2.5D layers; build a 2d/2.5d grid")


def parallelize_block(block: Block, grid: Grid) -> Block2D:
    """The 2D (or 2.5D) tensor-parallel twin of ``block`` (same weights) for this rank."""
    _check_mode(grid)
    return Block2D(block, grid)


def split_input(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Block ``(k, i, j)`` of a whole ``(b, s, d)`` activation: batch block ``k*q + i`` of
    ``d*q``, feature block ``j`` of ``q``."""
    _check_mode(grid)
    q, (i, j, k) = grid.q, _ijk(grid)
    name = _MODE_NAME[grid.mode]
    check_divisible("the batch", x.shape[0], grid.depth * q, name)
    check_divisible("the features", x.shape[-1], q, name)
    xb = x.chunk(grid.depth * q, dim=0)[k * q + i]
    return xb.chunk(q, dim=-1)[j].contiguous()


def gather_output(y: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Whole ``(b, s, d)`` from every rank's block (inverse of :func:`split_input`)."""
    q, d = grid.q, grid.depth
    parts = gather_by_position(y, grid)  # position k*q*q + i*q + j
    rows = [torch.cat(parts[r * q : (r + 1) * q], dim=-1) for r in range(d * q)]
    return torch.cat(rows, dim=0)


def gather_full(module: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Full-shape parameters (or gradients) keyed like the serial module. Collective."""
    return module.serial_state(grads)
