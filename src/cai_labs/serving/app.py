"""The HTTP service: a FastAPI app around one :class:`~cai_labs.serving.service.Service`.

Endpoints (interactive OpenAPI docs at ``/docs``, the schema at ``/openapi.json``):

* ``POST /generate`` — JSON in (:class:`~cai_labs.serving.schemas.GenerateRequest`), JSON out
  (:class:`~cai_labs.serving.schemas.GenerateResponse`).
* ``POST /generate/stream`` — same body; answers with server-sent events, one ``token`` event per
  new token as it is decoded (its id and the text it adds; ``""`` while a multi-byte character
  is incomplete), then one ``done`` event carrying the full response.
* ``POST /v1/completions``, ``POST /v1/chat/completions`` (the checkpoint's chat template),
  ``GET /v1/models`` — the OpenAI API, streamed (``data: {...}`` chunks, ``data: [DONE]``) or not.
* ``GET /health`` — liveness, the checkpoint and the settings in force.
* ``GET /metrics`` — counters, batch occupancy, queue depth, cache hits, latency, TTFT, TPOT;
  ``GET /metrics/prometheus`` — the same in Prometheus' text format.
* ``POST /metrics/reset`` and ``POST /cache/clear`` — between load-test phases.

Every error, on every path, has the body ``{"error": "<what to change>"}``: malformed JSON or
a body that is not UTF-8 (400), an unknown path or model (404), a body that is too large (413),
wrong types / ranges / NaN or infinity / unknown fields / empty prompt / prompt too long in
characters or tokens / ``max_new_tokens`` over the limit (422).
A full queue answers 503 with ``Retry-After``; a request not answered in time 504. None of these
stops the server: the handlers turn them into answers, and a failing batch fails its requests only.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Protocol

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from cai_labs.serving.config import ServeConfig
from cai_labs.serving.engine import Completion, GenerationEngine
from cai_labs.serving.openai_api import OpenAIFormat, chat_ask, completion_ask
from cai_labs.serving.schemas import (
    ChatRequest,
    CompletionRequest,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
)
from cai_labs.serving.service import Ask, Run, Service, ServiceError

__all__ = ["create_app"]

ERRORS = {
    400: {"model": ErrorResponse, "description": "Malformed JSON, or not UTF-8"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    422: {"model": ErrorResponse, "description": "Invalid parameters or prompt too long"},
    503: {"model": ErrorResponse, "description": "Request queue full: retry later"},
    504: {"model": ErrorResponse, "description": "Not answered within the request timeout"},
}
SSE = {200: {"content": {"text/event-stream": {}}}, **ERRORS}
router = APIRouter()


def _service(request: Request) -> Service:
    return request.app.state.service


def _error(
    service: Service,
    status: int,
    message: str,
    headers: Mapping[str, str] | None = None,
    detail: list[dict] | None = None,
) -> JSONResponse:
    service.metrics.record(ServiceError(status, message).outcome)
    body = {"error": message} if detail is None else {"error": message, "detail": detail}
    return JSONResponse(body, status_code=status, headers=headers)


class _BodyLimit:
    """ASGI middleware refusing bodies whose Content-Length exceeds ``limit`` bytes (413),
    before anything parses them. The body is read and dropped first (up to ``DRAIN`` times the
    limit), so that the client, still sending, gets the answer instead of a reset connection."""

    DRAIN = 64

    def __init__(self, app: ASGIApp, limit: int, service: Service) -> None:
        self.app, self.limit, self.service = app, limit, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.limit:
                await self._drain(receive)
                message = (
                    f"request body is {int(length)} bytes; the limit is {self.limit} bytes: "
                    "send a shorter prompt"
                )
                await _error(self.service, 413, message)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _drain(self, receive: Receive) -> None:
        seen = 0
        while seen <= self.DRAIN * self.limit:
            message = await receive()
            seen += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                return


def _describe(errors: list[dict]) -> str:
    parts = []
    for err in errors:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
        for e in exc.errors()
    ]
    if any(e["type"] == "json_invalid" for e in errors):
        message = (
            "malformed JSON body: send a JSON object such as "
            '{"prompt": "Hello", "max_new_tokens": 16}'
        )
        return _error(_service(request), 400, message, detail=errors)
    return _error(_service(request), 422, f"invalid request: {_describe(errors)}", detail=errors)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = {
        400: "the request body could not be read: send UTF-8 encoded JSON",
        404: f"no such path: {request.url.path}; the endpoints are listed at /docs",
        405: f"{request.method} is not allowed on {request.url.path}; see /docs",
    }.get(exc.status_code, str(exc.detail))
    return _error(_service(request), exc.status_code, message, headers=exc.headers)


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return _error(_service(request), exc.status, exc.message, headers=exc.headers)


# -- streaming: one generator for every streamed endpoint -----------------------------------------


class _Events(Protocol):
    """The text of a stream's events: before the first token, per token, at the end, on error."""

    def start(self) -> str: ...

    def token(self, token_id: int, delta: str) -> str: ...

    def end(self, result: Completion, run: Run, rest: str) -> str: ...

    def error(self, message: str) -> str: ...


class _NativeEvents:
    """``/generate/stream``: ``token`` events, then ``done`` with the full response."""

    def __init__(self, ask: Ask) -> None:
        self.ask = ask

    def start(self) -> str:
        return ""

    def token(self, token_id: int, delta: str) -> str:
        return f"event: token\ndata: {json.dumps({'token_id': token_id, 'text': delta})}\n\n"

    def end(self, result: Completion, run: Run, rest: str) -> str:
        return f"event: done\ndata: {_generate_response(result, run).model_dump_json()}\n\n"

    def error(self, message: str) -> str:
        return f"event: error\ndata: {json.dumps({'error': message})}\n\n"


