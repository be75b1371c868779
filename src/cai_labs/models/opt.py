"""A tiny OPT, and a character tokenizer trained locally: the real Hugging Face classes, small.

The tutorials fine-tune ``transformers.OPTForCausalLM``, the class of facebook/opt-125m and its
larger siblings, built here from a small :class:`~transformers.OPTConfig` so that everything runs
offline on a CPU. The tokenizer is a character-level ``tokenizers`` model whose vocabulary is
learned from the training text, wrapped as a :class:`~transformers.PreTrainedTokenizerFast`, so
``save_pretrained`` / ``from_pretrained`` work for the model and the tokenizer alike and a reader
with real OPT weights on disk can point the same code at them.

Why characters: the fine-tuning task (:mod:`cai_labs.data.reverse_task`) works on letters; a
subword vocabulary would hide them inside merged tokens and make a tiny model's job much harder.
"""

from __future__ import annotations

from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "train_char_tokenizer", "tiny_opt_config", "tiny_opt"]

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


def train_char_tokenizer(text: str, extra_chars: str = "") -> PreTrainedTokenizerFast:
    """Learn a character vocabulary from ``text`` (+ ``extra_chars``), wrapped for transformers.

    Each character is one token; ``<pad>`` is 0, ``</s>`` (both BOS and EOS, as in OPT) is 1 and
    ``<unk>`` 2. Decoding joins the characters back without spaces.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
    tok.train_from_iterator([text, extra_chars], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=1024,
    )


def tiny_opt_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    ffn_dim: int = 256,
    max_position_embeddings: int = 128,
) -> OPTConfig:
    """An :class:`~transformers.OPTConfig` of the given sizes for ``tokenizer``'s vocabulary.

    Parameter count is about ``V d + P d + L (4 d^2 + 2 d f)`` for vocabulary ``V``, positions
    ``P``, width ``d``, ``L`` layers and feed-forward width ``f``; the input embedding and the
    language-model head share one matrix, as in OPT.
    """
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
            f"({num_attention_heads})"
        )
    return OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        ffn_dim=ffn_dim,
        max_position_embeddings=max_position_embeddings,
        word_embed_proj_dim=hidden_size,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        do_layer_norm_before=True,
        tie_word_embeddings=True,
    )


def tiny_opt(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **sizes: int) -> OPTForCausalLM:
    """A freshly initialised ``OPTForCausalLM`` (seeded) of :func:`tiny_opt_config` sizes."""
    import torch

    torch.manual_seed(seed)
    model = OPTForCausalLM(tiny_opt_config(tokenizer, **sizes))
    model.config.use_cache = False
    return model.eval()
