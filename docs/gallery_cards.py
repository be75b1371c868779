"""The landing page's tutorial cards and each page's run-time line, from the pages themselves.

A card shows a page's title, the first sentence of its introduction, its prerequisites (the
paragraph starting ``**Prerequisites:**`` in its docstring) and how long it ran in this build
(from the page sphinx-gallery generated). Every page also gets that run time under its title.
"""

from __future__ import annotations

import ast
import html
import re
from dataclasses import dataclass
from pathlib import Path

_TIME = re.compile(
    r"\*\*Total running time of the script:\*\*\s*\(\s*(\d+) minutes\s+([\d.]+) seconds\)"
)
_PREREQ = "**Prerequisites:**"


@dataclass
class PageFacts:
    name: str
    title: str
    summary: str
    prerequisites: str
    seconds: float | None  # None where the build did not execute the page


def _docstring_parts(source: str) -> tuple[str, str, str]:
    """Title, first sentence of the first paragraph, and the prerequisites paragraph."""
    doc = ast.get_docstring(ast.parse(source)) or ""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]
    title = paragraphs[0].splitlines()[0].strip() if paragraphs else ""
    body = [p for p in paragraphs[1:] if not p.startswith(_PREREQ)]
    first = " ".join(body[0].split()) if body else ""
    summary = re.split(r"(?<=[.!?])\s+(?=[A-Z*])", first, maxsplit=1)[0]
    prereq = next((p for p in paragraphs if p.startswith(_PREREQ)), "")
    return title, summary, " ".join(prereq[len(_PREREQ) :].split())


def run_seconds(generated_rst: Path) -> float | None:
    """The run time sphinx-gallery wrote into a generated page; None if it did not run it."""
    if not generated_rst.exists():
        return None
    m = _TIME.search(generated_rst.read_text(encoding="utf-8"))
    if m is None:
        return None
    seconds = 60 * int(m.group(1)) + float(m.group(2))
    return seconds if seconds > 0 else None


def page_facts(examples_dir: Path, gallery_dir: Path) -> list[PageFacts]:
    out = []
    for path in sorted(examples_dir.glob("tutorial_*.py")):
        title, summary, prereq = _docstring_parts(path.read_text(encoding="utf-8"))
        out.append(
            PageFacts(
                path.stem, title, summary, prereq, run_seconds(gallery_dir / f"{path.stem}.rst")
            )
        )
    return out


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "was not executed in this build"
    minutes, rest = divmod(round(seconds), 60)
    return (
        f"ran in {minutes} min {rest} s in this build"
        if minutes
        else f"ran in {rest} s in this build"
    )


def cards_html(facts: list[PageFacts]) -> str:
    """A raw-HTML block (for a MyST page at the site's root) with one card per tutorial."""
    cards = []
    for f in facts:
        e = html.escape
        cards.append(
            f'<a class="cai-card" href="tutorials/{e(f.name)}.html">'
            f'<span class="cai-card-title">{e(f.title)}</span>'
            f'<span class="cai-card-summary">{e(f.summary)}</span>'
            f'<span class="cai-card-needs"><b>Needs:</b> {e(f.prerequisites or "nothing")}</span>'
            f'<span class="cai-card-time">{e(format_seconds(f.seconds).capitalize())}</span></a>'
        )
    return '```{raw} html\n<div class="cai-cards">\n' + "\n".join(cards) + "\n</div>\n```\n"


def run_time_line(f: PageFacts) -> str:
    """The line put under a page's title (its prerequisites are in its own introduction)."""
    return f"*This page {format_seconds(f.seconds)}.*"


def insert_under_title(rst: str, line: str) -> str:
    """``line`` as a paragraph after the first section title of a generated page."""
    m = re.search(r"^(.+)\n(=+)\n", rst, flags=re.M)
    if m is None:
        return rst
    return rst[: m.end()] + "\n" + line + "\n\n" + rst[m.end() :]
