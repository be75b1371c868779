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
        description="0 = greedy (deterministic); > 0 samples from softmax(logits / temperature).",
    )
    top_k: int | None = Field(
        None, ge=1, description="Sample only among the k most likely tokens (temperature > 0)."
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
            self.seed,
            self.ignore_eos,
        )


class GenerateResponse(BaseModel):
    """A finished completion, with where its time went."""

    text: str = Field(..., description="The generated continuation (without the prompt).")
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["length", "eos"] = Field(
        ..., description="'length': max_new_tokens reached; 'eos': the model ended the text."
    )
    cached: bool = Field(..., description="Answered from the LRU cache, without the model.")
    batch_size: int = Field(
        ..., description="Requests decoded together with this one (0 if cached)."
    )
    queue_ms: float = Field(..., description="Time waiting for the batcher, milliseconds.")
    latency_ms: float = Field(..., description="Arrival to answer inside the server, milliseconds.")


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer: what went wrong and what to change."""

    error: str
    detail: list | None = None