class _OpenAIEvents:
    """OpenAI chunks: one per token with text, a last one with the finish reason, [DONE]."""

    def __init__(self, fmt: OpenAIFormat) -> None:
        self.fmt = fmt

    def start(self) -> str:
        return self.fmt.chunk("", first=True) if self.fmt.kind == "chat" else ""

    def token(self, token_id: int, delta: str) -> str:
        return self.fmt.chunk(delta) if delta else ""

    def end(self, result: Completion, run: Run, rest: str) -> str:
        last = self.fmt.chunk(rest, self.fmt.reason(result))
        return last + self.fmt.done()

    def error(self, message: str) -> str:
        return self.fmt.error(message) + self.fmt.done()


def _stream(service: Service, ask: Ask, events: _Events) -> StreamingResponse:
    run = service.start(ask, stream=True)  # ServiceError here: a JSON error, not a stream

    async def body() -> AsyncIterator[str]:
        sent = ""
        yield events.start()
        try:
            async for token_id, delta in run.events():
                sent += delta
                yield events.token(token_id, delta)
            result = await run.result()
        except ServiceError as exc:
            service.metrics.record(exc.outcome)
            yield events.error(exc.message)
            return
        service.finished(run)
        yield events.end(result, run, result.text[len(sent) :])

    headers = {"Cache-Control": "no-cache"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


# -- routes ---------------------------------------------------------------------------------------


def _ask(req: GenerateRequest) -> Ask:
    return Ask(
        req.prompt, req.max_new_tokens, req.temperature, req.top_k, req.top_p, req.seed,
        ignore_eos=req.ignore_eos, use_cache=req.use_cache,
    )  # fmt: skip


def _generate_response(result: Completion, run: Run) -> GenerateResponse:
    cached = run.cached is not None
    return GenerateResponse(
        text=result.text,
        prompt_tokens=len(run.ids),
        completion_tokens=len(result.token_ids),
        finish_reason=result.finish_reason,
        cached=cached,
        batch_size=0 if cached else result.batch_size,
        queue_ms=1e3 * run.queue_s,
        latency_ms=1e3 * (time.perf_counter() - run.arrived),
    )


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS,
             summary="Generate a continuation of the prompt")  # fmt: skip
async def generate(req: GenerateRequest, request: Request) -> GenerateResponse:
    result, run = await _service(request).complete(_ask(req))
    return _generate_response(result, run)


@router.post("/generate/stream", responses=SSE, summary="Generate, streaming server-sent events")
async def generate_stream(req: GenerateRequest, request: Request) -> StreamingResponse:
    ask = _ask(req)
    return _stream(_service(request), ask, _NativeEvents(ask))


async def _openai(service: Service, ask: Ask, kind: str, stream: bool) -> StreamingResponse | dict:
    fmt = OpenAIFormat(kind, service.config.model_name)
    if stream:
        return _stream(service, ask, _OpenAIEvents(fmt))
    result, run = await service.complete(ask)
    return fmt.response(result, len(run.ids))


@router.post("/v1/completions", response_model=None, responses=SSE,
             summary="OpenAI-compatible text completion")  # fmt: skip
async def completions(req: CompletionRequest, request: Request) -> StreamingResponse | dict:
    service = _service(request)
    return await _openai(service, completion_ask(service, req), "text", req.stream)


@router.post("/v1/chat/completions", response_model=None, responses=SSE,
             summary="OpenAI-compatible chat completion")  # fmt: skip
async def chat_completions(req: ChatRequest, request: Request) -> StreamingResponse | dict:
    service = _service(request)
    return await _openai(service, chat_ask(service, req), "chat", req.stream)


@router.get("/v1/models", summary="The served model (OpenAI-compatible)")
async def models(request: Request) -> dict:
    name = _service(request).config.model_name
    card = {"id": name, "object": "model", "created": 0, "owned_by": "cai-labs"}
    return {"object": "list", "data": [card]}


@router.get("/health", summary="Liveness and settings")
async def health(request: Request) -> dict:
    return _service(request).health()


@router.get("/metrics", summary="Counters, occupancy, queue, cache, latency, TTFT, TPOT")
async def get_metrics(request: Request) -> dict:
    return _service(request).snapshot()


@router.get("/metrics/prometheus", summary="The metrics in Prometheus text format")
async def prometheus(request: Request) -> Response:
    text = _service(request).prometheus()
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.post("/metrics/reset", summary="Zero the counters (the cache keeps its entries)")
async def reset_metrics(request: Request) -> dict:
    _service(request).reset_metrics()
    return {"status": "reset"}


@router.post("/cache/clear", summary="Empty the result cache")
async def clear_cache(request: Request) -> dict:
    _service(request).cache.clear()
    return {"status": "cleared"}


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
    service = Service(engine, config, name=Path(checkpoint).name if checkpoint else "model")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start_batcher()
        yield
        await service.stop_batcher()

    app = FastAPI(
        title="cai-labs OPT text generation",
        description="Continuous batching, a bounded queue and an LRU result cache in front of a "
        "transformers causal LM loaded with from_pretrained; an OpenAI-compatible API.",
        version="0.2.0",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(_BodyLimit, limit=service.config.max_body_bytes, service=service)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ServiceError, _service_error)
    app.include_router(router)
    return app
