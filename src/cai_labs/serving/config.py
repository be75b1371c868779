"""The knobs of the service, in one frozen dataclass that the app, the CLI and the pages share.

A decoding step over a batch of ``b`` requests costs little more than a step over one on
hardware with parallel lanes (and, on a CPU, pays Python's per-step overhead once instead of
``b`` times), so the server decodes up to ``max_batch_size`` requests together; the queue in
front is bounded (``queue_size``: 503 at once when full). Prompt and generation limits default
to what the checkpoint's ``max_position_embeddings`` allows (:meth:`ServeConfig.for_checkpoint`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

#: Batching policies of the scheduler (:mod:`~cai_labs.serving.scheduler`).
POLICIES = ("continuous", "static", "padded")

__all__ = ["ServeConfig"]


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one server.

    Args:
        max_batch_size: most requests in the running batch; ``1`` = one request at a time.
        max_wait_ms: how long an idle server waits, after a first request arrives, for more to
            join the first batch. ``0`` takes only what is already queued.
        queue_size: most requests waiting for admission; one more is rejected with 503.
        cache_size: entries of the LRU cache of finished deterministic requests; ``0`` = off.
        policy: ``"continuous"`` (requests join and leave at every step), ``"static"`` (a
            batch runs until its longest request ends) or ``"padded"`` (static, with finished
            rows still computed, as one ``generate`` call per batch).
        max_batch_tokens: most tokens one scheduler iteration feeds the model.
        prefill_chunk: longer prompts are prefilled in chunks of this many tokens.
        max_prompt_tokens: longest accepted prompt in tokens; ``None``: the checkpoint's
            ``max_position_embeddings`` minus ``max_new_tokens_limit``.
        max_prompt_chars: longest prompt in characters (checked before tokenizing); ``None``:
            16 per allowed token.
        max_new_tokens_limit: largest ``max_new_tokens`` a request may ask for; ``None``: a
            quarter of the checkpoint's positions.
        request_timeout_s: a request not answered by then gets 504 (its row is then freed).
        max_body_bytes: larger request bodies are refused with 413 before being parsed.
        torch_threads: ``torch.set_num_threads`` for the model, ``None`` leaves torch's default.
        model_name: the id ``/v1/models`` lists; ``None``: the checkpoint directory's name.
        keep_alive_s: seconds an idle connection stays open (uvicorn's ``timeout_keep_alive``).
            It must exceed the idle time after which clients stop reusing a pooled connection
            (httpx 5 s, aiohttp 15 s): with uvicorn's default of 5 s against httpx's 5 s, a
            client reuses a connection just as the server closes it, and its request is reset.
    """

    max_batch_size: int = 16
    max_wait_ms: float = 10.0
    queue_size: int = 64
    cache_size: int = 256
    policy: str = "continuous"
    max_batch_tokens: int = 2048
    prefill_chunk: int = 256
    max_prompt_tokens: int | None = None
    max_prompt_chars: int | None = None
    max_new_tokens_limit: int | None = None
    request_timeout_s: float = 60.0
    max_body_bytes: int = 65536
    torch_threads: int | None = None
    model_name: str | None = None
    keep_alive_s: float = 30.0

    def __post_init__(self) -> None:
        def positive_or_none(x: float | None) -> bool:
            return x is None or x >= 1

        checks = {
            "max_batch_size": self.max_batch_size >= 1,
            "max_wait_ms": self.max_wait_ms >= 0,
            "queue_size": self.queue_size >= 1,
            "cache_size": self.cache_size >= 0,
            "policy": self.policy in POLICIES,
            "max_batch_tokens": self.max_batch_tokens >= 1,
            "prefill_chunk": 1 <= self.prefill_chunk <= self.max_batch_tokens,
            "max_prompt_tokens": positive_or_none(self.max_prompt_tokens),
            "max_prompt_chars": positive_or_none(self.max_prompt_chars),
            "max_new_tokens_limit": positive_or_none(self.max_new_tokens_limit),
            "request_timeout_s": self.request_timeout_s > 0,
            "max_body_bytes": self.max_body_bytes >= 256,
            "torch_threads": positive_or_none(self.torch_threads),
            "keep_alive_s": self.keep_alive_s > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(
                f"invalid ServeConfig: {values}; sizes and limits must be positive "
                "(max_wait_ms and cache_size may be 0, max_body_bytes >= 256, prefill_chunk "
                f"<= max_batch_tokens, policy one of {POLICIES})"
            )

    def for_checkpoint(self, max_positions: int, name: str) -> ServeConfig:
        """These settings with every ``None`` limit derived from the checkpoint's positions."""
        new = self.max_new_tokens_limit or max(1, max_positions // 4)
        prompt = self.max_prompt_tokens or max(1, max_positions - new)
        return replace(
            self,
            max_new_tokens_limit=new,
            max_prompt_tokens=prompt,
            max_prompt_chars=self.max_prompt_chars or 16 * prompt,
            model_name=self.model_name or name,
        )

    @property
    def batching(self) -> bool:
        """Whether batching is on (``max_batch_size > 1``)."""
        return self.max_batch_size > 1

    def as_dict(self) -> dict:
        """Plain dict, for ``/health`` and for printing next to measurements."""
        return asdict(self)
