"""ZeRO stage 2: partition the gradients as well.

Stage 1 keeps the full gradient on every rank until the step. Stage 2 reduce-scatters each
unit's gradient *during backward*, the moment its last parameter's gradient is complete (a
``post_accumulate_grad`` hook counts them), keeps only this rank's averaged slice ``(S,)`` in a
persistent shard buffer, and drops the full ``p.grad`` tensors at once. So between steps a rank
holds ``Ψ/N`` gradient elements instead of ``Ψ``; while backward runs, at most the units whose
gradients are still being produced are held in full.

**Overlap** (``overlap_comm=True``, the default): the reduce-scatter of a unit is started
asynchronously (``async_op=True``) and backward goes on computing the gradients of earlier
layers while it runs; the result is added to the shard buffer when the work is waited for: the
oldest pending unit as soon as more than ``max_in_flight`` are pending (so at most that many
flattened gradients ``(N S,)`` wait in memory), and all of them at the end of backward, before
the optimizer can read the shards. ``overlap_comm=False`` waits for each reduce-scatter at once.
The arithmetic, and so the result, is the same either way.

Gradient accumulation over micro-batches works: each backward adds into the shard buffer, which
:meth:`zero_grad` clears. A unit whose parameters got no gradient in a backward (unused branch)
is reduced with zeros at the end of that backward, so every rank makes the same calls.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cai_labs.zero.base import ZeroModel
from cai_labs.zero.collectives import reduce_scatter_flat
from cai_labs.zero.flat import FlatParamUnit

__all__ = ["Zero2"]


class Zero2(ZeroModel):
    """ZeRO-2: optimizer state and gradients sharded; parameters full on every rank."""

    stage = 2

    def __init__(
        self,
        module: nn.Module,
        units: list[nn.Module] | None = None,
        group: dist.ProcessGroup | None = None,
        overlap_comm: bool = True,
        max_in_flight: int = 2,
        param_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(module, units=units, group=group, param_dtype=param_dtype)
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1; got {max_in_flight}")
        self.overlap_comm, self.max_in_flight = overlap_comm, max_in_flight
        # started reduce-scatters: (unit, output (S,), flat gradient (N S,), work)
        self._pending: list[tuple[FlatParamUnit, torch.Tensor, torch.Tensor, Any]] = []
        self._unit_of: dict[int, FlatParamUnit] = {}
        for u in self.units:
            u.grad_shard = u.full.new_zeros(u.shard_numel)  # (S,) in the parameters' dtype
            self._attach_grad(u)
            for p in u.params:
                self._unit_of[id(p)] = u
                p.register_post_accumulate_grad_hook(self._grad_ready)
        self._queued = False

    def _grad_ready(self, p: nn.Parameter) -> None:
        if not self._queued:  # once per backward: finish whatever is left at its very end
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._queued = True
        u = self._unit_of[id(p)]
        u.ready += 1
        if u.ready == len(u.params):
            self._reduce_unit(u)

    def _reduce_unit(self, u: FlatParamUnit) -> None:
        with torch.no_grad():
            flat = u.flat_grad()  # a copy: the parameters' own gradients can go now
            for p in u.params:
                p.grad = None
            out = u.full.new_empty(u.shard_numel)
            if self.overlap_comm:
                work = reduce_scatter_flat(out, flat, self.group, async_op=True)
                self._pending.append((u, out, flat, work))
                while len(self._pending) > self.max_in_flight:
                    self._finish_oldest()
            else:
                reduce_scatter_flat(out, flat, self.group)
                u.grad_shard.add_(self._average(out))
        u.reduced = True
        self._unit_reduced(u)

    def _finish_oldest(self) -> None:
        """Wait for the oldest pending reduce-scatter and add its slice to the shard buffer."""
        u, out, _flat, work = self._pending.pop(0)
        work.wait()
        with torch.no_grad():
            u.grad_shard.add_(self._average(out))

    def _unit_reduced(self, u: FlatParamUnit) -> None:
        """Hook for ZeRO-3 (free the unit's gathered parameters)."""

    def _end_of_backward(self) -> None:
        for u in self.units:
            if not u.reduced:
                self._reduce_unit(u)
        while self._pending:  # every shard gradient complete before the optimizer reads it
            self._finish_oldest()
        for u in self.units:
            u.ready, u.reduced = 0, False
        self._queued = False

    def _attach_grad(self, u: FlatParamUnit) -> None:
        """The shard's gradient is the shard buffer itself; under mixed precision an fp32 copy
        of it is made only when the optimizer needs it (:meth:`reduce_gradients`)."""
        if not self.mixed:
            u.shard.grad = u.grad_shard

    def reduce_gradients(self) -> None:
        """Nothing left to communicate: backward already reduce-scattered every unit."""
        for u in self.units:
            if not self.mixed:
                u.shard.grad = u.grad_shard
            elif u.shard.grad is None:  # (kept if already made, e.g. clipped, this step)
                u.shard.grad = self._master_grad(u.grad_shard)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for u in self.units:
            u.grad_shard.zero_()
            self._attach_grad(u)

    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        out = super().memory_tensors()
        out["grad_shards"] = [u.grad_shard for u in self.units]
        return out
