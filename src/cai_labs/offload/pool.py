"""A memory pool that counts bytes and refuses to exceed a hard budget.

On a GPU the "device" pool would be the GPU's memory and the "host" pool pinned CPU memory. On
the CPU machines that build these pages both are ordinary RAM: the device pool here is an
**accounted, enforced budget**, not separate hardware. Every byte a chunk places "on the device"
goes through :meth:`MemoryPool.allocate`, which raises :class:`PoolBudgetExceeded` rather than
go over; ``peak`` records the most ever booked. ``peak`` is the pool's own account, so it can
never exceed the budget by construction: that a budget held in memory really allocated is
measured apart, by :attr:`cai_labs.offload.manager.ChunkManager.storage_peak`.
"""

from __future__ import annotations

__all__ = ["MemoryPool", "PoolBudgetExceeded"]


class PoolBudgetExceeded(MemoryError):
    """An allocation would take a pool over its budget."""


class MemoryPool:
    """Bytes in use, and the peak, of one memory pool (``budget=None``: unlimited)."""

    def __init__(self, name: str, budget: int | None = None) -> None:
        if budget is not None and budget <= 0:
            raise ValueError(f"pool {name!r}: budget must be a positive number of bytes or None")
        self.name = name
        self.budget = budget
        self.used = 0
        self.peak = 0

    @property
    def free_bytes(self) -> float:
        return float("inf") if self.budget is None else self.budget - self.used

    def fits(self, nbytes: int) -> bool:
        return self.budget is None or self.used + nbytes <= self.budget

    def allocate(self, nbytes: int) -> None:
        if not self.fits(nbytes):
            raise PoolBudgetExceeded(
                f"{self.name} pool: allocating {nbytes:,} bytes with {self.used:,} of "
                f"{self.budget:,} in use would exceed the budget"
            )
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def release(self, nbytes: int) -> None:
        self.used -= nbytes
        assert self.used >= 0, f"{self.name} pool released more than it allocated"

    def __repr__(self) -> str:
        return (
            f"MemoryPool({self.name!r}, used={self.used:,}, peak={self.peak:,}, "
            f"budget={self.budget})"
        )
