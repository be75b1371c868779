"""ZeRO stage 1: partition the optimizer state.

Every rank still holds the full parameters and computes full gradients (as in data parallel),
but the optimizer state (Adam's two moments: ``K = 8`` bytes per parameter in fp32) exists only
for this rank's ``1/N`` shard of each flat buffer. A step is:

1. backward as usual: ``p.grad`` is the full local gradient (``(shape of p)`` per parameter);
2. **reduce-scatter** each unit's flattened gradient ``(N S,)``: rank ``r`` receives the sum of
   slice ``r`` ``(S,)``, divided by ``N`` into the mean; that is exactly the slice of the
   all-reduced gradient data parallel would have;
3. the inner optimizer updates the shard ``(S,)`` (a view of the full buffer) with its state;
4. **all-gather** the updated shards into the full buffer: every replica is again identical.

Communication per step: ``(N-1)/N Ψ`` (reduce-scatter) + ``(N-1)/N Ψ`` (all-gather), the same
``2(N-1)/N Ψ`` as data parallel's all-reduce, which is itself a reduce-scatter and an all-gather.
"""

from __future__ import annotations

import torch

from cai_labs.zero.base import ZeroModel
from cai_labs.zero.collectives import reduce_scatter_flat

__all__ = ["Zero1"]


class Zero1(ZeroModel):
    """ZeRO-1: optimizer state sharded; parameters and gradients full on every rank."""

    stage = 1

    _reduced = False  # gradients of this step already reduce-scattered (e.g. to clip them)

    def reduce_gradients(self) -> None:
        if self._reduced:
            return
        with torch.no_grad():
            for u in self.units:
                out = u.full.new_empty(u.shard_numel)
                reduce_scatter_flat(out, u.flat_grad(), self.group)
                u.shard.grad = self._master_grad(self._average(out))
        self._reduced = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._reduced = False  # (a skipped step, e.g. on fp16 overflow, reduces again next time)

    def after_step(self) -> None:
        super().after_step()
        for s in self.shards:  # a temporary: the full p.grad stays until zero_grad
            s.grad = None
        self._reduced = False
