"""Validate a built site: tutorials executed, figures and downloads present, notebooks valid,
every internal link and image resolving, no warning or traceback in any captured output, no
absolute path of the build machine in any page, every figure titled.

Run after ``sphinx-build`` by ``nox -s docs``; exits non-zero with a list of what is missing.
"""

from __future__ import annotations

import html as html_lib
import re
import sys
import tempfile
from pathlib import Path


def check(html_root: Path) -> list[str]:
    problems: list[str] = []
    sources = sorted(Path("tutorials").glob("tutorial_*.py"))
    if not sources:
        problems.append("no tutorials/tutorial_*.py found: run from the repository root")
    for src in sources:
        page = html_root / "tutorials" / f"{src.stem}.html"
        if not page.exists():
            problems.append(f"{page}: missing")
            continue
        html = page.read_text(encoding="utf-8")
        if "sphx-glr-script-out" not in html:
            problems.append(f"{page.name}: no captured output (was it executed?)")
        images = re.findall(r'<img[^>]+src="([^"]*sphx_glr_[^"]+)"', html)
        if not images:
            problems.append(f"{page.name}: no figure")
        for img in images:
            if not (page.parent / img).resolve().exists():
                problems.append(f"{page.name}: figure {img} does not exist")
        for ext in ("py", "ipynb"):
            links = re.findall(rf'href="([^"]+\.{ext})"', html)
            if not any((page.parent / link).resolve().exists() for link in links):
                problems.append(f"{page.name}: no working .{ext} download link")
    problems += check_notebooks(html_root)
    problems += check_internal_links(html_root)
    problems += check_captured_output(html_root)
    problems += check_absolute_paths(html_root)
    problems += check_figure_titles(html_root)
    problems += check_cards(html_root, [s.stem for s in sources])
    return problems


_CARD = re.compile(r'<a class="cai-card" href="tutorials/([^"]+)\.html">(.*?)</a>', re.S)


def check_cards(html_root: Path, names: list[str]) -> list[str]:
    """The landing page has a card per tutorial, each with a summary and this build's run time."""
    index = html_root / "index.html"
    if not index.exists():
        return ["index.html: missing"]
    cards = dict(_CARD.findall(index.read_text(encoding="utf-8")))
    problems = []
    for name in names:
        card = cards.get(name)
        if card is None:
            problems.append(f"index.html: no card for {name}")
            continue
        summary = re.search(r'cai-card-summary">([^<]*)<', card)
        if summary is None or not summary.group(1).strip():
            problems.append(f"index.html: the card of {name} has no summary")
        if not re.search(r'cai-card-time">Ran in \d', card):
            problems.append(f"index.html: the card of {name} shows no run time of this build")
    return problems


def _pages(html_root: Path) -> list[Path]:
    return [p for p in sorted(html_root.rglob("*.html")) if "_static" not in p.parts]


# sphinx-gallery's block of captured stdout/stderr: <div class="sphx-glr-script-out ..."> <pre>
_OUTPUT = re.compile(r'class="sphx-glr-script-out[^"]*".*?<pre>(.*?)</pre>', re.S)
_NOISE = re.compile(r"\w*Warning\b|Traceback \(most recent call last\)")


def check_captured_output(html_root: Path) -> list[str]:
    """No captured output of any page shows a warning or a traceback: a page's output is what
    its run printed, and a warning there is noise the reader cannot act on (or a real bug)."""
    problems = []
    for page in _pages(html_root):
        for block in _OUTPUT.findall(page.read_text(encoding="utf-8")):
            text = html_lib.unescape(re.sub(r"<[^>]+>", "", block))
            for hit in sorted(set(_NOISE.findall(text))):
                line = next(ln for ln in text.splitlines() if hit in ln).strip()
                rel = page.relative_to(html_root)
                problems.append(f"{rel}: captured output has {hit!r}: {line[:160]}")
    return problems


def build_machine_paths() -> list[str]:
    """Directories of the machine that built the site, as they would appear in a page."""
    roots = {str(Path.cwd().resolve()), sys.prefix, sys.base_prefix, str(Path.home())}
    roots.add(tempfile.gettempdir())
    return sorted(r.rstrip("/") for r in roots if r.rstrip("/"))


def check_absolute_paths(html_root: Path, roots: list[str] | None = None) -> list[str]:
    """No page shows a path of the build machine (its checkout, Python, home or temporary
    directory): such a path means nothing to a reader and gives the machine away."""
    roots = build_machine_paths() if roots is None else roots
    pattern = re.compile("|".join(re.escape(r) + r"/[^\s\"'<]*" for r in roots))
    problems = []
    for page in _pages(html_root):
        for hit in sorted(set(pattern.findall(page.read_text(encoding="utf-8"))))[:3]:
            problems.append(f"{page.relative_to(html_root)}: absolute path of the build: {hit}")
    return problems


_IMG = re.compile(r"<img\b[^>]*>")


def check_figure_titles(html_root: Path) -> list[str]:
    """Every figure of a tutorial has a title. sphinx-gallery writes a figure's titles into the
    image's alt text and, without one, falls back to the image's file name."""
    problems = []
    for page in _pages(html_root):
        for tag in _IMG.findall(page.read_text(encoding="utf-8")):
            src = re.search(r'src="([^"]*sphx_glr_[^"]+)"', tag)
            if src is None or "thumb" in src.group(1):
                continue
            alt = html_lib.unescape((re.search(r'alt="([^"]*)"', tag) or [None, ""])[1])
            stem = Path(src.group(1)).stem
            fallback = re.sub(r"[-,_]", " ", stem[len("sphx_glr_") : -4])
            if not alt.strip() or alt.strip() == fallback.strip():
                rel = page.relative_to(html_root)
                problems.append(f"{rel}: figure {Path(src.group(1)).name} has no title")
    return problems


def check_notebooks(html_root: Path) -> list[str]:
    """Every generated .ipynb download is a valid notebook (nbformat schema)."""
    import nbformat

    problems = []
    for nb_path in sorted(html_root.rglob("*.ipynb")):
        try:
            nbformat.validate(nbformat.read(nb_path, as_version=4))
        except Exception as exc:  # noqa: BLE001 - report whatever is wrong
            problems.append(f"{nb_path.name}: invalid notebook: {exc}")
    return problems


_LINK = re.compile(r'(?:href|src)="([^"#?]*)(?:#([^"]*))?"')


def check_internal_links(html_root: Path) -> list[str]:
    """Every relative href/src of every page points at a file that exists, and every #anchor
    into a page of the site exists in that page."""
    problems = []
    ids: dict[Path, set[str]] = {}

    def anchors(path: Path) -> set[str]:
        if path not in ids:
            ids[path] = set(re.findall(r'id="([^"]+)"', path.read_text(encoding="utf-8")))
        return ids[path]

    for page in sorted(html_root.rglob("*.html")):
        if "_static" in page.parts:
            continue
        for target, anchor in _LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target) or target.startswith("//"):
                continue  # external (http:, mailto:, data:)
            dest = (page.parent / target).resolve() if target else page
            rel = page.relative_to(html_root)
            if not dest.exists():
                problems.append(f"{rel}: broken link {target}")
            elif anchor and dest.suffix == ".html" and anchor not in anchors(dest):
                problems.append(f"{rel}: missing anchor {target}#{anchor}")
    return problems


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/_build/html")
    found = check(root)
    for p in found:
        print("site check:", p)
    print(f"site check: {len(found)} problem(s) in {root}")
    sys.exit(1 if found else 0)
