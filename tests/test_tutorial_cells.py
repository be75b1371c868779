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
#: Pages whose cells are still being split (strict: a page that passes must leave this set).
NOT_YET = {
    "tutorial_00_data_parallel",
    "tutorial_01_multidim_parallel",
    "tutorial_02_sequence_parallel",
    "tutorial_03_auto_parallel",
    "tutorial_06_serving",
    "tutorial_07_stable_diffusion_lightning",
    "tutorial_08_colossalai_system",
}
_MARKER = re.compile(r"^(# %%.*|#{20,})$")


def code_cells(source: str) -> list[tuple[int, int]]:
    """``(first line number, length)`` of every code cell of a sphinx-gallery script."""
    lines = source.splitlines()
    cells, start, i = [], None, 0
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
    for start, body in cells_src:
        filled = [k for k, line in enumerate(body) if line.strip()]
        if filled:
            cells.append((start + filled[0] + 1, filled[-1] - filled[0] + 1))
    return cells


def test_the_cell_count_sees_a_long_cell():
    page = "'''Title\n=====\n'''\n# %%\n# Text.\n\n" + "x = 1\n" * 26 + "# %%\n# More.\ny = 2\n"
    assert code_cells(page) == [(7, 26), (35, 1)]


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(p, marks=pytest.mark.xfail(strict=True)) if p.stem in NOT_YET else p
        for p in TUTORIALS
    ],
    ids=lambda p: p.stem[:11],
)
def test_no_code_cell_over_25_lines(page):
    long = [(line, n) for line, n in code_cells(page.read_text()) if n > MAX_LINES]
    assert not long, f"{page.name}: code cells over {MAX_LINES} lines (line, length): {long}"
