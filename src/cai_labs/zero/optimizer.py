"""The sharded optimizer: any ``torch.optim`` optimizer, run on this rank's shards only.

:class:`ZeroOptimizer` is a real :class:`torch.optim.Optimizer` (so learning-rate schedulers,
Lightning and ``state_dict`` work with it) whose ``param_groups`` and ``state`` are those of an
inner optimizer built over the :attr:`ZeroModel.shards <cai_labs.zero.base.ZeroModel.shards>`.
Its state is therefore ``K Ψ / N`` bytes per rank instead of ``K Ψ`` (``K = 8`` for fp32 Adam;
``K = 12`` in mixed precision, where the shards are fp32 master weights).

``step()`` = :meth:`~cai_labs.zero.base.ZeroModel.reduce_gradients` (stage 1 reduce-scatters
here; stages 2 and 3 already did during backward), the inner step on the shards, then
:meth:`~cai_labs.zero.base.ZeroModel.after_step` (stages 1 and 2 all-gather the parameters).
Elementwise optimizers (SGD, Adam, AdamW, ...) give exactly the update they would give the full
tensors. Optimizers that need whole-tensor norms (LAMB, LARS) would see shard norms: not
supported here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from cai_labs.zero.base import ZeroModel

__all__ = ["ZeroOptimizer"]


class ZeroOptimizer(torch.optim.Optimizer):
    """Drive a :class:`~cai_labs.zero.base.ZeroModel`'s step with a sharded inner optimizer.

    Args:
        zero_model: the wrapped model.
        optimizer_cls: a ``torch.optim.Optimizer`` class (default Adam).
        **defaults: its hyper-parameters (``lr=...``, ``betas=...``).
    """

    def __init__(
        self,
        zero_model: ZeroModel,
        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
        **defaults: Any,
    ) -> None:
        self.zero_model = zero_model
        self.inner = optimizer_cls(zero_model.shards, **defaults)
        super().__init__(zero_model.shards, self.inner.defaults)
        # Share, not copy: schedulers that edit param_groups must reach the inner optimizer.
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    @classmethod
    def from_optimizer(
        cls, zero_model: ZeroModel, optimizer: torch.optim.Optimizer
    ) -> ZeroOptimizer:
        """Same class and hyper-parameters as ``optimizer`` (built over the unwrapped model)."""
        if len(optimizer.param_groups) != 1:
            raise ValueError(
                "ZeroOptimizer.from_optimizer supports one parameter group; got "
                f"{len(optimizer.param_groups)}. Pass optimizer_cls and defaults instead"
            )
        accepted = inspect.signature(type(optimizer).__init__).parameters
        group = {
            k: v for k, v in optimizer.param_groups[0].items() if k != "params" and k in accepted
        }
        return cls(zero_model, type(optimizer), **group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.zero_model.reduce_gradients()
        self.inner.step()
        self.zero_model.after_step()
        if self.zero_model.mixed:  # the fp32 gradient copies were temporaries of this step
            for s in self.zero_model.shards:
                s.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.zero_model.zero_grad(set_to_none=set_to_none)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the averaged gradient to global L2 norm ``max_norm``; call between backward and
        :meth:`step`. Returns the norm before clipping (the same on every rank)."""
        self.zero_model.reduce_gradients()  # stage 1 reduces here (once); 2/3 already did
        return self.zero_model.clip_grad_norm_(max_norm)
