"""The service behind the routes: engine, batcher, cache and metrics, and one path for a request.

Every generation endpoint (``/generate``, ``/generate/stream``, ``/v1/completions``,
``/v1/chat/completions``, streamed or not) turns its body into an :class:`Ask` and calls
:meth:`Service.start`, which checks the limits, answers from the cache or queues the job (503
when full), and returns a :class:`Run`; JSON endpoints await :meth:`Run.result`, streaming ones
iterate :meth:`Run.events`. Problems are raised as :class:`ServiceError` (status + message),
which the app turns into the one ``{"error": ...}`` body.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from cai_labs.serving.batcher import Batcher, PendingRequest, QueueFull
from cai_labs.serving.cache import LRUCache
from cai_labs.serving.config import ServeConfig
from cai_labs.serving.engine import Completion, GenerationEngine, GenerationJob
from cai_labs.serving.metrics import ServerMetrics
from cai_labs.serving.scheduler import Scheduler

__all__ = ["Ask", "Run", "Service", "ServiceError"]

OUTCOME = {503: "rejected_queue_full", 504: "timeout", 500: "error"}


class ServiceError(Exception):
    """A request that gets ``status`` and ``{"error": message}`` instead of an answer."""

    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers

    @property
    def outcome(self) -> str:
        return "bad_request" if 400 <= self.status < 500 else OUTCOME.get(self.status, "error")


@dataclass(frozen=True)
class Ask:
    """One generation request, whichever API it came by. ``max_new_tokens=None``: as many as
    the limit and the model's positions allow."""

    prompt: str
    max_new_tokens: int | None = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    use_cache: bool = True

    @property
    def deterministic(self) -> bool:
        """Greedy, or sampled with a seed: the same request always gives the same text."""
        return self.temperature == 0.0 or self.seed is not None


@dataclass
class Run:
    """A request being served: its prompt ids and either a cached answer or a queued job."""

    ids: list[int]
    arrived: float
    cached: Completion | None = None
    pending: PendingRequest | None = None
    tokens: asyncio.Queue | None = None  # (token_id, text so far), then None; streaming only
    timeout_s: float = 60.0
    key: tuple | None = field(default=None, repr=False)

    @property
    def queue_s(self) -> float:
        p = self.pending
        return 0.0 if p is None or p.dequeued is None else p.dequeued - p.arrived

    async def result(self) -> Completion:
        """The completion; ServiceError 504 after the timeout (the row is then freed)."""
        if self.cached is not None:
            return self.cached
        future = self.pending.future
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except asyncio.TimeoutError:  # (an alias of TimeoutError from Python 3.11)
            future.cancel()
            raise ServiceError(
                504,
                f"not answered within {self.timeout_s} s; the server is overloaded: retry "
                "later or ask for fewer tokens",
            ) from None
        except ServiceError:
            raise
        except Exception as exc:
            raise ServiceError(500, f"generation failed: {type(exc).__name__}: {exc}") from exc

    async def events(self) -> AsyncIterator[tuple[int, str]]:
        """``(token_id, new text)`` per generated token, as decoded (``""`` while a character is
        incomplete); ServiceError 504 when the deadline passes."""
        sent = ""
        deadline = self.arrived + self.timeout_s
        while True:
            try:
                left = max(0.0, deadline - time.perf_counter())
                item = await asyncio.wait_for(self.tokens.get(), left)
            except asyncio.TimeoutError:
                self.pending.future.cancel()
                raise ServiceError(504, f"timed out after {self.timeout_s} s") from None
            if item is None:
                return
            token_id, text = item
            delta = ""
            if not text.endswith("\ufffd"):  # else: half a character, send it with the rest
                delta, sent = text[len(sent) :], text
            yield token_id, delta


