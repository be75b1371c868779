"""Chunk placement: which chunks are on the device, fetched when, evicted which first.

The :class:`ChunkManager` owns two :class:`~cai_labs.offload.pool.MemoryPool` objects: a
``device`` pool with a hard byte budget and an unlimited ``host`` pool. Every chunk lives in host
memory; a chunk that a computation needs is **fetched** to the device (host -> device copy),
**pinned** while in use and unpinned after. When the device pool has no room, unpinned resident
chunks are **evicted** in least-recently-used order: a dirty chunk (changed on the device: a
gradient written, parameters updated) is copied back to host first, a clean one is simply
dropped. **Prefetch** brings in chunks that will be needed soon (the next modules of the forward
order), evicting least-recently-used chunks that are not themselves about to be used; on a GPU
it would run on a side stream to overlap the copy with compute, here it is synchronous.

Traffic is counted in bytes per direction, with demand and prefetch fetches apart, so a page can
show how much moved between the pools to train under the budget. On CPU the copies are real
``copy_`` calls between two RAM buffers; the budget is an accounted, enforced limit. The pool's
``peak`` is that account (bytes the manager booked); ``storage_peak`` is measured apart from it:
the largest sum of the storage bytes really allocated for the chunks' device copies, read after
every load, so a chunk evicted from the account but not freed would show.

Colossal-AI's Gemini places chunks with statistics gathered by a memory tracer in a warm-up
step; LRU is the simplest policy that is correct, and the one implemented here.
"""

from __future__ import annotations

from collections.abc import Iterable

from cai_labs.offload.chunk import Chunk
from cai_labs.offload.pool import MemoryPool, PoolBudgetExceeded

__all__ = ["ChunkManager"]


class ChunkManager:
    """Place chunks on a budgeted device pool or in host memory; see the module docstring.

    Args:
        device_budget: bytes the device pool may hold (``None``: unlimited).
    """

    def __init__(self, device_budget: int | None) -> None:
        self.device = MemoryPool("device", device_budget)
        self.host = MemoryPool("host", None)
        self.chunks: list[Chunk] = []
        self.clock = 0
        self.traffic = {"h2d_demand": 0, "h2d_prefetch": 0, "d2h": 0}
        self.counts = {"fetch": 0, "prefetch": 0, "evict": 0, "prefetch_hits": 0, "hits": 0}
        self._prefetched: set[int] = set()
        # One dict per move: event ("fetch", "prefetch", "evict"), chunk name, device bytes in
        # use after it ("used") and resident bytes per chunk kind ("param", "grad", ...).
        self.trace: list[dict] = []
        self.max_trace = 100_000
        self.storage_peak = 0  # measured: most bytes of device-copy storage allocated at once

    def register(self, chunk: Chunk) -> Chunk:
        """Adopt ``chunk`` (resident in host memory only)."""
        if self.device.budget is not None and chunk.nbytes > self.device.budget:
            raise ValueError(
                f"the device budget of {self.device.budget:,} bytes cannot hold even one chunk "
                f"({chunk.nbytes:,} bytes): raise the budget or lower chunk_size"
            )
        self.host.allocate(chunk.nbytes)
        self.chunks.append(chunk)
        return chunk

    # -- moving ---------------------------------------------------------------------------------
    def fetch(self, chunk: Chunk, pin: bool = True) -> Chunk:
        """Make ``chunk`` resident on the device (evicting others if needed); pin it."""
        self.clock += 1
        chunk.last_use = self.clock
        if chunk.resident:
            self.counts["hits"] += 1
            if id(chunk) in self._prefetched:
                self.counts["prefetch_hits"] += 1
                self._prefetched.discard(id(chunk))
        else:
            self._make_room(chunk.nbytes)
            self._load(chunk)
            self.traffic["h2d_demand"] += chunk.nbytes
            self.counts["fetch"] += 1
            self._log("fetch", chunk)
        if pin:
            chunk.pins += 1
        return chunk

    def prefetch(self, chunks: Iterable[Chunk]) -> None:
        """Fetch ``chunks`` ahead of use, evicting only unpinned chunks not in ``chunks``.

        Stops quietly when no room can be made: a prefetch is a hint, never an error.
        """
        chunks = list(chunks)
        keep = {id(c) for c in chunks}
        for c in chunks:
            if c.resident:
                continue
            try:
                self._make_room(c.nbytes, keep)
            except PoolBudgetExceeded:
                return
            self._load(c)
            c.last_use = self.clock
            self.traffic["h2d_prefetch"] += c.nbytes
            self.counts["prefetch"] += 1
            self._prefetched.add(id(c))
            self._log("prefetch", c)

    def unpin(self, chunk: Chunk) -> None:
        if chunk.pins <= 0:
            raise RuntimeError(f"{chunk.name} unpinned more often than pinned")
        chunk.pins -= 1

    def evict(self, chunk: Chunk) -> None:
        """Move ``chunk`` back to host memory only (copying it if dirty)."""
        if not chunk.resident:
            return
        if chunk.pins:
            raise RuntimeError(f"{chunk.name} is in use and cannot be evicted")
        if chunk.dirty:
            chunk.host.copy_(chunk.data)
            self.traffic["d2h"] += chunk.nbytes
            chunk.dirty = False
        chunk.data.untyped_storage().resize_(0)
        chunk.resident = False
        self.device.release(chunk.nbytes)
        self.counts["evict"] += 1
        self._prefetched.discard(id(chunk))
        self._log("evict", chunk)

    def _log(self, event: str, chunk: Chunk) -> None:
        if len(self.trace) < self.max_trace:
            entry = {"event": event, "chunk": chunk.name, "used": self.device.used}
            for c in self.chunks:
                entry[c.kind] = entry.get(c.kind, 0) + (c.nbytes if c.resident else 0)
            self.trace.append(entry)

    def flush(self) -> None:
        """Copy every dirty resident chunk to host (host then holds the current values)."""
        for c in self.chunks:
            if c.resident and c.dirty:
                c.host.copy_(c.data)
                self.traffic["d2h"] += c.nbytes
                c.dirty = False

    def _load(self, chunk: Chunk) -> None:
        self.device.allocate(chunk.nbytes)
        chunk.data.untyped_storage().resize_(chunk.nbytes)
        chunk.data.copy_(chunk.host)
        chunk.resident = True
        chunk.dirty = False
        self.storage_peak = max(self.storage_peak, self.storage_bytes())

    def storage_bytes(self) -> int:
        """Bytes of storage allocated now for the chunks' device copies (not the account)."""
        return sum(c.data.untyped_storage().nbytes() for c in self.chunks)

    def _make_room(self, nbytes: int, keep: set[int] | None = None) -> None:
        keep = keep or set()
        while not self.device.fits(nbytes):
            victims = [c for c in self.chunks if c.resident and c.pins == 0 and id(c) not in keep]
            if not victims:
                pinned = [c.name for c in self.chunks if c.resident]
                raise PoolBudgetExceeded(
                    f"device budget {self.device.budget:,} B: need {nbytes:,} B more but every "
                    f"resident chunk is in use ({', '.join(pinned)}); raise the budget or lower "
                    "chunk_size"
                )
            self.evict(min(victims, key=lambda c: c.last_use))

    def stats(self) -> dict:
        """Traffic (bytes), counts, the device pool's budget, accounted peak and current use,
        and the measured peak of allocated device-copy storage."""
        return {
            **self.traffic,
            **self.counts,
            "device_budget": self.device.budget,
            "device_peak": self.device.peak,
            "device_storage_peak": self.storage_peak,
            "device_used": self.device.used,
            "host_bytes": self.host.used,
        }
