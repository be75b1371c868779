"""The site validation catches what it claims to, and a gallery page runs as a notebook."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up there
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


_OUT = (
    '<div class="sphx-glr-script-out highlight-none notranslate">'
    '<div class="highlight"><pre>{}</pre></div></div>'
)


def test_captured_output_check_catches_warnings_and_tracebacks(tmp_path):
    (tmp_path / "clean.html").write_text(_OUT.format("loss 0.25<span>\n</span>accuracy 0.97"))
    (tmp_path / "noisy.html").write_text(
        _OUT.format("x.py:3: Pandas4Warning: the &#39;mode&#39; keyword is deprecated")
        + _OUT.format("Traceback (most recent call last):\n  File ...")
        + "<p>a prose Warning outside the output is not captured output</p>"
    )
    problems = _check_build().check_captured_output(tmp_path)
    assert len(problems) == 2 and all(p.startswith("noisy.html") for p in problems), problems
    assert "Pandas4Warning" in problems[0] and "Traceback" in problems[1]


def test_absolute_path_check_catches_paths_of_the_build_machine(tmp_path):
    check = _check_build()
    (tmp_path / "ok.html").write_text("<p>run <code>nox -s docs</code> in your clone</p>")
    (tmp_path / "leak.html").write_text(
        _OUT.format(f"{ROOT}/tutorials/tutorial_05.py:12: warning<br>/tmp/cai_labs_x/ckpt")
    )
    problems = check.check_absolute_paths(tmp_path, roots=[str(ROOT), "/tmp"])
    assert sorted(problems) == sorted(  # the order of the hits follows the paths' spelling
        [
            "leak.html: absolute path of the build: /tmp/cai_labs_x/ckpt",
            f"leak.html: absolute path of the build: {ROOT}/tutorials/tutorial_05.py:12:",
        ]
    )
    assert str(ROOT) in check.build_machine_paths()  # run from the checkout, it is one of them


def test_figure_title_check_catches_an_untitled_figure(tmp_path):
    img = (
        '<img alt="{}" class="sphx-glr-single-img" src="../_images/sphx_glr_tutorial_09_x_{}.png">'
    )
    (tmp_path / "page.html").write_text(
        img.format("Loss per step, measured", "001")
        + img.format("tutorial 09 x", "002")  # sphinx-gallery's fallback: the file name
        + '<img alt="" src="../_images/sphx_glr_tutorial_09_x_thumb.png">'  # a card, not a figure
    )
    problems = _check_build().check_figure_titles(tmp_path)
    assert problems == ["page.html: figure sphx_glr_tutorial_09_x_002.png has no title"]


#: A gallery page with what makes a notebook differ from a script: ranks forked from the
#: Jupyter kernel (its threads and sockets), their output replayed into the cell, a figure.
#: Every tutorial's own notebook runs in `nox -s notebooks`.
NOTEBOOK_PAGE = '''"""
Notebook check
==============
"""

# %%
# Two ranks forked from the kernel sum their ranks.
import matplotlib.pyplot as plt
import torch
import torch.distributed as dist

from cai_labs import launch


def worker():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    print(f"sum over {dist.get_world_size()} ranks: {t.item():g}")
    return t.item()


total = launch(worker, 2)
assert total == 3.0

# %%
# A figure.
plt.plot([0, 1], [0, total])
plt.title("total")
'''


def test_a_gallery_page_converts_and_runs_in_a_jupyter_kernel(tmp_path):
    """Convert a page the way the site does (sphinx-gallery) and run it with nbclient."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("sphinx_gallery")
    src = tmp_path / "tutorial_99_notebook_check.py"
    src.write_text(NOTEBOOK_PAGE)
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
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert "sum over 2 ranks: 3" in "".join(o.get("text", "") for o in outputs)
    assert any("image/png" in o.get("data", {}) for o in outputs)


