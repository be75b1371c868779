"""Tutorial pages read as stories: no code cell over 25 lines.

Cells are split as sphinx-gallery splits them: a line ``# %%`` (or a row of 20 or more ``#``)
opens a text block that runs while lines are comments; the code up to the next marker is one
cell. A cell's length counts every line from its first to its last non-blank line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).parents[1] / "tutorials").glob("tutorial_*.py"))
MAX_LINES = 25
_MARKER = re.compile(r"^(# %%.*|#{20,})$")


def _cell_bodies(source: str) -> list[tuple[int, list[str]]]:
    """``(first line index, lines)`` of every code cell of a sphinx-gallery script."""
    lines = source.splitlines()
    i = 0
    # The module docstring is the page's first text block.
    while i < len(lines) and not _MARKER.match(lines[i]):
        i += 1
    cells_src: list[tuple[int, list[str]]] = []
    while i < len(lines):
        i += 1  # the marker
        while i < len(lines) and lines[i].startswith("#") and not _MARKER.match(lines[i]):
            i += 1
        start, body = i, []
        while i < len(lines) and not _MARKER.match(lines[i]):
            body.append(lines[i])
            i += 1
        cells_src.append((start, body))
    return cells_src


def code_cells(source: str) -> list[tuple[int, int]]:
    """``(first line number, length)`` of every code cell of a sphinx-gallery script."""
    cells = []
    for start, body in _cell_bodies(source):
        filled = [k for k, line in enumerate(body) if line.strip()]
        if filled:
            cells.append((start + filled[0] + 1, filled[-1] - filled[0] + 1))
    return cells


def test_the_cell_count_sees_a_long_cell():
    page = "'''Title\n=====\n'''\n# %%\n# Text.\n\n" + "x = 1\n" * 26 + "# %%\n# More.\ny = 2\n"
    assert code_cells(page) == [(7, 26), (35, 1)]


@pytest.mark.parametrize("page", TUTORIALS, ids=lambda p: p.stem[:11])
def test_no_code_cell_over_25_lines(page):
    long = [(line, n) for line, n in code_cells(page.read_text()) if n > MAX_LINES]
    assert not long, f"{page.name}: code cells over {MAX_LINES} lines (line, length): {long}"


#: Lines that style tables, lay out plots or keep rank bookkeeping: the plumbing a page should
#: leave to ``cai_labs.report`` and the library.
PLUMBING = re.compile(
    r"\.style\b|\.format\(\{|set_index\(|\.round\(|to_string\(|rename_axis|IndexSlice"
    r"|plt\.subplots|tight_layout|\.set\(|\.legend\(|\.annotate\(|set_[xy](scale|lim|ticks|label)"
    r"|\.grid\(|xlabel=|ylabel=|title=|get_rank\(\)|get_world_size\(\)|all_gather_object"
    r"|= \[None\] \*"
)
MAX_PLUMBING = 0.10


def plumbing_share(source: str) -> float:
    """Share of a page's non-blank, non-comment code lines that are plumbing."""
    code = [
        line
        for _, body in _cell_bodies(source)
        for line in body
        if line.strip() and not line.lstrip().startswith("#")
    ]
    return sum(1 for line in code if PLUMBING.search(line)) / max(len(code), 1)


@pytest.mark.parametrize("page", TUTORIALS, ids=lambda p: p.stem[:11])
def test_plumbing_is_at_most_a_tenth_of_a_page(page):
    share = plumbing_share(page.read_text())
    assert share <= MAX_PLUMBING, f"{page.name}: {share:.1%} of its code lines are plumbing"


def test_the_plumbing_count_sees_a_page_of_styling():
    cell = "df = make()\ndf.style.format({'a': '{:.2f}'})\nax.set(xlabel='x')\nfig.tight_layout()\n"
    assert plumbing_share('"""T\n=\n"""\n# %%\n# Text.\n' + cell) == 0.75
