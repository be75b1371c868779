"""The serial models behave as their docstrings say (shapes, causality, reproducible init)."""

import pytest
import torch

from cai_labs.models import GPT, GPTConfig


def test_gpt_is_causal_and_reproducible():
    cfg = GPTConfig()
    a, b = GPT(cfg, seed=1), GPT(cfg, seed=1)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    out = a(idx)
    assert out.shape == (2, cfg.seq_len, cfg.vocab_size)
    assert torch.equal(out, b(idx))
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % cfg.vocab_size
    # Changing the last token must not change any earlier position's logits.
    assert torch.allclose(a(changed)[:, :-1], out[:, :-1])


def test_gpt_config_rejects_bad_heads():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        GPTConfig(d_model=30, n_heads=4)
