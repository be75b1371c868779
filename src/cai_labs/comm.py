"""Collectives, and the autograd mappings that pair each with its conjugate in backward.

The one home of every autograd function whose forward and backward are a pair of collectives
(Megatron-LM calls them *mappings*). The backward of a map is its transpose: the backward of an
all-reduce-in-forward is the identity, of a gather a split, of an all-to-all the opposite one.

========================  ============================  ================================
function                  forward                       backward
========================  ============================  ================================
``copy_to_group``         identity                      all-reduce (sum) of the gradient
``reduce_from_group``     all-reduce (sum)              identity
``all_reduce_both``       all-reduce (sum)              all-reduce (sum)
``gather_from_group``     all-gather along a dim        keep this rank's slice
``scatter_to_group``      keep this rank's slice        all-gather along a dim
``gather_rs_group``       all-gather along a dim        reduce-scatter along that dim
``reduce_scatter_group``  reduce-scatter                all-gather
``seq_to_heads_group``    all-to-all: tokens -> heads   all-to-all: heads -> tokens
``heads_to_seq_group``    all-to-all: heads -> tokens   all-to-all: tokens -> heads
``all_to_all_group``      all-to-all of dim-0 pieces    the same all-to-all
``conjugate``             any ``forward_op``            the given ``backward_op``
========================  ============================  ================================

``conjugate`` takes the pair as arguments, e.g. a tensor grid's ``split_input`` and
``gather_output`` to enter and leave the grid. Autograd functions that compute *and*
communicate (SUMMA, the 3D linear, the vocabulary-parallel loss, synchronised batch norm, the
ring-attention passes) live with their technique and call the plain collectives below.
All collectives are ``dist.<op>(..., group=...)`` calls, so :class:`cai_labs.Ledger` sees them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.function import FunctionCtx
from torch.distributed import ProcessGroup

__all__ = [
    "size",
    "rank",
    "all_reduce",
    "all_reduce_",
    "all_gather",
    "reduce_scatter",
    "broadcast_",
    "reduce_",
    "split_along",
    "seq_to_heads",
    "heads_to_seq",
    "all_to_all",
    "conjugate",
    "copy_to_group",
    "reduce_from_group",
    "all_reduce_both",
    "gather_from_group",
    "scatter_to_group",
    "gather_rs_group",
    "reduce_scatter_group",
    "seq_to_heads_group",
    "heads_to_seq_group",
    "all_to_all_group",
]


# -- plain collectives (no autograd) -----------------------------------------------------------
def size(group: ProcessGroup | None) -> int:
    """Ranks in ``group`` (1 when no process group is initialised)."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def rank(group: ProcessGroup | None) -> int:
    """This rank's index in ``group`` (0 when no process group is initialised)."""
    return dist.get_rank(group) if dist.is_initialized() else 0


