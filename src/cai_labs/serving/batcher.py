"""The asyncio side of batching: a bounded queue in front of the :class:`Scheduler`, driven one
iteration at a time from the event loop.

The loop: when the scheduler has nothing to do, wait for a first request, then up to
``max_wait_ms`` for company (a lone request pays at most that for the chance of a fuller first
batch); otherwise hand it, without waiting, as many queued requests as it has room for; run one
:meth:`Scheduler.step` on a worker thread (so the event loop keeps accepting, rejecting and
answering ``/health``); resolve the futures of the requests that finished; repeat.

The queue is bounded: :meth:`Batcher.submit` raises :class:`QueueFull` at once when
``queue_size`` requests already wait. A server that accepts everything under overload only
turns the overload into unbounded latency and memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cai_labs.serving.engine import GenerationJob
from cai_labs.serving.metrics import ServerMetrics
from cai_labs.serving.scheduler import Scheduler, Sequence, StepReport

__all__ = ["QueueFull", "PendingRequest", "Batcher"]


class QueueFull(Exception):
    """The request queue holds ``queue_size`` requests already: try again later."""


@dataclass
class PendingRequest:
    """A job waiting in the queue and the future its HTTP handler awaits."""

    job: GenerationJob
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)
    dequeued: float | None = None
    seq: Sequence | None = None


class Batcher:
    """Feeds queued requests to ``scheduler`` and answers them when they finish.

    Args:
        scheduler: the iteration-level scheduler around the engine.
        max_wait_ms: longest an idle server waits for a first batch to fill.
        queue_size: bound of the waiting queue.
        metrics: where steps, occupancy and request times are recorded.
    """

    POLL_S = 0.0005  # how often an idle batcher looks for late joiners while a batch fills

    def __init__(
        self, scheduler: Scheduler, max_wait_ms: float, queue_size: int, metrics: ServerMetrics
    ) -> None:
        self.scheduler = scheduler
        self.max_wait_s = max_wait_ms / 1e3
        self.queue: asyncio.Queue[PendingRequest] = asyncio.Queue(maxsize=queue_size)
        self.metrics = metrics
        self._active: dict[int, PendingRequest] = {}
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    @property
    def in_flight(self) -> int:
        """Requests admitted into the running batch and not finished."""
        return len(self._active)

    def start(self) -> None:
        """Start the batching task on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        """Cancel the batching task, fail whatever still waits, release the worker thread."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        waiting = [self.queue.get_nowait() for _ in range(self.queue.qsize())]
        self._fail([*waiting, *self._active.values()], RuntimeError("server is shutting down"))
        self._executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, job: GenerationJob) -> PendingRequest:
        """Queue ``job``; the returned request's ``future`` resolves to its completion.

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

    def _admit(self, pending: PendingRequest) -> None:
        if pending.future.done():  # its client already gave up
            return
        pending.seq = self.scheduler.add(pending.job, arrived=pending.arrived)
        self._active[id(pending.seq)] = pending

    def _take_ready(self) -> None:
        while self.scheduler.free_slots and not self.queue.empty():
            self._admit(self.queue.get_nowait())

    async def _gather(self) -> None:
        """Idle: wait for a first request, then up to ``max_wait_ms`` for more."""
        while not self._active:
            self._admit(await self.queue.get())
        deadline = time.perf_counter() + self.max_wait_s
        self._take_ready()
        while self.scheduler.free_slots and time.perf_counter() < deadline:
            await asyncio.sleep(min(self.POLL_S, max(0.0, deadline - time.perf_counter())))
            self._take_ready()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.scheduler.idle():
                await self._gather()
            else:
                self._take_ready()
            for pending in self._active.values():  # timed out or disconnected: free its row
                pending.seq.cancelled = pending.future.done()
            try:
                report = await loop.run_in_executor(self._executor, self.scheduler.step)
            except Exception as exc:  # a failing step fails its requests, not the server
                self._fail(list(self._active.values()), exc)
                self._active.clear()
                self.scheduler.clear()
                continue
            self._deliver(report)

    def _deliver(self, report: StepReport) -> None:
        self.metrics.record_step(report)
        for seq in report.finished:
            pending = self._active.pop(id(seq))
            pending.dequeued = seq.admitted or seq.finished
            self.metrics.record_timing(seq)
            if not pending.future.done():
                pending.future.set_result(seq.completion())

    @staticmethod
    def _fail(pendings: list[PendingRequest], exc: BaseException) -> None:
        for pending in pendings:
            if not pending.future.done():
                pending.future.set_exception(exc)