class Service:
    """The engine and what stands in front of it; one per app.

    Args:
        engine: the model and tokenizer.
        config: settings; ``None`` limits are derived from the checkpoint.
        name: the model id for ``/v1/models`` when the config names none.
    """

    def __init__(self, engine: GenerationEngine, config: ServeConfig, name: str = "model") -> None:
        self.engine = engine
        self.config = config.for_checkpoint(engine.max_positions, name)
        self.metrics = ServerMetrics()
        self.cache = LRUCache(self.config.cache_size)
        self.batcher: Batcher | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start_batcher(self) -> None:
        c = self.config
        scheduler = Scheduler(
            self.engine, c.max_batch_size, c.max_batch_tokens, c.prefill_chunk, c.policy
        )
        self.batcher = Batcher(scheduler, c.max_wait_ms, c.queue_size, self.metrics)
        self.batcher.start()

    async def stop_batcher(self) -> None:
        await self.batcher.stop()

    # -- the one path of a request ----------------------------------------------------------------

    def prepare(self, ask: Ask) -> tuple[list[int], int]:
        """Prompt ids and the number of new tokens, or ServiceError 422 saying what to change."""
        c, positions = self.config, self.engine.max_positions
        if len(ask.prompt) > c.max_prompt_chars:
            raise ServiceError(
                422,
                f"prompt is {len(ask.prompt)} characters; the limit is {c.max_prompt_chars}: "
                "shorten it",
            )
        if ask.max_new_tokens is not None and ask.max_new_tokens > c.max_new_tokens_limit:
            raise ServiceError(
                422,
                f"max_new_tokens={ask.max_new_tokens} is over this server's limit of "
                f"{c.max_new_tokens_limit}: ask for fewer tokens",
            )
        ids = self.engine.encode(ask.prompt)
        if len(ids) > c.max_prompt_tokens:
            raise ServiceError(
                422, f"prompt is {len(ids)} tokens; the limit is {c.max_prompt_tokens}: shorten it"
            )
        new = ask.max_new_tokens or min(c.max_new_tokens_limit, positions - len(ids))
        if len(ids) + new > positions:
            raise ServiceError(
                422,
                f"prompt ({len(ids)} tokens) + max_new_tokens ({new}) exceeds the model's "
                f"{positions} positions: ask for fewer tokens",
            )
        return ids, new

    def start(self, ask: Ask, stream: bool = False) -> Run:
        """Check, then answer from the cache (not when streaming) or queue the job."""
        ids, new = self.prepare(ask)
        run = Run(ids, time.perf_counter(), timeout_s=self.config.request_timeout_s)
        if self.config.cache_size and ask.deterministic and ask.use_cache and not stream:
            run.key = (ask, new)
            run.cached = self.cache.get(run.key)
            if run.cached is not None:
                return run
        on_token = None
        if stream:
            loop, run.tokens = asyncio.get_running_loop(), asyncio.Queue()

            def on_token(token_id: int, text: str) -> None:  # called in the decoding thread
                loop.call_soon_threadsafe(run.tokens.put_nowait, (token_id, text))

        job = GenerationJob(
            ids, new, ask.temperature, ask.top_k, ask.seed, on_token, ask.ignore_eos, ask.top_p,
            ask.stop,
        )  # fmt: skip
        try:
            run.pending = self.batcher.submit(job)
        except QueueFull as exc:
            raise ServiceError(503, str(exc), headers={"Retry-After": "1"}) from None
        if stream:  # token callbacks are scheduled before the completion, so None comes last
            run.pending.future.add_done_callback(lambda _: run.tokens.put_nowait(None))
        return run

    async def complete(self, ask: Ask) -> tuple[Completion, Run]:
        """Serve ``ask`` to the end (the JSON endpoints)."""
        run = self.start(ask)
        result = await run.result()
        if run.cached is None and run.key is not None:
            self.cache.put(run.key, result)
        self.finished(run)
        return result, run

    def finished(self, run: Run) -> None:
        """Count an answered request."""
        outcome = "cached" if run.cached is not None else "ok"
        self.metrics.record(outcome, time.perf_counter() - run.arrived)

    # -- introspection ----------------------------------------------------------------------------

    def health(self) -> dict:
        model = self.engine.model
        return {
            "status": "ok",
            "model": type(model).__name__,
            "model_name": self.config.model_name,
            "parameters": sum(p.numel() for p in model.parameters()),
            "max_positions": self.engine.max_positions,
            "config": self.config.as_dict(),
        }

    def snapshot(self) -> dict:
        b = self.batcher
        snap = self.metrics.snapshot(b.queue.qsize(), b.in_flight)
        lookups = self.cache.hits + self.cache.misses
        snap["cache"] = {
            "hits": self.cache.hits,
            "misses": self.cache.misses,
            "entries": len(self.cache),
            "capacity": self.cache.capacity,
            "hit_rate": self.cache.hits / lookups if lookups else None,
        }
        return snap

    def prometheus(self) -> bytes:
        return self.metrics.prometheus(self.batcher.queue.qsize(), self.batcher.in_flight)

    def reset_metrics(self) -> None:
        self.metrics.reset()
        self.cache.hits = self.cache.misses = 0
