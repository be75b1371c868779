"""Serving: continuous vs static batching, a locust run, and a soak test of 10,000 requests.

1. **Continuous vs static batching** on an OPT-125m-shaped checkpoint (facebook/opt-125m's
   config, random weights, a toy vocabulary; made here): each policy in its own
   ``python -m cai_labs.serving`` process on a free loopback port, the result cache off, at
   concurrency 16 and 64, requests asking for 8-64 new tokens (drawn once, end-of-text ignored,
   the same list for both policies). A bounded closed-loop load measures throughput (generated
   tokens per second); the server's ``/metrics`` give TTFT and TPOT percentiles and the mean
   batch occupancy per decoding step. Two static baselines admit nobody until the whole batch
   is done: ``padded`` keeps computing finished rows until the batch's longest request ends (one
   Hugging Face ``generate`` call per batch, the seed service's engine); ``static`` lets finished
   rows leave the batch. On a CPU a decoding step costs about in proportion to its rows, so
   ``static`` already saves what continuous batching saves by not computing finished rows.
2. **locust**, headless and bounded (users, run time), against the continuous server's
   ``/v1/completions`` on 127.0.0.1.
3. **Soak**: 10,000 requests, valid and malformed bodies mixed, from 64 concurrent clients to
   a server of the small test checkpoint; every request must be answered (2xx, 4xx or 503), the
   server must stay up, and its resident memory after the run is compared with after warm-up.

Prints what it measured; asserts nothing about speed (this machine's cores may be shared).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from cai_labs.serving import ServerProcess, load_test, make_toy_checkpoint
from cai_labs.serving.toy_checkpoint import make_opt_125m_shaped_checkpoint

LOCUSTFILE = """
import random
from locust import HttpUser, constant, task

class Client(HttpUser):
    wait_time = constant(0)

    @task
    def complete(self):
        body = {"prompt": "Return a copy of item", "max_tokens": random.randint(8, 64),
                "temperature": 0, "ignore_eos": True}
        self.client.post("/v1/completions", json=body, name="/v1/completions")