def _built_page(root: Path, stem: str, output=True, figure=True, downloads=True) -> None:
    """A minimal built gallery page for ``tutorials/<stem>.py`` under ``root``."""
    (root / "tutorials").mkdir(parents=True, exist_ok=True)
    (root / "_images").mkdir(exist_ok=True)
    (root / "_downloads").mkdir(exist_ok=True)
    (root / "_images" / f"sphx_glr_{stem}_001.png").write_bytes(b"png")
    nbformat = pytest.importorskip("nbformat")
    (root / "_downloads" / f"{stem}.py").write_text("")
    (root / "_downloads" / f"{stem}.ipynb").write_text(nbformat.writes(nbformat.v4.new_notebook()))
    body = ['<div class="sphx-glr-script-out"><pre>ran</pre></div>'] if output else []
    if figure:
        body.append(f'<img alt="A titled figure" src="../_images/sphx_glr_{stem}_001.png">')
    for ext in ("py", "ipynb"):
        target = f"../_downloads/{stem}.{ext}" if downloads else f"../_downloads/gone.{ext}"
        body.append(f'<a href="{target}">download</a>')
    (root / "tutorials" / f"{stem}.html").write_text("\n".join(body))


def _cards(root: Path, card_b: dict) -> None:
    """The landing page's cards as ``docs/gallery_cards.py`` writes them (b's may be broken)."""
    cards = _load(ROOT / "docs" / "gallery_cards.py")
    facts = [
        cards.PageFacts("tutorial_a", "A", "Learn a.", "nothing", 12.0),
        cards.PageFacts(
            **{
                "name": "tutorial_b",
                "title": "B",
                "summary": "Learn b.",
                "prerequisites": "a",
                "seconds": 75.0,
                **card_b,
            }
        ),
    ]
    block = cards.cards_html(facts).split("\n", 1)[1].rsplit("```", 1)[0]
    (root / "index.html").write_text(block)


def _site(tmp_path: Path, monkeypatch, card_b: dict | None = None, **broken) -> list[str]:
    """Run ``check_build.check`` on a two-page site; ``broken`` switches parts of page b off."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tutorials").mkdir()
    for stem in ("tutorial_a", "tutorial_b"):
        (tmp_path / "tutorials" / f"{stem}.py").write_text("")
    html = tmp_path / "html"
    _built_page(html, "tutorial_a")
    _built_page(html, "tutorial_b", **broken)
    _cards(html, card_b or {})
    return _check_build().check(html)


def test_site_check_passes_a_complete_page(tmp_path, monkeypatch):
    assert _site(tmp_path, monkeypatch) == []


def test_site_check_catches_a_card_without_summary_or_run_time(tmp_path, monkeypatch):
    found = _site(tmp_path, monkeypatch, card_b={"summary": "", "seconds": None})
    assert found == [
        "index.html: the card of tutorial_b has no summary",
        "index.html: the card of tutorial_b shows no run time of this build",
    ]


@pytest.mark.parametrize(
    "broken, problems",
    [
        ({"output": False}, ["tutorial_b.html: no captured output (was it executed?)"]),
        ({"figure": False}, ["tutorial_b.html: no figure"]),
        (
            {"downloads": False},
            [
                "tutorial_b.html: no working .py download link",
                "tutorial_b.html: no working .ipynb download link",
            ],
        ),
    ],
    ids=["no-output", "no-figure", "broken-download"],
)
def test_site_check_catches_a_broken_page(tmp_path, monkeypatch, broken, problems):
    found = _site(tmp_path, monkeypatch, **broken)
    for p in problems:
        assert p in found
    assert not [p for p in found if "tutorial_a" in p]


def test_site_check_catches_an_unbuilt_page_and_a_missing_figure_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tutorials").mkdir()
    (tmp_path / "tutorials" / "tutorial_a.py").write_text("")
    (tmp_path / "tutorials" / "tutorial_c.py").write_text("")  # never built
    html = tmp_path / "html"
    _built_page(html, "tutorial_a")
    (html / "_images" / "sphx_glr_tutorial_a_001.png").unlink()
    found = _check_build().check(html)
    assert any(p.endswith("tutorial_c.html: missing") for p in found)
    assert "tutorial_a.html: figure ../_images/sphx_glr_tutorial_a_001.png does not exist" in found
