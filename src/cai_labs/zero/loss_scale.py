"""Dynamic loss scaling for fp16 training, with one all-reduced overflow flag.

fp16 has 5 exponent bits: gradients below about ``6e-8`` underflow to zero. Multiplying the loss
by ``scale`` multiplies every gradient by it (exactly, for a power of two) and lifts them into
range; the optimizer then sees them divided by ``scale`` again, in fp32. Too large a scale
overflows to ``inf``/``nan``: that step is skipped and the scale multiplied by
``backoff_factor``; after ``growth_interval`` clean steps in a row it is multiplied by
``growth_factor``. Under ZeRO each rank sees only its gradient shard, so the overflow flag is
all-reduced (max) over the group: every rank skips, or steps, together.

bf16 needs no scaler: it has fp32's 8 exponent bits, so gradients do not underflow or overflow
where fp32's would not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

__all__ = ["DynamicLossScaler"]


class DynamicLossScaler:
    """Scale the loss, unscale the gradients, skip overflowing steps on every rank together.

    Args:
        init_scale: the first scale (a power of two keeps scaling exact).
        growth_factor, backoff_factor: multiply the scale by these after ``growth_interval``
            clean steps, and on an overflow.
        growth_interval: clean steps in a row before the scale grows.
        group: the process group whose ranks must agree on the flag (default: all ranks).
        sync: all-reduce the flag over ``group``; ``False`` for a serial run.

    Usage: ``scaler.scale(loss).backward()``, then ``scaler.step(optimizer)`` (returns whether
    it stepped), then ``optimizer.zero_grad()``.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        group: dist.ProcessGroup | None = None,
        sync: bool = True,
    ) -> None:
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1:
            raise ValueError(
                "need init_scale > 0, growth_factor > 1 and 0 < backoff_factor < 1; got "
                f"{init_scale}, {growth_factor}, {backoff_factor}"
            )
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1; got {growth_interval}")
        self.scale_value = float(init_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.group, self.sync = growth_interval, group, sync
        self.clean_steps = 0
        self.skipped = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale``: call ``backward`` on this."""
        return loss * self.scale_value

    def unscale_(self, grads: list[torch.Tensor]) -> bool:
        """Divide ``grads`` by the scale in place; return whether any rank found inf/nan."""
        local = any(not bool(torch.isfinite(g).all()) for g in grads)
        flag = torch.tensor([float(local)])
        if self.sync and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        found = bool(flag.item())
        if not found:
            for g in grads:
                g.div_(self.scale_value)
        return found

    def update(self, found_inf: bool) -> None:
        """Back off on an overflow; grow after ``growth_interval`` clean steps."""
        if found_inf:
            self.scale_value *= self.backoff_factor
            self.clean_steps = 0
            self.skipped += 1
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale_value *= self.growth_factor
            self.clean_steps = 0

    def step(
        self, optimizer: torch.optim.Optimizer, closure: Callable[[], None] | None = None
    ) -> bool:
        """Unscale the optimizer's gradients and step, or skip on overflow; returns ``stepped``.

        A :class:`~cai_labs.zero.optimizer.ZeroOptimizer` first reduces its gradients, so the
        check sees the averaged shard gradients (fp32 copies under mixed precision).
        """
        zero_model = getattr(optimizer, "zero_model", None)
        if zero_model is not None:
            zero_model.reduce_gradients()
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        found = self.unscale_(grads)
        self.update(found)
        if found:
            optimizer.zero_grad()
            return False
        optimizer.step(closure)
        return True
