"""The HTTP service: answers, batches concurrent requests, rejects bad input and survives,
rejects a burst when its queue is full; the engine's batched decoding equals one-by-one decoding.

Every server here is a real uvicorn on a free 127.0.0.1 port, started in a thread (or a child
process for the command line) and always stopped by its context manager.
"""

from __future__ import annotations

import asyncio
import http.client
import time
from urllib.parse import urlsplit

import httpx
import pytest

from cai_labs.serving import (
    GenerationEngine,
    GenerationJob,
    LRUCache,
    ServeConfig,
    ServerProcess,
    ServerThread,
    create_app,
    load_test,
    make_toy_checkpoint,
)
from cai_labs.serving.loadgen import KEEPALIVE_EXPIRY_S, check_loopback, run_load

PROMPTS = ["Return a copy of the string", "hello", "Path objects are", "Split the string at"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_toy_checkpoint(tmp_path_factory.mktemp("opt_toy"))


@pytest.fixture(scope="module")
def engine(checkpoint):
    return GenerationEngine.from_pretrained(checkpoint, torch_threads=1)


def serve(engine, **settings) -> ServerThread:
    return ServerThread(create_app(engine=engine, config=ServeConfig(**settings)))


# -- engine ---------------------------------------------------------------------------------------


def test_batched_decoding_equals_one_by_one(engine):
    jobs = [GenerationJob(engine.encode(p), max_new_tokens=10) for p in PROMPTS]
    alone = [engine.generate_batch([job])[0].token_ids for job in jobs]
    together = [c.token_ids for c in engine.generate_batch(jobs)]
    assert together == alone
    # Per-request settings inside one batch: lengths, and a seeded sample is reproducible.
    mixed = engine.generate_batch(
        [
            GenerationJob(engine.encode(PROMPTS[0]), max_new_tokens=3),
            GenerationJob(engine.encode(PROMPTS[1]), max_new_tokens=7, temperature=1.0, seed=5),
            GenerationJob(
                engine.encode(PROMPTS[2]), max_new_tokens=5, temperature=0.7, top_k=4, seed=9
            ),
        ]
    )
    assert [len(c.token_ids) for c in mixed] == [3, 7, 5]
    assert all(c.finish_reason == "length" for c in mixed)
    again = engine.generate_batch(
        [GenerationJob(engine.encode(PROMPTS[1]), max_new_tokens=7, temperature=1.0, seed=5)]
    )
    assert again[0].token_ids == mixed[1].token_ids


def test_right_padding_would_be_caught(engine, monkeypatch):
    """The equality above can fail: pad on the wrong side and batched text changes."""
    jobs = [GenerationJob(engine.encode(p), max_new_tokens=10) for p in PROMPTS]
    alone = [engine.generate_batch([job])[0].token_ids for job in jobs]
    original = engine.pad_left

    def pad_right(prompts):
        ids, mask = original(prompts)
        for row, p in enumerate(prompts):  # move the pads to the end of the row
            ids[row] = ids[row].roll(-(ids.shape[1] - len(p)))
            mask[row] = mask[row].roll(-(mask.shape[1] - len(p)))
        return ids, mask

    monkeypatch.setattr(engine, "pad_left", pad_right)
    assert [c.token_ids for c in engine.generate_batch(jobs)] != alone


def test_lru_cache_and_config_validation():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)  # evicts b
    assert cache.get("b") is None and cache.get("c") == 3 and len(cache) == 2
    off = LRUCache(0)
    off.put("a", 1)
    assert off.get("a") is None
    with pytest.raises(ValueError, match="max_batch_size"):
        ServeConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="loopback"):
        check_loopback("http://10.1.2.3:8000")
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(
            run_load("http://example.com", [{"prompt": "x"}], concurrency=1, max_requests=1)
        )


# -- service --------------------------------------------------------------------------------------