"""


def server(checkpoint, policy: str, batch: int, *extra: str) -> ServerProcess:
    args = ["--threads", "1", "--policy", policy, "--max-batch-size", str(batch)]
    args += ["--queue-size", str(max(64, 4 * batch)), "--request-timeout", "900", *extra]
    return ServerProcess(checkpoint, args, startup_timeout=300)


def mixed_lengths(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "prompt": f"Return a copy of item {i}",
            "max_new_tokens": rng.randint(8, 64),
            "ignore_eos": True,
            "use_cache": False,
        }
        for i in range(n)
    ]


def measure(url: str, concurrency: int, requests: int, time_limit: float) -> dict:
    httpx.post(f"{url}/metrics/reset")
    r = load_test(
        url,
        mixed_lengths(requests),
        concurrency=concurrency,
        max_requests=requests,
        time_limit_s=time_limit,
        request_timeout_s=900,
    )
    m = httpx.get(f"{url}/metrics").json()
    return {
        "ok": r.ok,
        "seconds": r.seconds,
        "tokens_per_s": r.tokens_per_s,
        "ttft_p50": m["ttft_ms"]["p50"],
        "ttft_p99": m["ttft_ms"]["p99"],
        "tpot_p50": m["tpot_ms"]["p50"],
        "tpot_p99": m["tpot_ms"]["p99"],
        "occupancy": m["mean_occupancy"],
    }


def continuous_vs_static(checkpoint, args) -> dict:
    results = {}
    for c in args.concurrency:
        for policy in ("continuous", "static", "padded"):
            with server(checkpoint, policy, c) as url:
                load_test(url, mixed_lengths(4), concurrency=4, max_requests=4)  # warm-up
                row = measure(url, c, args.requests_per_client * c, args.time_limit)
            results[(policy, c)] = row
            print(
                f"{policy:10s} concurrency {c:2d}: {row['ok']:4d} requests in "
                f"{row['seconds']:6.1f} s, {row['tokens_per_s']:6.1f} tokens/s, TTFT p50/p99 "
                f"{row['ttft_p50']:7.0f}/{row['ttft_p99']:7.0f} ms, TPOT p50/p99 "
                f"{row['tpot_p50']:5.0f}/{row['tpot_p99']:5.0f} ms, mean occupancy "
                f"{row['occupancy']:.1f}",
                flush=True,
            )
        on = results[("continuous", c)]
        for base in ("padded", "static"):
            off = results[(base, c)]
            print(
                f"continuous / {base} throughput at concurrency {c}: "
                f"{on['tokens_per_s'] / off['tokens_per_s']:.2f}x; TTFT p99 "
                f"{on['ttft_p99']:.0f} ms vs {off['ttft_p99']:.0f} ms",
                flush=True,
            )
    return results


def locust_run(checkpoint, users: int, seconds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, server(checkpoint, "continuous", users) as url:
        locustfile = Path(tmp) / "locustfile.py"
        locustfile.write_text(LOCUSTFILE)
        cmd = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless"]
        cmd += ["-u", str(users), "-r", str(users), "-t", f"{seconds}s", "-H", url]
        cmd += ["--csv", f"{tmp}/run", "--only-summary", "--stop-timeout", "120"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 300)
        with open(f"{tmp}/run_stats.csv") as f:
            rows = list(csv.DictReader(f))
        total = next(r for r in rows if r["Name"] == "Aggregated")
        print(
            f"locust ({users} users, {seconds} s, /v1/completions, exit {done.returncode}): "
            f"{total['Request Count']} requests, {total['Failure Count']} failures, "
            f"{float(total['Requests/s']):.2f} req/s, median {total['Median Response Time']} ms, "
            f"p99 {total['99%']} ms",
            flush=True,
        )


def soak_bodies() -> list:
    """Valid requests on three endpoints, and the malformed bodies a careless client sends."""
    valid = [
        {"prompt": f"soak {i}", "max_new_tokens": 1 + i % 8, "use_cache": i % 2 == 0}
        for i in range(32)
    ]
    raw = [
        ("/v1/completions", json.dumps({"prompt": "soak", "max_tokens": 4}).encode()),
        ("/generate/stream", json.dumps({"prompt": "soak", "max_new_tokens": 3}).encode()),
        ("/generate", b'{"prompt": "unterminated'),
        ("/generate", b'{"prompt": "hi", "temperature": NaN}'),
        ("/generate", b'{"prompt": "\xff\xfe"}'),
        ("/generate", b'{"prompt": ""}'),
        ("/generate", b'{"prompt": "hi", "max_new_tokens": 100000}'),
        ("/generate", b"[1, 2, 3]"),
        ("/v1/completions", b'{"prompt": "hi", "n": 5}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}'),
        ("/generate", b'{"prompt": "' + b"w" * 70000 + b'"}'),
        ("/nowhere", b"{}"),
    ]
    return [*valid, *raw]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def soak(requests: int, concurrency: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_toy_checkpoint(tmp)
        process = server(checkpoint, "continuous", concurrency)
        with process as url:
            bodies = soak_bodies()
            random.Random(0).shuffle(bodies)
            load_test(url, bodies, concurrency=concurrency, max_requests=1000, time_limit_s=600)
            pid = process.proc.pid
            before = rss_kb(pid)
            start = time.perf_counter()
            r = load_test(
                url,
                bodies,
                concurrency=concurrency,
                max_requests=requests,
                time_limit_s=1800,
                request_timeout_s=600,
            )
            after = rss_kb(pid)
            alive = httpx.get(f"{url}/health").status_code == 200
        answered = sum(n for s, n in r.statuses.items() if 200 <= s < 300 or 400 <= s < 500)
        answered += r.statuses.get(503, 0)
        print(
            f"soak: {r.sent} requests at concurrency {concurrency} in "
            f"{time.perf_counter() - start:.0f} s; statuses {dict(sorted(r.statuses.items()))}; "
            f"failures (unanswered, or 5xx other than 503): {r.sent - answered}"
            f"{f' {r.client_errors}' if r.client_errors else ''}; "
            f"server alive: {alive}; "
            f"RSS {before / 1024:.0f} MiB after warm-up -> {after / 1024:.0f} MiB "
            f"({100 * (after - before) / before:+.1f}%)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--requests-per-client", type=int, default=6)  # past the start and end
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per run")
    parser.add_argument("--locust-seconds", type=int, default=30)
    parser.add_argument("--soak-requests", type=int, default=10000)
    parser.add_argument("--soak-concurrency", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        checkpoint = make_opt_125m_shaped_checkpoint(tmp)
        print(f"OPT-125m-shaped checkpoint made in {time.perf_counter() - start:.0f} s", flush=True)
        continuous_vs_static(checkpoint, args)
        locust_run(checkpoint, users=16, seconds=args.locust_seconds)
    soak(args.soak_requests, args.soak_concurrency)


if __name__ == "__main__":
    main()
