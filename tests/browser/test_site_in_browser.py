"""Load every built page in headless Chromium, as a reader would.

Run by ``nox -s browser`` after ``nox -s docs`` (marker ``browser``; needs Debian's chromium at
``/usr/bin/chromium`` or ``CAI_LABS_CHROMIUM``). Checks each page for console errors, images that
fail to load and download links that do not resolve; checks that search finds "pipeline"; saves
screenshots of the landing page and a tutorial page to ``artifacts/screenshots``. It also breaks
an image in a copy of the site and checks that the same page check reports it.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

SITE = Path(os.environ.get("CAI_LABS_SITE", "docs/_build/html"))
CHROMIUM = os.environ.get("CAI_LABS_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path("artifacts/screenshots")
# Without these flags Chromium keeps trying to reach Google services, which a closed network
# refuses, and logs errors that are not the site's.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(root: Path) -> Iterator[str]:
    """Serve ``root`` on a free loopback port; yields the base URL; always shuts down."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser():
    if not SITE.joinpath("index.html").exists():
        pytest.fail(f"no built site at {SITE}: run `nox -s docs` first")
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: `apt-get install chromium` (or set CAI_LABS_CHROMIUM)"
        )
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def page_problems(browser, base: str, rel: str, screenshot: Path | None = None) -> list[str]:
    """Open one page; report console errors, broken images and dead download links."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"script error: {e}"))
    page.goto(f"{base}/{rel}", wait_until="load")
    for src in page.eval_on_selector_all(
        "img", "imgs => imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
    ):
        errors.append(f"image did not load: {src}")
    for href in page.eval_on_selector_all(
        "a[href$='.py'], a[href$='.ipynb'], a[href$='.zip']", "as => as.map(a => a.href)"
    ):
        try:
            with urllib.request.urlopen(href) as r:
                assert r.status == 200
        except Exception as exc:  # noqa: BLE001 - report every failure the same way
            errors.append(f"download link {href}: {exc}")
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=False)
    page.close()
    return [f"{rel}: {e}" for e in errors]


def _pages(root: Path) -> list[str]:
    skip = {"genindex.html", "py-modindex.html"}
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*.html")
        if p.name not in skip and "_modules" not in p.parts and "_static" not in p.parts
    )


def test_every_page_loads_cleanly(browser):
    pages = _pages(SITE)
    assert "index.html" in pages and any(p.startswith("tutorials/tutorial_") for p in pages)
    tutorial = next(p for p in pages if p.startswith("tutorials/tutorial_"))
    problems = []
    with serve(SITE) as base:
        for rel in pages:
            shot = None
            if rel == "index.html":
                shot = SHOTS / "landing.png"
            elif rel == tutorial:
                shot = SHOTS / "tutorial.png"
            problems += page_problems(browser, base, rel, shot)
    assert not problems, "\n".join(problems)
    assert (SHOTS / "landing.png").stat().st_size > 10_000
    assert (SHOTS / "tutorial.png").stat().st_size > 10_000


def test_search_finds_pipeline(browser):
    with serve(SITE) as base:
        page = browser.new_page()
        page.goto(f"{base}/search.html?q=pipeline")
        # Results appear one by one; the summary line ("... found N pages ...") comes last.
        page.wait_for_function(
            "document.querySelector('#search-results')?.innerText.includes('found')",
            timeout=30_000,
        )
        text = page.inner_text("#search-results")
        page.close()
    assert "found" in text and "pipeline" in text.lower()


def test_a_broken_image_is_caught(browser, tmp_path):
    """The check above must be able to fail: remove a figure from a copy of the site."""
    copy = tmp_path / "site"
    shutil.copytree(SITE, copy)
    tutorial = next(p for p in _pages(copy) if p.startswith("tutorials/tutorial_"))
    figures = sorted((copy / "_images").glob("sphx_glr_tutorial_*_001.png"))
    assert figures, "the tutorial pages have no figures to break"
    for fig in figures:
        fig.unlink()
    with serve(copy) as base:
        problems = page_problems(browser, base, tutorial)
    assert any("image did not load" in p for p in problems), problems
