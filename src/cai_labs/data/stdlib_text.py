"""An offline English text corpus: the docstrings of the Python standard library.

Every Python installation ships a few megabytes of carefully written English prose in its
docstrings, so a language-model tutorial can train on real text with no download. This module
gathers them with :mod:`inspect`, trains a WordPiece tokenizer on them with ``tokenizers`` (the
algorithm and special tokens of BERT) and turns them into one long stream of token ids.

The text depends on the Python version, so numbers trained on it vary slightly between Python
versions, never between runs on one installation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tokenizers

import contextlib
import importlib
import inspect
import io
import warnings
from collections.abc import Iterable, Iterator, Sequence
from types import ModuleType

import torch

__all__ = [
    "DEFAULT_MODULES",
    "SPECIAL_TOKENS",
    "stdlib_docstrings",
    "stdlib_text",
    "train_wordpiece",
    "token_stream",
]

DEFAULT_MODULES: tuple[str, ...] = (
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email.message",
    "enum",
    "fractions",
    "functools",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "html.parser",
    "http.client",
    "http.server",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "mailbox",
    "math",
    "multiprocessing",
    "operator",
    "os",
    "pathlib",
    "pickle",
    "platform",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shlex",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "traceback",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "zipfile",
)

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _import_quietly(name: str) -> ModuleType | None:
    """The module ``name``, imported without its warnings or prints; None if it is missing."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module missing from this build of Python
            return None


def _own_members(mod: ModuleType) -> Iterator[object]:
    """Classes and functions defined in ``mod``, each class followed by its own methods."""
    for _, member in sorted(vars(mod).items()):
        if getattr(member, "__module__", None) != mod.__name__:
            continue
        yield member
        if inspect.isclass(member):
            for _, attr in sorted(vars(member).items()):
                # Skip methods other libraries patched in (transformers adds some to
                # logging.Logger): the corpus must not depend on what else was imported.
                own = getattr(attr, "__module__", None) in (None, mod.__name__)
                if own and (inspect.isfunction(attr) or inspect.ismethoddescriptor(attr)):
                    yield attr


def stdlib_docstrings(modules: Sequence[str] = DEFAULT_MODULES, min_chars: int = 40) -> list[str]:
    """Docstrings (module, classes, functions, methods) of ``modules``, in a fixed order.

    Paragraphs shorter than ``min_chars`` (signatures, one-word notes) are dropped; duplicates
    (inherited docstrings) are kept once.
    """
    seen: set[str] = set()
    out: list[str] = []

    def add(obj: object) -> None:
        try:
            doc = inspect.getdoc(obj)
        except Exception:  # noqa: BLE001 - odd objects in some modules
            return
        if not doc:
            return
        for para in doc.split("\n\n"):
            para = " ".join(para.split())
            if len(para) >= min_chars and para not in seen:
                seen.add(para)
                out.append(para)

    for name in modules:
        mod = _import_quietly(name)
        if mod is None:
            continue
        add(mod)
        for member in _own_members(mod):
            add(member)
    return out


def stdlib_text(modules: Sequence[str] = DEFAULT_MODULES, max_chars: int | None = None) -> str:
    """The paragraphs of :func:`stdlib_docstrings` as one text, cut at ``max_chars``."""
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be positive or None; got {max_chars}")
    text = "\n\n".join(stdlib_docstrings(modules))
    return text if max_chars is None else text[:max_chars]


def train_wordpiece(texts: Iterable[str], vocab_size: int = 2000) -> tokenizers.Tokenizer:
    """Train a BERT-style (lower-cased) WordPiece tokenizer on ``texts``; returns a
    ``tokenizers.Tokenizer`` whose first ids are :data:`SPECIAL_TOKENS` (``[PAD]`` = 0)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    # The trainer learns the same vocabulary on every run but numbers the ``##`` pieces in
    # hash-map order, which changes between processes (huggingface/tokenizers#1794). Renumber:
    # special tokens first, then the rest sorted, so the same vocabulary always gives the same
    # ids. (On a tiny corpus, ties between merges can change the vocabulary itself; on the
    # standard-library corpus it was the same in every run we made.)
    learned = tok.get_vocab()
    ordered = list(SPECIAL_TOKENS) + sorted(w for w in learned if w not in SPECIAL_TOKENS)
    tok.model = models.WordPiece(vocab={w: i for i, w in enumerate(ordered)}, unk_token="[UNK]")
    return tok


def token_stream(tokenizer: tokenizers.Tokenizer, texts: Iterable[str]) -> torch.Tensor:
    """All ``texts`` encoded and joined, each followed by ``[SEP]``: a 1-D LongTensor of ids."""
    sep = tokenizer.token_to_id("[SEP]")
    ids: list[int] = []
    for enc in tokenizer.encode_batch(list(texts)):
        ids.extend(enc.ids)
        ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)
