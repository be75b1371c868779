"""The site validation catches what it claims to, and a tutorial notebook runs end to end."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_build():
    return _load(ROOT / "docs" / "check_build.py")


def test_internal_link_check_catches_broken_links_and_anchors(tmp_path):
    (tmp_path / "a.html").write_text(
        '<a id="top" href="b.html#here">ok</a> <a href="b.html#nowhere">bad anchor</a>'
        '<img src="missing.png"> <a href="https://example.org/x">external</a>'
        '<a href="#top">self</a>'
    )
    (tmp_path / "b.html").write_text('<h1 id="here">B</h1>')
    problems = _check_build().check_internal_links(tmp_path)
    assert problems == ["a.html: missing anchor b.html#nowhere", "a.html: broken link missing.png"]


def test_notebook_check_catches_an_invalid_notebook(tmp_path):
    (tmp_path / "bad.ipynb").write_text('{"cells": "not a list", "nbformat": 4}')
    assert "invalid notebook" in _check_build().check_notebooks(tmp_path)[0]


def test_tutorial_00_notebook_executes_end_to_end(tmp_path):
    """Convert the tutorial the way the site does (sphinx-gallery) and run it with nbclient."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("sphinx_gallery")
    src = tmp_path / "tutorial_00_data_parallel.py"
    shutil.copy(ROOT / "tutorials" / src.name, src)
    # The site's own first cell ("%matplotlib inline"), so figures show whatever MPLBACKEND says.
    first_cell = _load(ROOT / "docs" / "conf.py").sphinx_gallery_conf["first_notebook_cell"]
    convert = (
        "import sys; from sphinx_gallery.notebook import python_to_jupyter_cli as c; "
        "c(sys.argv[2:], sphinx_gallery_conf={'first_notebook_cell': sys.argv[1]})"
    )
    subprocess.run([sys.executable, "-c", convert, first_cell, str(src)], check=True, cwd=tmp_path)
    nb = nbformat.read(src.with_suffix(".ipynb"), as_version=4)
    nbformat.validate(nb)
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "data parallel on 4 ranks" in outputs
    assert any(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