def test_service_answers_streams_and_caches(engine):
    with serve(engine, max_batch_size=4, max_wait_ms=5) as url:
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["model"] == "OPTForCausalLM"
        body = {"prompt": PROMPTS[0], "max_new_tokens": 6}
        first = httpx.post(f"{url}/generate", json=body)
        assert first.status_code == 200, first.text
        out = first.json()
        assert out["completion_tokens"] == 6 and not out["cached"] and out["text"]
        second = httpx.post(f"{url}/generate", json=body).json()
        assert second["cached"] and second["text"] == out["text"]
        # A sampled request without a seed is never served from the cache.
        sampled = {**body, "temperature": 1.0}
        httpx.post(f"{url}/generate", json=sampled)
        assert not httpx.post(f"{url}/generate", json=sampled).json()["cached"]
        # Streaming: token events, then a done event with the same text as /generate.
        events = []
        with httpx.stream("POST", f"{url}/generate/stream", json=body) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = [line for line in stream.iter_lines() if line.startswith("event:")]
            assert stream.status_code == 200
        assert events == ["event: token"] * 6 + ["event: done"]
        assert "/generate" in httpx.get(f"{url}/openapi.json").json()["paths"]
        metrics = httpx.get(f"{url}/metrics").json()
        assert metrics["cache"]["hits"] == 1
        assert metrics["requests"]["ok"] == 4 and metrics["requests"]["cached"] == 1


def test_batches_concurrent_requests(engine):
    with serve(engine, max_batch_size=8, max_wait_ms=50, cache_size=0) as url:
        payloads = [{"prompt": f"{p} {i}", "max_new_tokens": 8} for i, p in enumerate(PROMPTS * 4)]
        result = load_test(url, payloads, concurrency=8, max_requests=16, time_limit_s=30)
        assert result.ok == 16, result.statuses
        metrics = httpx.get(f"{url}/metrics").json()
        assert metrics["max_batch_size_seen"] > 1, metrics["batch_sizes"]
        assert metrics["batches"] < 16


BAD_BODIES = [
    ('{"prompt": "unterminated', 400),
    ("[1, 2, 3]", 422),
    ('{"max_new_tokens": 4}', 422),
    ('{"prompt": ""}', 422),
    ('{"prompt": "   "}', 422),
    ('{"prompt": "hi", "max_new_tokens": 0}', 422),
    ('{"prompt": "hi", "max_new_tokens": "many"}', 422),
    ('{"prompt": "hi", "max_new_tokens": 100000}', 422),
    ('{"prompt": "hi", "temperature": -1}', 422),
    ('{"prompt": "hi", "top_k": 0}', 422),
    ('{"prompt": "hi", "max_tokens": 4}', 422),
    ('{"prompt": "' + "word " * 300 + '"}', 422),
    ('{"prompt": "' + "w" * 70000 + '"}', 413),
]


def test_rejects_bad_input_with_4xx_and_survives(engine):
    with serve(engine, max_prompt_tokens=32, max_new_tokens_limit=16) as url:
        for path in ("/generate", "/generate/stream"):
            for body, status in BAD_BODIES:
                r = httpx.post(
                    f"{url}{path}", content=body, headers={"content-type": "application/json"}
                )
                assert r.status_code == status, (path, body[:40], r.status_code, r.text)
                assert r.json()["error"], r.text
        good = httpx.post(f"{url}/generate", json={"prompt": "hello", "max_new_tokens": 4})
        assert good.status_code == 200 and good.json()["completion_tokens"] == 4
        metrics = httpx.get(f"{url}/metrics").json()
        assert metrics["requests"]["bad_request"] == 2 * len(BAD_BODIES)


