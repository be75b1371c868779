"""OpenAI-compatible bodies: requests to :class:`~cai_labs.serving.service.Ask`, completions to
the ``text_completion`` / ``chat.completion`` objects and their streamed chunks.

Only what the server implements is accepted (one choice, no logprobs or penalties); finish
reasons follow OpenAI: ``"stop"`` for end-of-text or a stop string, ``"length"`` otherwise.
"""

from __future__ import annotations

import json
import time
import uuid

from cai_labs.serving.engine import Completion
from cai_labs.serving.schemas import ChatRequest, CompletionRequest
from cai_labs.serving.service import Ask, Service, ServiceError

__all__ = ["completion_ask", "chat_ask", "OpenAIFormat"]


def _sampling(req: CompletionRequest | ChatRequest) -> dict:
    return dict(
        temperature=req.temperature,
        top_k=req.top_k,
        top_p=req.top_p if req.top_p < 1.0 else None,
        seed=req.seed,
        stop=tuple(req.stop or ()),
        ignore_eos=req.ignore_eos,
    )


def _check_model(service: Service, name: str | None) -> None:
    served = service.config.model_name
    if name is not None and name != served:
        raise ServiceError(404, f"model {name!r} is not served here; this server serves {served!r}")


def completion_ask(service: Service, req: CompletionRequest) -> Ask:
    _check_model(service, req.model)
    return Ask(req.prompt, req.max_tokens, **_sampling(req))


def chat_ask(service: Service, req: ChatRequest) -> Ask:
    """The prompt made by the checkpoint's chat template (400 when it has none)."""
    _check_model(service, req.model)
    tokenizer = service.engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ServiceError(
            400,
            "this checkpoint's tokenizer has no chat template, so chat messages cannot be "
            "turned into a prompt: use POST /v1/completions with a prompt, or serve a "
            "checkpoint whose tokenizer was saved with a chat_template",
        )
    messages = [m.model_dump() for m in req.messages]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return Ask(prompt, req.max_completion_tokens or req.max_tokens, **_sampling(req))


class OpenAIFormat:
    """Response objects of one request, for ``kind`` ``"text_completion"`` or ``"chat"``."""

    def __init__(self, kind: str, model: str) -> None:
        self.kind, self.model = kind, model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _object(self, obj: str, choices: list, usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        out["choices"] = choices
        if usage is not None:
            out["usage"] = usage
        return out

    @staticmethod
    def reason(result: Completion) -> str:
        return "length" if result.finish_reason == "length" else "stop"

    def _choice(
        self, text: str | None, reason: str | None, chunk: bool, first: bool = False
    ) -> dict:
        if self.kind != "chat":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        if not chunk:
            message = {"role": "assistant", "content": text}
            return {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        delta = {"role": "assistant", "content": text or ""} if first else {}
        if text and not first:
            delta = {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}

    def response(self, result: Completion, n_prompt: int) -> dict:
        """The whole answer."""
        n = len(result.token_ids)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
        choice = self._choice(result.text, self.reason(result), chunk=False)
        return self._object("chat.completion" if self.kind == "chat" else "text_completion",
                            [choice], usage)  # fmt: skip

    def chunk(self, text: str | None, reason: str | None = None, first: bool = False) -> str:
        """One server-sent event ``data: {...}``."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = self._object(obj, [self._choice(text, reason, chunk=True, first=first)])
        return f"data: {json.dumps(body)}\n\n"

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"

    @staticmethod
    def error(message: str) -> str:
        return f"data: {json.dumps({'error': message})}\n\n"
