"""A bounded, loopback-only load generator: throughput and latency percentiles of a server.

``concurrency`` clients (coroutines sharing one ``httpx.AsyncClient``) each send a request,
wait for its answer, and send the next (a *closed loop*: at most ``concurrency`` requests are
outstanding, as with that many users who wait for their answer). The run is bounded twice:
it stops after ``max_requests`` requests or ``time_limit_s`` seconds, whichever comes first.
It refuses any URL whose host is not a loopback address (127.0.0.0/8, ::1, localhost): this is a
tool for measuring a server on this machine, not for loading anyone else's.

Latency is measured by the client, from sending to the full answer; throughput is successful
answers per second of the run's wall time; p50/p99 are the 50th/99th percentiles of the
successful requests' latencies (p99: 1 request in 100 is slower). A payload is a JSON-able dict
sent to ``path``, or a ``(path, raw bytes)`` pair (malformed bodies, other endpoints).
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import httpx
import numpy as np

__all__ = ["KEEPALIVE_EXPIRY_S", "LoadResult", "check_loopback", "run_load", "load_test"]

#: Seconds after which the clients stop reusing an idle pooled connection (httpx's default):
#: below the server's keep-alive (``ServeConfig.keep_alive_s``), so that the server never
#: closes a connection at the moment a client reuses it.
KEEPALIVE_EXPIRY_S = 5.0


@dataclass
class LoadResult:
    """Outcome of one load-test run (latencies in milliseconds)."""

    concurrency: int
    sent: int
    ok: int
    rejected: int  # 503: queue full
    errors: int  # anything else that was not 200
    seconds: float
    throughput_rps: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    tokens: int
    tokens_per_s: float
    cached: int
    statuses: dict = field(default_factory=dict)
    client_errors: dict = field(default_factory=dict)
    latencies_ms: list = field(default_factory=list, repr=False)

    def row(self) -> dict:
        """The numbers for a results table (without the raw latencies)."""
        out = asdict(self)
        out.pop("latencies_ms")
        out.pop("statuses")
        out.pop("client_errors")
        return out


def check_loopback(url: str) -> None:
    """Raise ``ValueError`` unless ``url`` points at this machine's loopback interface."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(
        f"load generator targets loopback addresses only (127.0.0.1, ::1, "
        f"localhost), got host {host!r} in {url!r}"
    )


async def _post(
    client: httpx.AsyncClient, path: str, payload: dict | tuple[str, bytes]
) -> httpx.Response:
    if isinstance(payload, tuple):
        where, body = payload
        return await client.post(where, content=body, headers={"content-type": "application/json"})
    return await client.post(path, json=payload)


def _count(r: httpx.Response, counters: dict) -> None:
    """Tokens (and cache hits) of a JSON answer of /generate or /v1/completions."""
    if not r.headers.get("content-type", "").startswith("application/json"):
        return
    body = r.json()
    if "completion_tokens" in body:
        counters["tokens"] += body["completion_tokens"]
        counters["cached"] += body.get("cached", False)
    elif "usage" in body:
        counters["tokens"] += body["usage"]["completion_tokens"]


async def run_load(
    url: str,
    payloads: list,
    *,
    concurrency: int,
    max_requests: int,
    time_limit_s: float = 30.0,
    path: str = "/generate",
    request_timeout_s: float = 60.0,
) -> LoadResult:
    """Send up to ``max_requests`` requests (cycling through ``payloads``) from ``concurrency``
    closed-loop clients, for at most ``time_limit_s`` seconds. See the module docstring."""
    check_loopback(url)
    if concurrency < 1 or max_requests < 1 or time_limit_s <= 0 or not payloads:
        raise ValueError(
            "need concurrency >= 1, max_requests >= 1, time_limit_s > 0 and at least one payload"
        )
    statuses: Counter[int] = Counter()
    client_errors: Counter[str] = Counter()
    latencies: list[float] = []
    counters = {"next": 0, "tokens": 0, "cached": 0}
    start = time.perf_counter()
    deadline = start + time_limit_s
    limits = httpx.Limits(
        max_connections=concurrency,
        max_keepalive_connections=concurrency,
        keepalive_expiry=KEEPALIVE_EXPIRY_S,
    )
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=request_timeout_s) as client:

        async def user() -> None:
            while counters["next"] < max_requests and time.perf_counter() < deadline:
                payload = payloads[counters["next"] % len(payloads)]
                counters["next"] += 1
                sent = time.perf_counter()
                try:
                    r = await _post(client, path, payload)
                except httpx.HTTPError as exc:  # counted as status -1, by kind in client_errors
                    statuses[-1] += 1
                    client_errors[type(exc).__name__] += 1
                    continue
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - sent)
                    _count(r, counters)

        await asyncio.gather(*(user() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    ok = statuses[200]
    lat = np.asarray(latencies) * 1e3
    return LoadResult(
        concurrency=concurrency,
        sent=sum(statuses.values()),
        ok=ok,
        rejected=statuses[503],
        errors=sum(n for s, n in statuses.items() if s not in (200, 503)),
        seconds=seconds,
        throughput_rps=ok / seconds,
        p50_ms=float(np.percentile(lat, 50)) if ok else None,
        p99_ms=float(np.percentile(lat, 99)) if ok else None,
        mean_ms=float(lat.mean()) if ok else None,
        tokens=counters["tokens"],
        tokens_per_s=counters["tokens"] / seconds,
        cached=counters["cached"],
        statuses=dict(statuses),
        client_errors=dict(client_errors),
        latencies_ms=lat.tolist(),
    )


def load_test(url: str, payloads: list, **kwargs) -> LoadResult:
    """Blocking wrapper of :func:`run_load` (works in scripts and inside a running event loop,
    e.g. Jupyter, by running in a helper thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_load(url, payloads, **kwargs))
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(run_load(url, payloads, **kwargs))
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