def test_queue_full_rejection_under_burst(engine):
    with serve(engine, max_batch_size=2, max_wait_ms=0, queue_size=2, cache_size=0) as url:
        payloads = [{"prompt": f"burst {i}", "max_new_tokens": 24} for i in range(24)]
        burst = load_test(url, payloads, concurrency=24, max_requests=24, time_limit_s=60)
        assert burst.rejected > 0 and burst.ok > 0 and burst.errors == 0, burst.statuses
        r = httpx.post(f"{url}/generate", json={"prompt": "x" * 5, "max_new_tokens": 24})
        for _ in range(60):  # the server is fine afterwards (retry while the burst drains)
            if r.status_code == 200:
                break
            assert r.status_code == 503 and "queue is full" in r.json()["error"]
            assert r.headers["retry-after"] == "1"
            r = httpx.post(f"{url}/generate", json={"prompt": "x" * 5, "max_new_tokens": 24})
        assert r.status_code == 200
        metrics = httpx.get(f"{url}/metrics").json()
        assert metrics["requests"]["rejected_queue_full"] >= burst.rejected
        assert metrics["queue_depth_max"] == 2


def test_command_line_server_starts_answers_and_stops(checkpoint):
    server = ServerProcess(checkpoint, ["--threads", "1", "--max-batch-size", "4"])
    with server as url:
        assert url.startswith("http://127.0.0.1:")
        r = httpx.post(f"{url}/generate", json={"prompt": "hello", "max_new_tokens": 3})
        assert r.status_code == 200 and r.json()["completion_tokens"] == 3
    assert server.proc.poll() is not None  # stopped


def test_command_line_rejects_a_bad_checkpoint_or_setting(tmp_path):
    from cai_labs.serving.__main__ import main

    with pytest.raises(SystemExit, match="not a save_pretrained checkpoint directory"):
        main(["--checkpoint", str(tmp_path)])
    with pytest.raises(SystemExit, match="queue_size"):
        main(["--checkpoint", str(tmp_path), "--queue-size", "0"])


def test_request_timeout_answers_504_and_server_survives(engine):
    with serve(engine, request_timeout_s=0.005, max_wait_ms=20, cache_size=0) as url:
        r = httpx.post(f"{url}/generate", json={"prompt": "hello", "max_new_tokens": 32})
        assert r.status_code == 504 and "not answered within" in r.json()["error"]
        assert httpx.get(f"{url}/health").status_code == 200


# -- keep-alive: the server must not close a connection that a client may still reuse ------------


def _reuse_after_idle(url: str, idle_s: float) -> int | str:
    """Send a request, leave the connection idle ``idle_s`` seconds, then send a second one on
    the same connection: its status, or the name of the error the client got instead."""
    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
    try:
        conn.request("GET", "/health")
        conn.getresponse().read()
        sock = conn.sock
        time.sleep(idle_s)
        try:
            conn.request("GET", "/health")
            answer = conn.getresponse()
            answer.read()
        except (ConnectionError, http.client.HTTPException) as exc:
            return type(exc).__name__
        assert conn.sock is sock, "the client opened a new connection"
        return answer.status
    finally:
        conn.close()


#: How late a busy client may start its idle clock after the server sent the answer.
CLIENT_LAG_S = 1.0


def test_idle_connection_outlives_the_clients_pool_expiry(engine):
    """A pooled connection that a client reuses just before its pool expiry is still served,
    even when the client, busy, started its idle clock late. With uvicorn's default keep-alive
    (5 s, the same as httpx's expiry) the server closed such connections as clients reused
    them: the soak's rare ``httpx.ReadError`` (5 of 10,000 requests)."""
    assert ServeConfig().keep_alive_s > KEEPALIVE_EXPIRY_S + CLIENT_LAG_S
    with serve(engine) as url:
        assert _reuse_after_idle(url, KEEPALIVE_EXPIRY_S + CLIENT_LAG_S) == 200


def test_uvicorns_default_keep_alive_fails_the_reuse_check(engine):
    with serve(engine, keep_alive_s=5.0) as url:  # uvicorn's default, the soak's failure
        assert _reuse_after_idle(url, KEEPALIVE_EXPIRY_S + CLIENT_LAG_S) != 200
