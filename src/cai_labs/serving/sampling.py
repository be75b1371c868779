"""Per-request token choice: greedy, or sampled with temperature, top-k, top-p and a seed.

Each request owns one :class:`TokenSampler` (and so its own ``torch.Generator``): a seeded
request draws the same tokens whichever batch, step or neighbours it is decoded with.
"""

from __future__ import annotations

import torch

__all__ = ["TokenSampler"]


class TokenSampler:
    """Choose the next token of one request from its logits row ``(V,)``.

    Args:
        temperature: 0 = greedy (argmax); > 0 samples from ``softmax(logits / temperature)``.
        top_k: keep only the ``k`` most likely tokens before sampling.
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``.
        seed: seed of this request's generator; ``None`` draws fresh randomness.
        banned: a token id never chosen (end-of-text when the request ignores it).
    """

    def __init__(
        self,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        banned: int | None = None,
    ) -> None:
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.banned = banned
        self.generator: torch.Generator | None = None
        if temperature > 0:
            self.generator = torch.Generator()
            if seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(seed)

    def __call__(self, row: torch.Tensor) -> int:
        if self.banned is not None:
            row = row.clone()
            row[self.banned] = float("-inf")
        if self.temperature == 0:
            return int(row.argmax())
        logits = row.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.numel():
            kth = torch.topk(logits, self.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p is not None and self.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            before = sorted_p.cumsum(0) - sorted_p  # mass of the more likely tokens
            sorted_p = sorted_p.masked_fill(before >= self.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))
