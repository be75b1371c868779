"""The JSON bodies of the HTTP API (pydantic models, which FastAPI also turns into OpenAPI docs).

Validation that needs no model happens here (types, ranges, unknown fields, empty prompt); limits
that depend on the server's settings or tokenizer (prompt length in tokens, largest
``max_new_tokens``) are checked by the app, which answers 422 with a message in both cases.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["GenerateRequest", "GenerateResponse", "ErrorResponse"]


class GenerateRequest(BaseModel):
    """One completion request: continue ``prompt`` by up to ``max_new_tokens`` tokens."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, description="Text to continue; not empty.")
    max_new_tokens: int = Field(16, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        allow_inf_nan=False,
        description="0 = greedy (deterministic); > 0 samples from softmax(logits / temperature).",
    )
    top_k: int | None = Field(
        None, ge=1, description="Sample only among the k most likely tokens (temperature > 0)."
    )
    top_p: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Sample only among the most likely tokens whose probability reaches top_p.",
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=2**63 - 1,
        description="Seed of this request's own random generator: a sampled request with a seed "
        "is reproducible (and cacheable), whatever batch it is decoded in.",
    )
    use_cache: bool = Field(True, description="Allow an answer from the result cache.")
    ignore_eos: bool = Field(
        False,
        description="Never stop at end-of-text: always generate max_new_tokens tokens "
        "(for benchmarks, as in vLLM's sampling parameters).",
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain some non-whitespace text")
        return value

    @property
    def deterministic(self) -> bool:
        """Greedy, or sampled with a seed: the same request always gives the same text."""
        return self.temperature == 0.0 or self.seed is not None

    def cache_key(self) -> tuple:
        """Everything that determines the output (``use_cache`` does not)."""
        return (
            self.prompt,
            self.max_new_tokens,
            self.temperature,
            self.top_k,
            self.top_p,
            self.seed,
            self.ignore_eos,
        )


class GenerateResponse(BaseModel):
    """A finished completion, with where its time went."""

    text: str = Field(..., description="The generated continuation (without the prompt).")
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["length", "eos", "stop"] = Field(
        ..., description="'length': max_new_tokens reached; 'eos': the model ended the text."
    )
    cached: bool = Field(..., description="Answered from the LRU cache, without the model.")
    batch_size: int = Field(
        ..., description="Most requests decoded in one step with this one (0 if cached)."
    )
    queue_ms: float = Field(..., description="Time waiting for the batcher, milliseconds.")
    latency_ms: float = Field(..., description="Arrival to answer inside the server, milliseconds.")


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer, on every endpoint: what went wrong and what to change."""

    error: str
    detail: list | None = None


# -- OpenAI-compatible bodies (only the fields this server implements; others are refused) ------


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="The id GET /v1/models lists.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1, description="Extension (as in vLLM).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the text.")
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=1, description="One choice per request.")
    user: str | None = None
    ignore_eos: bool = Field(False, description="Extension (as in vLLM): never stop at eos.")

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops


class CompletionRequest(_OpenAIRequest):
    """``POST /v1/completions``."""

    prompt: str | list[str] = Field(..., description="Text to continue (a list of one string).")
    max_tokens: int = Field(16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        prompts = [value] if isinstance(value, str) else value
        if len(prompts) != 1 or not prompts[0].strip():
            raise ValueError("send one non-empty prompt string per request")
        return prompts[0]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_OpenAIRequest):
    """``POST /v1/chat/completions`` (the prompt is made by the checkpoint's chat template)."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
