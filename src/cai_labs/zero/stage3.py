"""ZeRO stage 3: partition the parameters too.

Between uses, a rank keeps only its shard ``(S,)`` of every unit's flat parameter buffer; the
full buffer's storage is released. A unit's parameters exist in full only while they are needed:

* **forward**: a forward pre-hook all-gathers the unit, a forward hook frees it again (except the
  root unit, which spans the whole forward and is needed first thing in backward);
* **backward**: a hook on the unit's outputs fires when their gradient is ready, i.e. just before
  the unit's own backward runs, and all-gathers the unit again; when the unit's last parameter
  gradient is complete the gradient is reduce-scattered (as in ZeRO-2, asynchronously with
  ``overlap_comm=True``) and the unit is freed;
* **step**: the optimizer updates the shard (its own storage now); no all-gather is needed, the
  next forward gathers.

Communication per step: all-gather in forward ``(N-1)/N Ψ``, again in backward ``(N-1)/N Ψ``,
reduce-scatter ``(N-1)/N Ψ``: ``3(N-1)/N Ψ``, 1.5 times data parallel, for parameter memory
``Ψ/N`` instead of ``Ψ``.

The all-gathers are synchronous (no prefetch of the next unit): a unit's parameters are needed
the moment its hook runs.

Because the parameter views point into a storage that is resized rather than replaced, tensors
autograd saved for backward (the weights of ``linear``, of ``layer_norm``) see the re-gathered
values. Under ``torch.no_grad()`` (evaluation, generation) units are gathered and freed per call.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from cai_labs.zero.flat import FlatParamUnit
from cai_labs.zero.stage2 import Zero2

__all__ = ["Zero3"]


class Zero3(Zero2):
    """ZeRO-3: optimizer state, gradients and parameters sharded."""

    stage = 3

    def __init__(
        self,
        module: nn.Module,
        units=None,
        group=None,
        overlap_comm: bool = True,
        max_in_flight: int = 2,
    ):
        super().__init__(module, units=units, group=group, overlap_comm=overlap_comm,
                         max_in_flight=max_in_flight)
        self.root = self.units[-1] if self.unit_modules[-1] is module else None
        for u, m in zip(self.units, self.unit_modules):
            m.register_forward_pre_hook(self._pre_forward(u))
            m.register_forward_hook(self._post_forward(u))
            u.free()

    def _make_shard(self, unit: FlatParamUnit) -> nn.Parameter:
        """ZeRO-3: the shard owns its storage, so the full buffer can be released."""
        unit.shard = nn.Parameter(unit.full_slice().clone(), requires_grad=False)
        return unit.shard

    def _pre_forward(self, u: FlatParamUnit):
        def hook(module, args):
            u.gather()
        return hook

    def _post_forward(self, u: FlatParamUnit):
        def hook(module, args, output):
            if not torch.is_grad_enabled():
                u.free()
                return
            tensors = [t for t in tree_flatten(output)[0]
                       if isinstance(t, torch.Tensor) and t.requires_grad]
            for t in tensors:  # re-gather just before this unit's backward
                t.register_hook(self._pre_backward(u))
            if u is not self.root:
                u.free()
        return hook

    @staticmethod
    def _pre_backward(u: FlatParamUnit):
        def hook(grad):
            u.gather()
            return grad
        return hook

    def _unit_reduced(self, u: FlatParamUnit) -> None:
        u.free()

    def _end_of_backward(self) -> None:
        super()._end_of_backward()
        for u in self.units:
            u.free()

    def after_step(self) -> None:
        """Nothing to gather: the updated shard is all this rank keeps; forward gathers."""

    def _gather_all(self) -> None:
        for u in self.units:
            u.gather()

    def _release_all(self) -> None:
        for u in self.units:
            u.free()

    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        out = super().memory_tensors()
        out["param_shards"] = list(self.shards)
        return out
