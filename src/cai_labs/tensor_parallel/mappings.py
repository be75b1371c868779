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

from collections.abc import Callable

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


# The conjugate pairs of the table above, each op written as ``op(x, group, dim)``.
Op = Callable[[torch.Tensor, ProcessGroup, int], torch.Tensor]


def _identity(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    return x


def _sum(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    return all_reduce(x, group)


class _Mapping(torch.autograd.Function):
    """``forward_op`` in forward, ``backward_op`` on the gradient in backward."""

    @staticmethod
    def forward(ctx, x, group: ProcessGroup, dim: int, forward_op: Op, backward_op: Op):
        ctx.group, ctx.dim, ctx.backward_op = group, dim, backward_op
        return forward_op(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return ctx.backward_op(g, ctx.group, ctx.dim), None, None, None, None


def copy_to_group(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Forward: identity. Backward: all-reduce the gradient over ``group``."""
    return _Mapping.apply(x, group, 0, _identity, _sum)


def reduce_from_group(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Forward: all-reduce (sum) over ``group``. Backward: identity."""
    return _Mapping.apply(x, group, 0, _sum, _identity)


def all_reduce_both(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """All-reduce in forward and in backward: for a sum whose result every rank then uses
    (e.g. the mean and variance of a layer norm whose features are split across ranks)."""
    return _Mapping.apply(x, group, 0, _sum, _sum)


def gather_from_group(x: torch.Tensor, group: ProcessGroup, dim: int = -1) -> torch.Tensor:
    """Forward: all-gather along ``dim``. Backward: keep this rank's slice of the gradient."""
    return _Mapping.apply(x, group, dim, all_gather, split_along)


def scatter_to_group(x: torch.Tensor, group: ProcessGroup, dim: int = -1) -> torch.Tensor:
    """Forward: keep this rank's slice along ``dim``. Backward: all-gather the gradient."""
    return _Mapping.apply(x, group, dim, split_along, all_gather)


def gather_rs_group(x: torch.Tensor, group: ProcessGroup, dim: int = 0) -> torch.Tensor:
    """Forward: all-gather along ``dim``. Backward: reduce-scatter the gradient along ``dim``
    (every rank used the gathered tensor, so each slice's gradient is a sum over ranks)."""
    return _Mapping.apply(x, group, dim, all_gather, reduce_scatter)


def reduce_scatter_group(x: torch.Tensor, group: ProcessGroup, dim: int = 0) -> torch.Tensor:
    """Forward: reduce-scatter along ``dim``. Backward: all-gather the gradient."""
    return _Mapping.apply(x, group, dim, reduce_scatter, all_gather)
