"""Sphinx configuration: furo theme, sphinx-gallery tutorials, MyST pages, autodoc API."""

from __future__ import annotations

import os
import re
from pathlib import Path

from sphinx_gallery.sorting import FileNameSortKey

project = "cai-labs"
author = "cai-labs contributors"
copyright = "2026, cai-labs contributors"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax served from the site itself, not from a CDN
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
    "myst_nb",
]

# sphinx-gallery writes .ipynb downloads next to the generated pages; they are downloads, not
# source documents, so myst-nb must neither parse nor execute them.
exclude_patterns = ["_build", "tutorials/*.ipynb", "**/.ipynb_checkpoints", "Thumbs.db"]
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
suppress_warnings = ["config.cache"]  # sphinx-gallery's conf holds callables

html_theme = "furo"
html_title = "cai-labs"
html_favicon = "_static/favicon.png"
html_static_path = ["_static"]
html_css_files = ["cai_labs.css"]

autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True

# -- sphinx-gallery ------------------------------------------------------------------------------
# GALLERY_PATTERN=tutorial_00 executes only matching tutorials (the others render without
# output); unchanged tutorials are not re-executed (sphinx-gallery compares checksums).
_pattern = os.environ.get("GALLERY_PATTERN", "")
sphinx_gallery_conf = {
    "examples_dirs": "../tutorials",
    "gallery_dirs": "tutorials",
    "filename_pattern": re.escape(os.sep) + (_pattern if _pattern else "tutorial_"),
    "within_subsection_order": FileNameSortKey,
    "plot_gallery": os.environ.get("CAI_LABS_PLOT_GALLERY", "True"),
    "download_all_examples": False,
    "remove_config_comments": True,
    "write_computation_times": True,
    "min_reported_time": 0,
    "show_memory": False,
    "capture_repr": ("_repr_html_", "__repr__"),
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "reset_modules": ("matplotlib",),
    "first_notebook_cell": (
        "# Needs the cai-labs package: pip install 'cai-labs[docs]' from a clone of the project\n"
        "%matplotlib inline"
    ),
    "backreferences_dir": "gen_modules/backreferences",
    "doc_module": ("cai_labs",),
    "default_thumb_file": str(Path(__file__).parent / "_static" / "thumb.png"),
}


def _draw_diagrams(app) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from diagrams import draw_all

    draw_all(Path(app.srcdir) / "_static")
    from scale_pages import write_all

    write_all(Path(app.srcdir))


_CDN_BLOCK = re.compile(r"\n  \.\. raw:: html\n\n(?:    .*\n|\n)*?(?=  \.\. list-table::)")


def _self_contained_times(app, docname: str, source: list[str]) -> None:
    """sphinx-gallery's execution-time pages load jQuery and DataTables from CDNs; the site must
    work offline, so drop that block and keep the plain table."""
    if docname.endswith("sg_execution_times"):
        source[0] = _CDN_BLOCK.sub("\n", source[0])


def _gpu_status() -> str:
    """The line the running page shows: the newest results file of ``nox -s gpu``, or none."""
    import json

    files = sorted((Path(__file__).parent / "gpu_results").glob("*.json"))
    if not files:
        return (
            "**Never run on a GPU.** No results file of `nox -s gpu` exists yet: every number "
            "on this site comes from CPU ranks, and the GPU paths (NCCL, `cuda:LOCAL_RANK`) "
            "have not been executed by this project."
        )
    r = json.loads(files[-1].read_text())
    tests = [t["status"] for t in r["tests"]]
    pages = [p["status"] for p in r["pages"]]
    return (
        f"**Last run on GPU: {r['gpus']} x {r['gpu']}, {r['date']}** (driver {r['driver']}, "
        f"CUDA {r['cuda']}, torch {r['torch']}): {tests.count('passed')} of {len(tests)} "
        f"tests and {pages.count('passed')} of {len(pages)} pages passed "
        f"(`docs/gpu_results/{files[-1].name}`)."
    )


def _fill_gpu_status(app, docname: str, source: list[str]) -> None:
    if docname == "running":
        source[0] = source[0].replace("{{ gpu_status }}", _gpu_status())


def _gallery_facts(app):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from gallery_cards import page_facts

    return page_facts(Path(__file__).parent.parent / "tutorials", Path(app.srcdir) / "tutorials")


def _fill_cards_and_run_times(app, docname: str, source: list[str]) -> None:
    """The landing page's cards, and each tutorial's run time under its title (sphinx-gallery
    has executed the pages by the time Sphinx reads any source)."""
    from gallery_cards import cards_html, insert_under_title, run_time_line

    if docname == "index" and "{{ tutorial_cards }}" in source[0]:
        source[0] = source[0].replace("{{ tutorial_cards }}", cards_html(_gallery_facts(app)))
    elif docname.startswith("tutorials/tutorial_"):
        name = docname.split("/", 1)[1]
        facts = {f.name: f for f in _gallery_facts(app)}
        if name in facts:
            source[0] = insert_under_title(source[0], run_time_line(facts[name]))


def setup(app) -> None:
    app.connect("source-read", _fill_cards_and_run_times)
    app.connect("builder-inited", _draw_diagrams)
    app.connect("source-read", _self_contained_times)
    app.connect("source-read", _fill_gpu_status)