def all_reduce(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sum ``x`` over ``group`` (out of place; a no-op for a group of one)."""
    if size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def all_reduce_(
    x: torch.Tensor, group: ProcessGroup | None, op: dist.ReduceOp = dist.ReduceOp.SUM
) -> torch.Tensor:
    """Reduce ``x`` over ``group`` in place with ``op`` (nothing for a group of one)."""
    if size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def all_gather(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in group-rank order."""
    n = size(group)
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def reduce_scatter(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    """Sum ``x`` over ``group`` and keep this rank's ``1/n`` slice along ``dim``."""
    n = size(group)
    if n == 1:
        return x
    parts = [p.contiguous() for p in x.chunk(n, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


def broadcast_(x: torch.Tensor, src: int, group: ProcessGroup) -> torch.Tensor:
    """Overwrite ``x`` with global rank ``src``'s ``x``, in place."""
    dist.broadcast(x, src=src, group=group)
    return x


def reduce_(x: torch.Tensor, dst: int, group: ProcessGroup) -> torch.Tensor:
    """Sum ``x`` over ``group`` into global rank ``dst``'s ``x``, in place."""
    dist.reduce(x, dst=dst, group=group)
    return x


def split_along(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    """This rank's ``1/n`` slice of ``x`` along ``dim`` (no communication)."""
    n = size(group)
    if x.shape[dim] % n:
        raise ValueError(f"cannot split size {x.shape[dim]} of dim {dim} into {n} equal parts")
    return x.chunk(n, dim=dim)[rank(group)].contiguous()


def _split_copy(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    # a copy, not a view: a view would keep the whole tensor alive for as long as the slice
    return split_along(x, group, dim).clone(memory_format=torch.contiguous_format)


def seq_to_heads(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """``[B, H, C, D]`` (all heads, my tokens) -> ``[B, H/N, N*C, D]`` (my heads, all tokens)."""
    n = size(group)
    b, h, c, d = x.shape
    # Piece i (heads i*H/N ...) goes to rank i: put the piece index first and make it contiguous.
    send = x.reshape(b, n, h // n, c, d).transpose(0, 1).contiguous()  # [N, B, H/N, C, D]
    recv = torch.empty_like(send)  # piece i now holds rank i's tokens of my heads
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * c, d)


def heads_to_seq(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """``[B, H/N, N*C, D]`` (my heads, all tokens) -> ``[B, H, C, D]`` (all heads, my tokens)."""
    n = size(group)
    b, hn, length, d = x.shape
    c = length // n
    send = x.reshape(b, hn, n, c, d).permute(2, 0, 1, 3, 4).contiguous()  # [N, B, H/N, C, D]
    recv = torch.empty_like(send)  # piece i now holds head group i of my tokens
    dist.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape(b, n * hn, c, d)


def all_to_all(x: torch.Tensor, group: ProcessGroup | None, dim: int = 0) -> torch.Tensor:
    """Cut ``x`` into ``n`` equal pieces along ``dim`` and send piece ``i`` to rank ``i``; piece
    ``i`` of the result is what rank ``i`` sent here (expert parallelism's dispatch and combine).
    Its own transpose: the gradient of piece ``i`` goes back to rank ``i`` the same way."""
    n = size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"cannot cut size {x.shape[dim]} of dim {dim} into {n} equal pieces")
    send = x.movedim(dim, 0).contiguous()  # all_to_all_single cuts dim 0
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.movedim(0, dim)


# -- the mappings: a forward op and its transpose ----------------------------------------------
def _identity(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    return x


def _sum(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    return all_reduce(x, group)


class _Mapping(torch.autograd.Function):
    """``forward_op(x, *args)`` in forward, ``backward_op(grad, *args)`` in backward."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: torch.Tensor, forward_op: Callable, backward_op: Callable, *args: Any
    ) -> torch.Tensor:
        ctx.backward_op, ctx.args = backward_op, args
        return forward_op(x, *args)

    @staticmethod
    def backward(ctx: FunctionCtx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return ctx.backward_op(g, *ctx.args), None, None, *(None for _ in ctx.args)


def conjugate(
    x: torch.Tensor, forward_op: Callable, backward_op: Callable, *args: Any
) -> torch.Tensor:
    """``forward_op(x, *args)``, whose gradient is ``backward_op(grad, *args)``: the caller
    names a pair that are each other's transpose (e.g. a grid's split and gather)."""
    return _Mapping.apply(x, forward_op, backward_op, *args)


def copy_to_group(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Forward: identity. Backward: all-reduce the gradient over ``group``.

    Also how a *replicated* parameter gets its full gradient: every replica uses it on part of
    the data, and the sum of the replicas' partial gradients is the gradient."""
    return _Mapping.apply(x, _identity, _sum, group, 0)


def reduce_from_group(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Forward: all-reduce (sum) over ``group``. Backward: identity."""
    return _Mapping.apply(x, _sum, _identity, group, 0)


def all_reduce_both(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """All-reduce in forward and in backward: for a sum whose result every rank then uses
    (e.g. the mean and variance of a layer norm whose features are split across ranks)."""
    return _Mapping.apply(x, _sum, _sum, group, 0)


def gather_from_group(
    x: torch.Tensor, group: ProcessGroup, dim: int = -1, copy: bool = False
) -> torch.Tensor:
    """Forward: all-gather along ``dim``. Backward: keep this rank's slice of the gradient
    (a copy with ``copy=True``, so that the whole gradient can be freed)."""
    return _Mapping.apply(x, all_gather, _split_copy if copy else split_along, group, dim)


def scatter_to_group(
    x: torch.Tensor, group: ProcessGroup, dim: int = -1, copy: bool = False
) -> torch.Tensor:
    """Forward: keep this rank's slice along ``dim`` (a copy with ``copy=True``, so that the
    whole input can be freed). Backward: all-gather the gradient."""
    return _Mapping.apply(x, _split_copy if copy else split_along, all_gather, group, dim)


def gather_rs_group(x: torch.Tensor, group: ProcessGroup, dim: int = 0) -> torch.Tensor:
    """Forward: all-gather along ``dim``. Backward: reduce-scatter the gradient along ``dim``
    (every rank used the gathered tensor, so each slice's gradient is a sum over ranks)."""
    return _Mapping.apply(x, all_gather, reduce_scatter, group, dim)


def reduce_scatter_group(x: torch.Tensor, group: ProcessGroup, dim: int = 0) -> torch.Tensor:
    """Forward: reduce-scatter along ``dim``. Backward: all-gather the gradient."""
    return _Mapping.apply(x, reduce_scatter, all_gather, group, dim)


def seq_to_heads_group(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Forward: :func:`seq_to_heads`. Backward: :func:`heads_to_seq` of the gradient."""
    return _Mapping.apply(x, seq_to_heads, heads_to_seq, group, 1)


def heads_to_seq_group(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Forward: :func:`heads_to_seq`. Backward: :func:`seq_to_heads` of the gradient."""
    return _Mapping.apply(x, heads_to_seq, seq_to_heads, group, 1)


def all_to_all_group(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Forward: :func:`all_to_all` along dim 0. Backward: the same all-to-all of the gradient
    (piece ``i`` came from rank ``i``, so its gradient goes back to rank ``i``)."""
    return _Mapping.apply(x, all_to_all, all_to_all, group, 0)
