"""What the server counts, served as JSON by ``GET /metrics``.

Counters (requests by outcome), the size of every batch the batcher ran (the evidence that
dynamic batching happens), queue depth now and at its highest, cache hits and misses, and
latency percentiles over the most recent requests. Everything is updated from the event loop
thread, so plain attributes are enough; ``snapshot`` copies them into a dict.
"""

from __future__ import annotations

import time
from collections import Counter, deque

import numpy as np

__all__ = ["ServerMetrics", "percentile_ms"]


def percentile_ms(seconds: list[float] | deque, q: float) -> float | None:
    """The ``q``-th percentile of durations given in seconds, in milliseconds (None if empty)."""
    if not seconds:
        return None
    return float(np.percentile(np.asarray(seconds, dtype=float), q) * 1e3)


class ServerMetrics:
    """Counters and recent latencies of one server (``window`` most recent requests)."""

    OUTCOMES = ("ok", "cached", "rejected_queue_full", "bad_request", "timeout", "error")

    def __init__(self, window: int = 10000) -> None:
        self.window = window
        self.reset()

    def reset(self) -> None:
        """Start counting afresh (``POST /metrics/reset``, between load-test phases)."""
        self.started = time.time()
        self.outcomes: Counter[str] = Counter({k: 0 for k in self.OUTCOMES})
        self.batch_sizes: Counter[int] = Counter()
        self.latencies: deque[float] = deque(maxlen=self.window)
        self.queue_waits: deque[float] = deque(maxlen=self.window)
        self.generate_seconds = 0.0
        self.tokens_generated = 0
        self.queue_depth_max = 0
        self.cache_hits = 0
        self.cache_misses = 0

    def record(self, outcome: str, latency_s: float | None = None) -> None:
        self.outcomes[outcome] += 1
        if latency_s is not None:
            self.latencies.append(latency_s)

    def record_batch(self, size: int, seconds: float, tokens: int) -> None:
        self.batch_sizes[size] += 1
        self.generate_seconds += seconds
        self.tokens_generated += tokens

    def observe_queue(self, depth: int) -> None:
        self.queue_depth_max = max(self.queue_depth_max, depth)

    def snapshot(self, queue_depth: int, in_flight: int) -> dict:
        """All metrics as plain JSON-able data."""
        batches = sum(self.batch_sizes.values())
        batched_requests = sum(size * n for size, n in self.batch_sizes.items())
        lookups = self.cache_hits + self.cache_misses
        return {
            "uptime_s": time.time() - self.started,
            "requests": dict(self.outcomes),
            "batches": batches,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "mean_batch_size": batched_requests / batches if batches else None,
            "max_batch_size_seen": max(self.batch_sizes) if self.batch_sizes else 0,
            "queue_depth": queue_depth,
            "queue_depth_max": self.queue_depth_max,
            "in_flight": in_flight,
            "cache": {
                "hits": self.cache_hits,
                "misses": self.cache_misses,
                "hit_rate": self.cache_hits / lookups if lookups else None,
            },
            "tokens_generated": self.tokens_generated,
            "generate_seconds": self.generate_seconds,
            "latency_ms": {
                "count": len(self.latencies),
                "p50": percentile_ms(self.latencies, 50),
                "p99": percentile_ms(self.latencies, 99),
                "mean": (1e3 * float(np.mean(self.latencies)) if self.latencies else None),
            },
            "queue_wait_ms": {
                "p50": percentile_ms(self.queue_waits, 50),
                "p99": percentile_ms(self.queue_waits, 99),
            },
        }
