"""The HTTP service: a FastAPI app factory around the engine, the batcher and the cache.

Endpoints (interactive OpenAPI docs at ``/docs``, the schema at ``/openapi.json``):

* ``POST /generate`` — JSON in (:class:`~cai_labs.serving.schemas.GenerateRequest`), JSON out
  (:class:`~cai_labs.serving.schemas.GenerateResponse`).
* ``POST /generate/stream`` — same body; answers with server-sent events, one ``token`` event per
  new token as it is decoded (its id and the text it adds; ``""`` while a multi-byte character
  is incomplete), then one ``done`` event carrying the full response.
* ``GET /health`` — liveness, the checkpoint and the settings in force.
* ``GET /metrics`` — counters, observed batch sizes, queue depth, cache hits, latency.
* ``POST /metrics/reset`` and ``POST /cache/clear`` — between load-test phases.

Every way a request can be wrong gets a 4xx answer with ``{"error": "<what to change>"}``:
malformed JSON (400), a body that is too large (413), wrong types / ranges / unknown fields /
empty prompt / prompt too long in characters or tokens / ``max_new_tokens`` over the limit (422).
A full queue answers 503 with ``Retry-After``; a request not answered in time 504. None of these
stops the server: the handlers turn them into answers, and a failing batch fails its requests only.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from cai_labs.serving.batcher import DynamicBatcher, QueueFull
from cai_labs.serving.cache import LRUCache
from cai_labs.serving.config import ServeConfig
from cai_labs.serving.engine import Completion, GenerationEngine, GenerationJob
from cai_labs.serving.metrics import ServerMetrics
from cai_labs.serving.schemas import ErrorResponse, GenerateRequest, GenerateResponse

__all__ = ["create_app", "BadRequest"]

ERRORS = {
    400: {"model": ErrorResponse, "description": "Malformed JSON"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    422: {"model": ErrorResponse, "description": "Invalid parameters or prompt too long"},
    503: {"model": ErrorResponse, "description": "Request queue full: retry later"},
    504: {"model": ErrorResponse, "description": "Not answered within the request timeout"},
}


class BadRequest(Exception):
    """A request the server understood but cannot serve as asked (answered with 422)."""


class _BodyLimit:
    """ASGI middleware refusing bodies whose Content-Length exceeds ``limit`` bytes (413),
    before anything reads or parses them."""

    def __init__(self, app, limit: int, metrics: ServerMetrics) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.limit:
                response = JSONResponse(
                    {
                        "error": f"request body is {int(length)} bytes; the limit is "
                        f"{self.limit} bytes: send a shorter prompt"
                    },
                    status_code=413,
                )
                self.metrics.record("bad_request")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _describe(errors: list[dict]) -> str:
    parts = []
    for err in errors:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def create_app(
    checkpoint: str | Path | None = None,
    config: ServeConfig | None = None,
    engine: GenerationEngine | None = None,
) -> FastAPI:
    """Build the service for a ``save_pretrained`` checkpoint directory (or a ready ``engine``).

    The model is loaded here, before the server starts listening; the batching task starts with
    the server (ASGI lifespan) and is stopped with it.
    """
    config = config or ServeConfig()
    if engine is None:
        if checkpoint is None:
            raise ValueError("create_app needs a checkpoint directory or an engine")
        engine = GenerationEngine.from_pretrained(checkpoint, torch_threads=config.torch_threads)
    metrics = ServerMetrics()
    cache = LRUCache(config.cache_size)
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = DynamicBatcher(
            engine, config.max_batch_size, config.max_wait_ms, config.queue_size, metrics
        )
        batcher.start()
        state["batcher"] = batcher
        yield
        await batcher.stop()

    app = FastAPI(
        title="cai-labs OPT text generation",
        description="Dynamic batching, a bounded queue and an LRU result cache in front of a "
        "transformers causal LM loaded with from_pretrained.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes, metrics=metrics)
    app.state.engine, app.state.config, app.state.metrics, app.state.cache = (
        engine,
        config,
        metrics,
        cache,
    )

    def error(status: int, message: str, headers: dict | None = None, detail=None):
        metrics.record(
            "bad_request"
            if 400 <= status < 500
            else {503: "rejected_queue_full", 504: "timeout"}.get(status, "error")
        )
        body = {"error": message} if detail is None else {"error": message, "detail": detail}
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
            for e in exc.errors()
        ]
        if any(e["type"] == "json_invalid" for e in errors):
            return error(
                400,
                "malformed JSON body: send a JSON object such as "
                '{"prompt": "Hello", "max_new_tokens": 16}',
                detail=errors,
            )
        return error(422, f"invalid request: {_describe(errors)}", detail=errors)

    def prepare(req: GenerateRequest) -> list[int]:
        if len(req.prompt) > config.max_prompt_chars:
            raise BadRequest(
                f"prompt is {len(req.prompt)} characters; the limit is "
                f"{config.max_prompt_chars}: shorten it"
            )
        if req.max_new_tokens > config.max_new_tokens_limit:
            raise BadRequest(
                f"max_new_tokens={req.max_new_tokens} is over this server's limit "
                f"of {config.max_new_tokens_limit}: ask for fewer tokens"
            )
        ids = engine.encode(req.prompt)
        if len(ids) > config.max_prompt_tokens:
            raise BadRequest(
                f"prompt is {len(ids)} tokens; the limit is {config.max_prompt_tokens}: shorten it"
            )
        if len(ids) + req.max_new_tokens > engine.max_positions:
            raise BadRequest(
                f"prompt ({len(ids)} tokens) + max_new_tokens "
                f"({req.max_new_tokens}) exceeds the model's "
                f"{engine.max_positions} positions: ask for fewer tokens"
            )
        return ids

    def job_for(req: GenerateRequest, ids: list[int], on_token=None) -> GenerationJob:
        return GenerationJob(
            ids, req.max_new_tokens, req.temperature, req.top_k, req.seed, on_token, req.ignore_eos
        )

    def response(
        result: Completion, n_prompt: int, cached: bool, arrived: float, queue_s: float
    ) -> GenerateResponse:
        return GenerateResponse(
            text=result.text,
            prompt_tokens=n_prompt,
            completion_tokens=len(result.token_ids),
            finish_reason=result.finish_reason,
            cached=cached,
            batch_size=0 if cached else result.batch_size,
            queue_ms=1e3 * queue_s,
            latency_ms=1e3 * (time.perf_counter() - arrived),
        )

    @app.get("/health", summary="Liveness and settings")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": type(engine.model).__name__,
            "parameters": sum(p.numel() for p in engine.model.parameters()),
            "max_positions": engine.max_positions,
            "config": config.as_dict(),
        }

    @app.get("/metrics", summary="Counters, batch sizes, queue depth, cache, latency")
    async def get_metrics() -> dict:
        batcher: DynamicBatcher = state["batcher"]
        snap = metrics.snapshot(batcher.queue.qsize(), batcher.in_flight)
        lookups = cache.hits + cache.misses
        snap["cache"] = {
            "hits": cache.hits,
            "misses": cache.misses,
            "entries": len(cache),
            "capacity": cache.capacity,
            "hit_rate": cache.hits / lookups if lookups else None,
        }
        return snap

    @app.post("/metrics/reset", summary="Zero the counters (the cache keeps its entries)")
    async def reset_metrics() -> dict:
        metrics.reset()
        cache.hits = cache.misses = 0
        return {"status": "reset"}

    @app.post("/cache/clear", summary="Empty the result cache")
    async def clear_cache() -> dict:
        cache.clear()
        return {"status": "cleared"}

    @app.post(
        "/generate",
        response_model=GenerateResponse,
        responses=ERRORS,
        summary="Generate a continuation of the prompt",
    )
    async def generate(req: GenerateRequest):
        arrived = time.perf_counter()
        try:
            ids = prepare(req)
        except BadRequest as exc:
            return error(422, str(exc))
        cacheable = config.cache_size > 0 and req.deterministic and req.use_cache
        if cacheable:
            hit = cache.get(req.cache_key())
            if hit is not None:
                out = response(hit, len(ids), True, arrived, 0.0)
                metrics.record("cached", time.perf_counter() - arrived)
                return out
        try:
            pending = state["batcher"].submit(job_for(req, ids))
        except QueueFull as exc:
            return error(503, str(exc), headers={"Retry-After": "1"})
        try:
            result = await asyncio.wait_for(
                asyncio.shield(pending.future), config.request_timeout_s
            )
        except asyncio.TimeoutError:  # (an alias of TimeoutError from Python 3.11)
            return error(
                504,
                f"not answered within {config.request_timeout_s} s; the server "
                "is overloaded: retry later or ask for fewer tokens",
            )
        except Exception as exc:
            return error(500, f"generation failed: {type(exc).__name__}: {exc}")
        if cacheable:
            cache.put(req.cache_key(), result)
        out = response(result, len(ids), False, arrived, pending.dequeued - pending.arrived)
        metrics.record("ok", time.perf_counter() - arrived)
        return out

    @app.post(
        "/generate/stream",
        responses={200: {"content": {"text/event-stream": {}}}, **ERRORS},
        summary="Generate, streaming tokens as server-sent events",
    )
    async def generate_stream(req: GenerateRequest):
        arrived = time.perf_counter()
        try:
            ids = prepare(req)
        except BadRequest as exc:
            return error(422, str(exc))
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()

        def on_token(token_id: int, text: str) -> None:  # called in the decoding thread
            loop.call_soon_threadsafe(tokens.put_nowait, (token_id, text))

        try:
            pending = state["batcher"].submit(job_for(req, ids, on_token))
        except QueueFull as exc:
            return error(503, str(exc), headers={"Retry-After": "1"})
        # Token callbacks are scheduled before the batch's completion, so None arrives last.
        pending.future.add_done_callback(lambda _: tokens.put_nowait(None))

        async def events():
            sent = ""
            deadline = arrived + config.request_timeout_s
            while True:
                try:
                    item = await asyncio.wait_for(
                        tokens.get(), max(0.0, deadline - time.perf_counter())
                    )
                except asyncio.TimeoutError:  # (an alias of TimeoutError from Python 3.11)
                    metrics.record("timeout")
                    yield f"event: error\ndata: {json.dumps({'error': 'timed out'})}\n\n"
                    return
                if item is None:
                    break
                token_id, text = item
                delta = ""
                if not text.endswith("\ufffd"):  # else: half a character, send it with the rest
                    delta, sent = text[len(sent) :], text
                yield f"event: token\ndata: {json.dumps({'token_id': token_id, 'text': delta})}\n\n"
            exc = pending.future.exception()
            if exc is not None:
                metrics.record("error")
                yield f"event: error\ndata: {json.dumps({'error': str(exc)})}\n\n"
                return
            out = response(
                pending.future.result(),
                len(ids),
                False,
                arrived,
                pending.dequeued - pending.arrived,
            )
            metrics.record("ok", time.perf_counter() - arrived)
            yield f"event: done\ndata: {out.model_dump_json()}\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    return app
