"""Collectives as autograd functions: each says what happens in forward AND in backward.

These are the building blocks of every tensor-parallel layer (Megatron-LM calls them
*mappings*). Each pair is a conjugate: the backward of an all-reduce-in-forward is the identity,
the backward of a gather is a split, and so on, because a gradient flows back through the
transpose of the forward map.

========================  =======================  =========================================
function                  forward                  backward
========================  =======================  =========================================
``copy_to_group``         identity                 all-reduce (sum) of the gradient
``reduce_from_group``     all-reduce (sum)         identity
``all_reduce_both``       all-reduce (sum)         all-reduce (sum)
``gather_from_group``     all-gather along a dim   keep this rank's slice
``scatter_to_group``      keep this rank's slice   all-gather along a dim
``gather_rs_group``       all-gather along a dim   reduce-scatter along that dim
``reduce_scatter_group``  reduce-scatter           all-gather
========================  =======================  =========================================

``copy_to_group`` is also how a *replicated* parameter gets its full gradient: every replica
uses it on part of the data, and the sum of the replicas' partial gradients is the gradient.

All collectives are called as ``dist.<op>(..., group=...)`` so :class:`cai_labs.Ledger` sees them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = [
    "copy_to_group",
    "reduce_from_group",
    "all_reduce_both",
    "gather_from_group",
    "scatter_to_group",
    "gather_rs_group",
    "reduce_scatter_group",
    "all_gather",
    "reduce_scatter",
    "split_along",
]


def _size(group: ProcessGroup) -> int:
    return dist.get_world_size(group)


def _rank(group: ProcessGroup) -> int:
    return dist.get_rank(group)


def all_reduce(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sum ``x`` over ``group`` (out of place; a no-op for a group of one)."""
    if _size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def all_gather(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in group-rank order."""
    n = _size(group)
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def reduce_scatter(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    """Sum ``x`` over ``group`` and keep this rank's ``1/n`` slice along ``dim``."""
    n = _size(group)
    if n == 1:
        return x
    parts = [p.contiguous() for p in x.chunk(n, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


def split_along(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    """This rank's ``1/n`` slice of ``x`` along ``dim`` (no communication)."""
    n = _size(group)
    if x.shape[dim] % n:
        raise ValueError(f"cannot split size {x.shape[dim]} of dim {dim} into {n} equal parts")
    return x.chunk(n, dim=dim)[_rank(group)].contiguous()


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g, ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _AllReduceBoth(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g, ctx.group), None


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return split_along(g, ctx.group, ctx.dim), None, None


class _ScatterToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return split_along(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, ctx.dim), None, None


class _GatherRS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter(g, ctx.group, ctx.dim), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, ctx.dim), None, None


def copy_to_group(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Forward: identity. Backward: all-reduce the gradient over ``group``."""
    return _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Forward: all-reduce (sum) over ``group``. Backward: identity."""
    return _ReduceFromGroup.apply(x, group)


def all_reduce_both(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """All-reduce in forward and in backward: for a sum whose result every rank then uses
    (e.g. the mean and variance of a layer norm whose features are split across ranks)."""
    return _AllReduceBoth.apply(x, group)


def gather_from_group(x: torch.Tensor, group: ProcessGroup, dim: int = -1) -> torch.Tensor:
    """Forward: all-gather along ``dim``. Backward: keep this rank's slice of the gradient."""
    return _GatherFromGroup.apply(x, group, dim)


def scatter_to_group(x: torch.Tensor, group: ProcessGroup, dim: int = -1) -> torch.Tensor:
    """Forward: keep this rank's slice along ``dim``. Backward: all-gather the gradient."""
    return _ScatterToGroup.apply(x, group, dim)


def gather_rs_group(x: torch.Tensor, group: ProcessGroup, dim: int = 0) -> torch.Tensor:
    """Forward: all-gather along ``dim``. Backward: reduce-scatter the gradient along ``dim``
    (every rank used the gathered tensor, so each slice's gradient is a sum over ranks)."""
    return _GatherRS.apply(x, group, dim)


def reduce_scatter_group(x: torch.Tensor, group: ProcessGroup, dim: int = 0) -> torch.Tensor:
    """Forward: reduce-scatter along ``dim``. Backward: all-gather the gradient."""
    return _ReduceScatter.apply(x, group, dim)
