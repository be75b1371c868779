"""What the server counts: ``GET /metrics`` (JSON) and ``GET /metrics/prometheus`` (text format).

Per request: the outcome, end-to-end latency, queue time (arrival to admission into the running
batch), TTFT (time to first token: arrival to the first generated token, queue and prefill
included) and TPOT (time per output token after the first: ``(finish - first token) / (n - 1)``).
Per iteration of the scheduler: batch occupancy (requests in the decoding step), prefill tokens
and seconds. Percentiles are over the ``window`` most recent requests; the Prometheus side keeps
histograms (via ``prometheus_client``) that a Prometheus server turns into rates and quantiles.
Everything is updated from the event loop thread.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PCounter

if TYPE_CHECKING:
    from cai_labs.serving.scheduler import Sequence, StepReport

__all__ = ["ServerMetrics", "percentile_ms"]

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def percentile_ms(seconds: list[float] | deque, q: float) -> float | None:
    """The ``q``-th percentile of durations given in seconds, in milliseconds (None if empty)."""
    if not seconds:
        return None
    return float(np.percentile(np.asarray(seconds, dtype=float), q) * 1e3)


def _summary(seconds: deque) -> dict:
    return {
        "count": len(seconds),
        "p50": percentile_ms(seconds, 50),
        "p99": percentile_ms(seconds, 99),
        "mean": 1e3 * float(np.mean(seconds)) if seconds else None,
    }


class _Prometheus:
    """The same quantities as Prometheus collectors in a registry of their own."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = PCounter("serving_requests", "Requests by outcome", ["outcome"], registry=r)
        self.tokens = PCounter("serving_generated_tokens", "Tokens generated", registry=r)
        self.prefill = PCounter("serving_prefill_tokens", "Prompt tokens prefilled", registry=r)
        hist = {
            "latency": "End-to-end request latency (s)",
            "queue": "Arrival to admission into the running batch (s)",
            "ttft": "Time to first token (s)",
            "tpot": "Time per output token after the first (s)",
            "step": "Seconds per scheduler iteration",
        }
        self.hist = {
            k: Histogram(f"serving_{k}_seconds", doc, buckets=SECONDS, registry=r)
            for k, doc in hist.items()
        }
        self.occupancy = Histogram(
            "serving_batch_occupancy", "Requests per decoding step", buckets=ROWS, registry=r
        )
        self.queue_depth = Gauge("serving_queue_depth", "Requests waiting", registry=r)
        self.in_flight = Gauge("serving_in_flight", "Requests in the running batch", registry=r)


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
        self.occupancy: Counter[int] = Counter()
        self.latencies: deque[float] = deque(maxlen=self.window)
        self.queue_waits: deque[float] = deque(maxlen=self.window)
        self.ttft: deque[float] = deque(maxlen=self.window)
        self.tpot: deque[float] = deque(maxlen=self.window)
        self.generate_seconds = 0.0
        self.tokens_generated = 0
        self.prefill_tokens = 0
        self.queue_depth_max = 0
        self.prom = _Prometheus()

    def record(self, outcome: str, latency_s: float | None = None) -> None:
        self.outcomes[outcome] += 1
        self.prom.requests.labels(outcome).inc()
        if latency_s is not None:
            self.latencies.append(latency_s)
            self.prom.hist["latency"].observe(latency_s)

    def record_step(self, report: StepReport) -> None:
        """One scheduler iteration (a :class:`~cai_labs.serving.scheduler.StepReport`)."""
        for size in report.joined:
            self.batch_sizes[size] += 1
        if report.decoded:
            self.occupancy[report.decoded] += 1
            self.prom.occupancy.observe(report.decoded)
        self.generate_seconds += report.seconds
        self.prefill_tokens += report.prefill_tokens
        self.prom.prefill.inc(report.prefill_tokens)
        self.prom.hist["step"].observe(report.seconds)

    def record_timing(self, seq: Sequence) -> None:
        """Queue time, TTFT, TPOT and tokens of a finished request (a ``Sequence``)."""
        if seq.finish_reason == "cancelled":
            return
        n = len(seq.tokens)
        self.tokens_generated += n
        self.prom.tokens.inc(n)
        times = {"queue": (seq.admitted or seq.finished) - seq.arrived}
        if seq.first_token is not None:
            times["ttft"] = seq.first_token - seq.arrived
            if n > 1:
                times["tpot"] = (seq.finished - seq.first_token) / (n - 1)
        for key, value in times.items():
            {"queue": self.queue_waits, "ttft": self.ttft, "tpot": self.tpot}[key].append(value)
            self.prom.hist[key].observe(value)

    def observe_queue(self, depth: int) -> None:
        self.queue_depth_max = max(self.queue_depth_max, depth)

    def snapshot(self, queue_depth: int, in_flight: int) -> dict:
        """All metrics as plain JSON-able data."""
        batches = sum(self.batch_sizes.values())
        batched_requests = sum(size * n for size, n in self.batch_sizes.items())
        steps = sum(self.occupancy.values())
        uptime = time.time() - self.started
        return {
            "uptime_s": uptime,
            "requests": dict(self.outcomes),
            "batches": batches,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "mean_batch_size": batched_requests / batches if batches else None,
            "max_batch_size_seen": max(self.batch_sizes) if self.batch_sizes else 0,
            "decode_steps": steps,
            "occupancy": {str(k): v for k, v in sorted(self.occupancy.items())},
            "mean_occupancy": (
                sum(k * v for k, v in self.occupancy.items()) / steps if steps else None
            ),
            "queue_depth": queue_depth,
            "queue_depth_max": self.queue_depth_max,
            "in_flight": in_flight,
            "tokens_generated": self.tokens_generated,
            "prefill_tokens": self.prefill_tokens,
            "tokens_per_s": self.tokens_generated / uptime if uptime > 0 else None,
            "generate_seconds": self.generate_seconds,
            "latency_ms": _summary(self.latencies),
            "queue_wait_ms": _summary(self.queue_waits),
            "ttft_ms": _summary(self.ttft),
            "tpot_ms": _summary(self.tpot),
        }

    def prometheus(self, queue_depth: int, in_flight: int) -> bytes:
        """The Prometheus text exposition of the same metrics."""
        self.prom.queue_depth.set(queue_depth)
        self.prom.in_flight.set(in_flight)
        return generate_latest(self.prom.registry)
