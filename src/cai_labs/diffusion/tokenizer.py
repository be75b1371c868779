"""A word-level CLIP-style tokenizer for digit captions, built offline from a generated vocabulary.

Stable Diffusion tokenizes prompts with CLIP's byte-pair tokenizer, whose 49,408-entry vocabulary
is a download. The captions of this tutorial use about thirty words, so we generate the vocabulary
in code and build a :class:`transformers.PreTrainedTokenizerFast` on a ``tokenizers`` word-level
model. It behaves like CLIP's tokenizer where it matters to the text encoder: every prompt becomes
``<|startoftext|> words... <|endoftext|>`` padded to a fixed length, so a prompt is always an
``(batch, max_length)`` tensor of ids. Saved with ``save_pretrained`` it reloads with
``AutoTokenizer.from_pretrained`` from the checkpoint directory, with no network.
"""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

__all__ = ["DIGIT_WORDS", "VOCABULARY", "build_tokenizer", "SPECIAL_TOKENS"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Ids 0..3 are special. The end token is deliberately not id 2: CLIPTextModel treats a config with
# eos_token_id == 2 as a legacy checkpoint and pools at the largest id instead of at the end token.
SPECIAL_TOKENS = {
    "pad": "<|pad|>",
    "bos": "<|startoftext|>",
    "unk": "<|unk|>",
    "eos": "<|endoftext|>",
}
VOCABULARY: tuple[str, ...] = (
    *SPECIAL_TOKENS.values(),
    "a",
    "an",
    "handwritten",
    "digit",
    "the",
    "number",
    "picture",
    "of",
    "small",
    *DIGIT_WORDS,
    *(str(d) for d in range(10)),
)


def build_tokenizer(max_length: int = 8) -> PreTrainedTokenizerFast:
    """A tokenizer whose ``__call__`` gives ``input_ids`` of shape ``(batch, max_length)``.

    Words outside :data:`VOCABULARY` become ``<|unk|>``; prompts longer than ``max_length``
    tokens (start and end included) are truncated, as CLIP truncates at 77.
    """
    if max_length < 3:
        raise ValueError(
            f"max_length must leave room for start, one word and end; got {max_length}"
        )
    vocab = {word: i for i, word in enumerate(VOCABULARY)}
    core = Tokenizer(WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=eos,
        unk_token=SPECIAL_TOKENS["unk"],
        pad_token=SPECIAL_TOKENS["pad"],
        model_max_length=max_length,
        padding_side="right",
    )
