"""Dynamic batching: one asyncio task turns a queue of single requests into batched ``generate``
calls.

The policy: wait for a first request; then keep collecting until ``max_batch_size`` requests
are in hand or ``max_wait_ms`` has passed since the first one arrived; run them as one batch
(in a worker thread, so the event loop keeps accepting, rejecting and answering ``/health``);
repeat. While a batch decodes, newcomers queue up and form the next batch, so under load
batches fill up by themselves and the wait bound only matters when traffic is light: it caps
the latency a lone request pays for the chance of company.

The queue is bounded. :meth:`DynamicBatcher.submit` raises :class:`QueueFull` at once when
``queue_size`` requests are already waiting: a server that accepts everything under overload
only converts the overload into unbounded latency and memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cai_labs.serving.engine import Completion, GenerationEngine, GenerationJob
from cai_labs.serving.metrics import ServerMetrics

__all__ = ["QueueFull", "PendingRequest", "DynamicBatcher"]


class QueueFull(Exception):
    """The request queue holds ``queue_size`` requests already: try again later."""


@dataclass
class PendingRequest:
    """A job waiting in the queue and the future its HTTP handler awaits."""

    job: GenerationJob
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)
    dequeued: float | None = None


class DynamicBatcher:
    """Gathers queued requests into batches for ``engine.generate_batch``.

    Args:
        engine: the model.
        max_batch_size: most requests per batch (1 = no batching).
        max_wait_ms: longest a batch waits to fill after its first request.
        queue_size: bound of the waiting queue.
        metrics: where batch sizes and queue depths are recorded.
    """

    POLL_S = 0.0005  # how often the batcher looks for late joiners while a batch fills

    def __init__(
        self,
        engine: GenerationEngine,
        max_batch_size: int,
        max_wait_ms: float,
        queue_size: int,
        metrics: ServerMetrics,
    ) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1e3
        self.queue: asyncio.Queue[PendingRequest] = asyncio.Queue(maxsize=queue_size)
        self.metrics = metrics
        self.in_flight = 0
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    def start(self) -> None:
        """Start the batching task on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        """Cancel the batching task, fail whatever still waits, release the worker thread."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self.queue.empty():
            pending = self.queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("server is shutting down"))
        self._executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, job: GenerationJob) -> PendingRequest:
        """Queue ``job``; the returned request's ``future`` resolves to its :class:`Completion`.

        Raises:
            QueueFull: ``queue_size`` requests are already waiting.
        """
        pending = PendingRequest(job, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise QueueFull(
                f"request queue is full ({self.queue.maxsize} requests waiting); retry later, "
                "or start the server with a larger --queue-size"
            ) from None
        self.metrics.observe_queue(self.queue.qsize())
        return pending

    def _take_ready(self, batch: list[PendingRequest]) -> None:
        while len(batch) < self.max_batch_size and not self.queue.empty():
            pending = self.queue.get_nowait()
            if not pending.future.done():  # skip requests whose client already gave up
                batch.append(pending)

    async def _collect(self) -> list[PendingRequest]:
        batch: list[PendingRequest] = []
        while not batch:
            first = await self.queue.get()
            if not first.future.done():
                batch.append(first)
        deadline = time.perf_counter() + self.max_wait_s
        self._take_ready(batch)
        while len(batch) < self.max_batch_size and time.perf_counter() < deadline:
            await asyncio.sleep(min(self.POLL_S, max(0.0, deadline - time.perf_counter())))
            self._take_ready(batch)
        now = time.perf_counter()
        for pending in batch:
            pending.dequeued = now
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            self.in_flight = len(batch)
            try:
                results: list[Completion] = await loop.run_in_executor(
                    self._executor, self.engine.generate_batch, [p.job for p in batch]
                )
            except Exception as exc:  # a failing batch fails its requests, not the server
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            finally:
                self.in_flight = 0
            self.metrics.record_batch(
                len(batch),
                results[0].generate_s if results else 0.0,
                sum(len(r.token_ids) for r in results),
            )
            for pending, result in zip(batch, results):
                self.metrics.queue_waits.append(pending.dequeued - pending.arrived)
                if not pending.future.done():
                    pending.future.set_result(result)
