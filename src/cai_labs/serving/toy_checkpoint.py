"""A tiny, untrained OPT checkpoint made offline in a second, for tests and quick demos.

The service loads any ``save_pretrained`` directory; the tutorials serve the fine-tuned OPT of
the fine-tuning recipe. Tests only need *a* real ``OPTForCausalLM`` and a real tokenizer
saved and reloaded the way a downloaded checkpoint would be, and they need it fast: a byte-level
BPE tokenizer trained with ``tokenizers`` on Python standard-library docstrings (offline text),
wrapped as a transformers ``PreTrainedTokenizerFast``, and a randomly initialised OPT built from
an ``OPTConfig``. Its text is gibberish; its shapes, padding and decoding are the real thing.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is imported when a tokenizer or checkpoint is built
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "stdlib_text",
    "train_toy_tokenizer",
    "make_toy_checkpoint",
    "OPT_125M_SHAPE",
    "make_opt_125m_shaped_checkpoint",
]

# facebook/opt-125m's config.json (hidden size, layers, heads, MLP width, positions); the
# vocabulary is the toy tokenizer's.
OPT_125M_SHAPE = dict(hidden=768, layers=12, heads=12, ffn=3072, max_positions=2048)


def stdlib_text(max_docs: int = 400) -> list[str]:
    """Docstrings of standard-library modules and their members: offline English-ish text."""
    import collections
    import functools
    import itertools
    import json
    import os
    import pathlib
    import string

    docs: list[str] = []
    for module in (
        str,
        list,
        dict,
        os.path,
        pathlib,
        json,
        collections,
        functools,
        itertools,
        string,
    ):
        for name in dir(module):
            doc = inspect.getdoc(getattr(module, name, None))
            if doc and len(docs) < max_docs:
                docs.append(doc)
    return docs


def train_toy_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer as a ``PreTrainedTokenizerFast`` (pad ``<pad>``, end ``</s>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_text(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="</s>",
        unk_token="<unk>",
    )


def make_toy_checkpoint(
    path: str | Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    ffn: int = 256,
    vocab_size: int = 512,
    max_positions: int = 256,
    seed: int = 0,
    init_std: float = 0.02,
    chat_template: str | None = None,
) -> Path:
    """Save a random ``OPTForCausalLM`` and its tokenizer to ``path``; return the path.

    ``init_std`` is the weights' initial spread (larger: less uniform, more varied text);
    ``chat_template`` (Jinja, as in transformers) is saved with the tokenizer if given.

    Load it back with :meth:`cai_labs.serving.GenerationEngine.from_pretrained` or
    ``OPTForCausalLM.from_pretrained(path)``.
    """
    import torch
    import transformers
    from transformers import OPTConfig, OPTForCausalLM

    transformers.utils.logging.disable_progress_bar()
    tokenizer = train_toy_tokenizer(vocab_size)
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        ffn_dim=ffn,
        num_attention_heads=heads,
        max_position_embeddings=max_positions,
        word_embed_proj_dim=hidden,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        init_std=init_std,
    )
    torch.manual_seed(seed)
    model = OPTForCausalLM(config).eval()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    return path


def make_opt_125m_shaped_checkpoint(
    path: str | Path, vocab_size: int = 4096, seed: int = 0
) -> Path:
    """A random OPT with facebook/opt-125m's shape (about 90M parameters with this
    vocabulary), for benchmarks: real per-token compute and KV-cache sizes, gibberish text."""
    return make_toy_checkpoint(path, vocab_size=vocab_size, seed=seed, **OPT_125M_SHAPE)
