"""A small GPT: the serial twin that every model-parallel layout is checked against.

Written with plain ``nn.Linear`` layers and explicit attention arithmetic (no fused kernels), so
that a tensor-parallel version can mirror it line by line: the parallel modes split exactly these
``Linear`` weights. Shapes use ``b`` batch, ``s`` sequence, ``d`` model width, ``h`` heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["GPTConfig", "CausalSelfAttention", "causal_attention", "MLPBlock", "Block", "GPT"]


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of the model. ``d_model`` must divide by ``n_heads``."""

    vocab_size: int = 64
    seq_len: int = 32
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    mlp_ratio: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )


class CausalSelfAttention(nn.Module):
    """``(b, s, d) -> (b, s, d)``: one fused QKV projection, causal softmax, output projection."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        mask = torch.tril(torch.ones(cfg.seq_len, cfg.seq_len, dtype=torch.bool))
        self.register_buffer("causal", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(causal_attention(self.qkv(x), self.n_heads, self.causal))


def causal_attention(qkv: torch.Tensor, n_heads: int, causal: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention of ``n_heads`` heads from a fused projection.

    ``qkv`` is ``(b, s, 3*w)``: ``[q | k | v]``, each ``w = n_heads * head_dim`` wide; returns
    ``(b, s, w)``. The serial model calls it with all heads; every tensor-parallel mode calls it
    on the heads its rank holds (heads are independent), which is why it stands alone.
    """
    b, s, _ = qkv.shape
    q, k, v = qkv.chunk(3, dim=-1)
    w = q.shape[-1]
    hd = w // n_heads
    # (b, s, w) -> (b, h, s, w/h)
    q, k, v = (t.reshape(b, s, n_heads, hd).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
    scores = scores.masked_fill(~causal[:s, :s], float("-inf"))
    out = scores.softmax(dim=-1) @ v  # (b, h, s, w/h)
    return out.transpose(1, 2).reshape(b, s, w)


class MLPBlock(nn.Module):
    """``(b, s, d) -> (b, s, d)``: ``Linear(d, r*d) -> GELU -> Linear(r*d, d)``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLPBlock(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token + position embedding, ``n_layers`` blocks, final norm, vocabulary head.

    Input token ids ``(b, s)`` int64; output logits ``(b, s, vocab_size)``.
    With ``seed`` the initial weights are reproducible: every layout starts from the same weights.
    """

    def __init__(self, cfg: GPTConfig, seed: int | None = None) -> None:
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, s = idx.shape
        if s > self.cfg.seq_len:
            raise ValueError(f"sequence of {s} tokens is longer than seq_len={self.cfg.seq_len}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(s, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
