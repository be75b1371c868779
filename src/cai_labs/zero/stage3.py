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

**Prefetch** (``prefetch=True``, as PyTorch FSDP's forward/backward prefetch): a gathered unit
is needed the moment its hook runs, so a synchronous all-gather leaves compute idle while it
runs. The first training step records the order in which the hooks gather the units (forward:
root, layer 0, 1, ...; backward: root, then the layers in reverse). On later steps, when unit
``k`` of an order is gathered, the all-gathers of the next ``depth`` units of that order are
*started* (``async_op=True``) and run while unit ``k`` computes; unit ``k+1``'s own hook then
only waits for its work. The same all-gathers happen, of the same bytes, in the same order on
every rank; only their start moves earlier, so the results are bit-identical. Memory stays
bounded: a prefetch is started only while fewer than ``depth + 1`` units besides the root are
gathered (so at most ``depth + 1`` are; ``depth = prefetch`` as an int, 1 for ``True``, 0 for
``False`` which gathers each unit only when its hook runs).

Because the parameter views point into a storage that is resized rather than replaced, tensors
autograd saved for backward (the weights of ``linear``, of ``layer_norm``) see the re-gathered
values. Under ``torch.no_grad()`` (evaluation, generation) units are gathered and freed per call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten

from cai_labs.zero.flat import FlatParamUnit
from cai_labs.zero.stage2 import Zero2

__all__ = ["Zero3"]


class Zero3(Zero2):
    """ZeRO-3: optimizer state, gradients and parameters sharded.

    Args:
        module, units, group, overlap_comm, max_in_flight, param_dtype: as
            :class:`~cai_labs.zero.Zero2` (under mixed precision the rank keeps a low-precision
            shard, which is gathered, next to its fp32 master).
        prefetch: all-gathers started ahead of use, in the order recorded in the first step:
            ``True`` (one unit ahead), ``False`` (none) or an int depth ``>= 0``.

    Attributes:
        gathered_peak_bytes: largest number of bytes of gathered units besides the root seen by
            the hooks since the last :meth:`reset_gathered_peak` (prefetches in flight count).
        gathered_storage_peak_bytes: the same peak measured apart from that bookkeeping: the
            storage bytes really allocated for the full buffers of the units besides the root.
    """

    stage = 3

    def __init__(
        self,
        module: nn.Module,
        units: list[nn.Module] | None = None,
        group: dist.ProcessGroup | None = None,
        overlap_comm: bool = True,
        max_in_flight: int = 2,
        prefetch: bool | int = True,
        param_dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(prefetch, bool):
            depth = int(prefetch)
        elif isinstance(prefetch, int) and prefetch >= 0:
            depth = prefetch
        else:
            raise ValueError(f"prefetch must be True, False or an int depth >= 0; got {prefetch!r}")
        super().__init__(
            module,
            units=units,
            group=group,
            overlap_comm=overlap_comm,
            max_in_flight=max_in_flight,
            param_dtype=param_dtype,
        )
        self.prefetch_depth = depth
        self.root = self.units[-1] if self.unit_modules[-1] is module else None
        # Gathering orders, recorded during the first training step (forward, then backward).
        self._recording = True
        self._order: dict[str, list[FlatParamUnit]] = {"forward": [], "backward": []}
        self._position: dict[str, dict[int, int]] = {"forward": {}, "backward": {}}
        self.gathered_peak_bytes = self.gathered_storage_peak_bytes = 0
        for u, m in zip(self.units, self.unit_modules):
            m.register_forward_pre_hook(self._pre_forward(u))
            m.register_forward_hook(self._post_forward(u))
            u.free()

    def _make_shard(self, unit: FlatParamUnit) -> nn.Parameter:
        """ZeRO-3: the shard owns its storage, so the full buffer can be released."""
        own = unit.full_slice().clone()
        if self.mixed:  # gathered: the low-precision copy; updated: the fp32 master
            unit.low, own = own, own.to(torch.float32)
        unit.shard = nn.Parameter(own, requires_grad=False)
        return unit.shard

    # -- gathering with prefetch -------------------------------------------------------------
    def _gathered_besides_root(self) -> list[FlatParamUnit]:
        return [u for u in self.units if u.gathered and u is not self.root]

    def _use(self, u: FlatParamUnit, phase: str) -> None:
        """Gather ``u`` for its use now (waiting for its prefetch if one is in flight), then
        start the all-gathers of the units that follow it in ``phase``'s recorded order."""
        u.gather()
        if self._recording:
            if u not in self._order[phase]:
                self._order[phase].append(u)
        elif self.prefetch_depth:
            order = self._order[phase]
            i = self._position[phase].get(id(u))
            if i is not None:
                for nxt in order[i + 1 : i + 1 + self.prefetch_depth]:
                    if nxt.gathered or nxt is self.root:
                        continue
                    if len(self._gathered_besides_root()) >= self.prefetch_depth + 1:
                        break  # memory bound reached: this one is gathered when used
                    nxt.gather(async_op=True)
        self._track_peak()

    def _track_peak(self) -> None:
        now = sum(u.gathered_bytes for u in self._gathered_besides_root())
        self.gathered_peak_bytes = max(self.gathered_peak_bytes, now)
        allocated = sum(u.full.untyped_storage().nbytes() for u in self.units if u is not self.root)
        self.gathered_storage_peak_bytes = max(self.gathered_storage_peak_bytes, allocated)

    def reset_gathered_peak(self) -> None:
        self.gathered_peak_bytes = self.gathered_storage_peak_bytes = 0

    def gathered_bound_bytes(self) -> int:
        """The bound on :attr:`gathered_peak_bytes`: ``depth + 1`` of the largest units besides
        the root (bytes of the padded flat buffer ``(N * S,)``)."""
        sizes = [u.gathered_bytes for u in self.units if u is not self.root] or [0]
        return (self.prefetch_depth + 1) * max(sizes)

    def _pre_forward(self, u: FlatParamUnit) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if torch.is_grad_enabled():
                self._use(u, "forward")
            else:  # evaluation: gather and free per call, no recorded order
                u.gather()

        return hook

    def _post_forward(self, u: FlatParamUnit) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not torch.is_grad_enabled():
                u.free()
                return
            tensors = [
                t
                for t in tree_flatten(output)[0]
                if isinstance(t, torch.Tensor) and t.requires_grad
            ]
            for t in tensors:  # re-gather just before this unit's backward
                t.register_hook(self._pre_backward(u))
            if u is not self.root:
                u.free()

        return hook

    def _pre_backward(self, u: FlatParamUnit) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            self._use(u, "backward")
            return grad

        return hook

    def _unit_reduced(self, u: FlatParamUnit) -> None:
        u.free()

    def _end_of_backward(self) -> None:
        super()._end_of_backward()
        for u in self.units:  # (waits for any prefetch still in flight)
            u.free()
        if self._recording and self._order["backward"]:  # first step done: prefetch from now on
            self._recording = False
            for phase, order in self._order.items():
                self._position[phase] = {id(u): i for i, u in enumerate(order)}

    def after_step(self) -> None:
        """Nothing to gather: the updated shard is all this rank keeps; forward gathers.
        Under mixed precision the master is rounded into the low-precision shard."""
        if self.mixed:
            with torch.no_grad():
                for u in self.units:
                    u.low.copy_(u.shard)

    def _gather_all(self) -> None:
        for u in self.units:
            u.gather()

    def _release_all(self) -> None:
        for u in self.units:
            u.free()

    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        out = super().memory_tensors()
        out["param_shards"] = [u.low for u in self.units] if self.mixed else list(self.shards)
        return out
