"""Data parallelism, written out: every rank holds the whole model and a slice of the batch.

If the loss is a mean over the batch, the gradient of the full batch ``B`` is the mean of the
gradients of ``N`` equal slices of ``B/N``. So each rank runs forward and backward on its slice,
then the ranks all-reduce (sum) their gradients and divide by ``N``; every rank then holds the
full-batch gradient and takes the same optimizer step, and the replicas never drift apart.

Two versions, the second how production engines (PyTorch DDP, Colossal-AI) do it:

* :func:`allreduce_gradients` — after ``loss.backward()`` finishes, one all-reduce per parameter.
  Simple and correct, but the network idles during backward and the CPU idles during the
  all-reduces, and many small messages each pay the per-message latency.
* :class:`BucketedDataParallel` — gradients are grouped into buckets of about ``bucket_mb``
  megabytes in the order backward produces them (last layer first). The moment every gradient of
  a bucket is ready, the bucket is flattened and its all-reduce starts asynchronously, while
  backward goes on computing earlier layers. At the end of backward the handles are awaited and
  the averaged gradients copied back. Fewer, larger messages; communication overlaps compute.

Cost per step, for ``P`` gradient bytes on ``N`` ranks with ring all-reduce: each rank sends
``2 (N-1)/N * P`` bytes, whatever the bucketing; bucketing changes latency and overlap, not bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["broadcast_parameters", "allreduce_gradients", "BucketedDataParallel", "shard_batch"]


def broadcast_parameters(
    module: nn.Module, src: int = 0, group: dist.ProcessGroup | None = None
) -> None:
    """Copy ``src``'s parameters and buffers to every rank, so all replicas start identical."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t, src=src, group=group)


def allreduce_gradients(module: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Average every parameter's gradient over the group: one blocking all-reduce per tensor."""
    world = dist.get_world_size(group)
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
            p.grad.div_(world)


def shard_batch(*tensors: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, ...]:
    """Rank ``rank``'s contiguous slice of each tensor's first dimension.

    The batch must split evenly: unequal slices would weight samples unequally in the averaged
    gradient and the result would no longer equal the full-batch step.
    """
    n = tensors[0].shape[0]
    if n % world_size:
        raise ValueError(
            f"a batch of {n} samples does not split evenly over {world_size} ranks; "
            f"use a batch size divisible by {world_size}"
        )
    k = n // world_size
    return tuple(t[rank * k : (rank + 1) * k] for t in tensors)


class BucketedDataParallel(nn.Module):
    """Wrap ``module`` so that backward all-reduces its gradients in buckets, overlapped.

    Args:
        module: the replica on this rank (same architecture on every rank).
        bucket_mb: target bucket size in megabytes (PyTorch DDP's default is 25).
        group: process group to average over (default: all ranks).

    After ``loss.backward()`` returns, every ``p.grad`` holds the group average. Parameters that
    received no gradient in a step are left alone (their bucket is still reduced with zeros, so
    every rank makes the same calls and nobody waits forever).
    """

    def __init__(
        self, module: nn.Module, bucket_mb: float = 25.0, group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__()
        self.module = module
        self.group = group
        self.world = dist.get_world_size(group)
        broadcast_parameters(module, group=group)
        params = [p for p in module.parameters() if p.requires_grad]
        # Backward visits layers roughly in reverse; bucket in that order so that the first
        # bucket fills (and starts its all-reduce) as early as possible.
        self.buckets: list[list[nn.Parameter]] = []
        limit, current, size = bucket_mb * 2**20, [], 0
        for p in reversed(params):
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= limit:
                self.buckets.append(current)
                current, size = [], 0
        if current:
            self.buckets.append(current)
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._ready = [0] * len(self.buckets)
        self._pending: list[tuple[int, torch.Tensor, dist.Work]] = []
        self._queued = False
        for p in params:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def _grad_ready(self, p: nn.Parameter) -> None:
        if not self._queued:
            # Runs once at the very end of this backward pass, like DDP's finalize step.
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._queued = True
        i = self._bucket_of[id(p)]
        self._ready[i] += 1
        if self._ready[i] == len(self.buckets[i]):
            self._launch(i)

    def _launch(self, i: int) -> None:
        flat = torch.cat([_grad_or_zeros(p).reshape(-1) for p in self.buckets[i]])
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self._pending.append((i, flat, work))

    def _finish(self) -> None:
        launched = {i for i, _, _ in self._pending}
        for i in range(len(self.buckets)):  # buckets with unused params: same calls everywhere
            if i not in launched:
                self._launch(i)
        for i, flat, work in self._pending:
            work.wait()
            flat.div_(self.world)
            offset = 0
            for p in self.buckets[i]:
                n = p.numel()
                if p.grad is not None:
                    p.grad.copy_(flat[offset : offset + n].view_as(p))
                offset += n
        self._pending.clear()
        self._ready = [0] * len(self.buckets)
        self._queued = False

    def bucket_sizes(self) -> list[int]:
        """Bytes of each bucket, in launch order."""
        return [sum(p.numel() * p.element_size() for p in b) for b in self.buckets]

    def named_buckets(self) -> Iterator[list[str]]:
        """Parameter names per bucket (to show on a page how the buckets were formed)."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        for b in self.buckets:
            yield [names[id(p)] for p in b]


def _grad_or_zeros(p: nn.Parameter) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)
