"""Offline text: the docstrings of the Python standard library.

Every Python installation carries a few megabytes of carefully written English prose about
programming: the docstrings of its standard library. Gathering them with :mod:`inspect` needs no
download and gives the same text on every machine with the same Python version, which makes it a
convenient pre-training corpus for the tiny language models of the tutorials.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

__all__ = ["DEFAULT_MODULES", "docstring_corpus"]

DEFAULT_MODULES: tuple[str, ...] = (
    "string", "textwrap", "json", "collections", "itertools", "functools", "re", "math",
    "pathlib", "os", "random", "statistics", "datetime", "heapq", "bisect", "argparse",
    "logging", "csv", "difflib", "fractions", "decimal", "enum", "dataclasses", "typing",
)


def docstring_corpus(
    modules: tuple[str, ...] = DEFAULT_MODULES, max_chars: int | None = 200_000
) -> str:
    """Docstrings of ``modules`` and of their public functions and classes, joined by blank lines.

    The order is deterministic (modules as given, members sorted by name), so a seeded training
    run sees the same text everywhere. Modules that fail to import are skipped.

    Args:
        modules: importable module names to read.
        max_chars: stop after this many characters (``None``: everything).
    """
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be positive or None; got {max_chars}")
    parts: list[str] = []
    total = 0
    seen: set[int] = set()
    for name in modules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional stdlib module may be missing
            continue
        objs = [mod] + [
            obj for attr, obj in sorted(vars(mod).items())
            if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
        ]
        for obj in objs:
            doc = inspect.getdoc(obj)
            if not doc or id(doc) in seen or len(doc) < 40:
                continue
            seen.add(id(doc))
            parts.append(doc.strip())
            total += len(parts[-1]) + 2
            if max_chars is not None and total >= max_chars:
                return "\n\n".join(parts)[:max_chars]
    return "\n\n".join(parts)
