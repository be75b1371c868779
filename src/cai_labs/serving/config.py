"""The knobs of the service, in one frozen dataclass that the app, the CLI and the pages share.

Why these knobs: a language-model server spends most of a request inside ``generate``, one
decoding step per new token. A step over a batch of ``b`` prompts costs little more than a step
over one on hardware with parallel lanes (and, on a CPU, it pays Python's per-step overhead once
instead of ``b`` times), so the server holds requests for at most ``max_wait_ms`` to gather up to
``max_batch_size`` of them. The queue in front of the batcher is bounded (``queue_size``): when it
is full the server says so at once (HTTP 503) instead of letting latency grow without limit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["ServeConfig"]


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one server.

    Args:
        max_batch_size: most requests decoded together by one ``generate`` call; ``1`` turns
            dynamic batching off (one request at a time, in arrival order).
        max_wait_ms: how long the batcher waits, after the first request of a batch arrives,
            for more requests to join it. ``0`` takes only what is already queued.
        queue_size: most requests waiting for the batcher; one more is rejected with 503.
        cache_size: entries of the LRU cache of finished deterministic requests; ``0`` = off.
        max_prompt_tokens: longest accepted prompt, in tokens of the model's tokenizer.
        max_prompt_chars: longest accepted prompt in characters (checked before tokenizing).
        max_new_tokens_limit: largest ``max_new_tokens`` a request may ask for.
        request_timeout_s: a request not answered by then gets 504 (the work may still run).
        max_body_bytes: larger request bodies are refused with 413 before being parsed.
        torch_threads: ``torch.set_num_threads`` for the model, ``None`` leaves torch's default.
    """

    max_batch_size: int = 16
    max_wait_ms: float = 10.0
    queue_size: int = 64
    cache_size: int = 256
    max_prompt_tokens: int = 64
    max_prompt_chars: int = 2000
    max_new_tokens_limit: int = 64
    request_timeout_s: float = 60.0
    max_body_bytes: int = 65536
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        checks = {
            "max_batch_size": self.max_batch_size >= 1,
            "max_wait_ms": self.max_wait_ms >= 0,
            "queue_size": self.queue_size >= 1,
            "cache_size": self.cache_size >= 0,
            "max_prompt_tokens": self.max_prompt_tokens >= 1,
            "max_prompt_chars": self.max_prompt_chars >= 1,
            "max_new_tokens_limit": self.max_new_tokens_limit >= 1,
            "request_timeout_s": self.request_timeout_s > 0,
            "max_body_bytes": self.max_body_bytes >= 256,
            "torch_threads": self.torch_threads is None or self.torch_threads >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(
                f"invalid ServeConfig: {values}; sizes and limits must be positive "
                "(max_wait_ms and cache_size may be 0, max_body_bytes >= 256)"
            )

    @property
    def batching(self) -> bool:
        """Whether dynamic batching is on (``max_batch_size > 1``)."""
        return self.max_batch_size > 1

    def as_dict(self) -> dict:
        """Plain dict, for ``/health`` and for printing next to measurements."""
        return asdict(self)
