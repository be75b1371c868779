"""Validate a built site: tutorials executed, figures and downloads present, notebooks valid,
every internal link and image resolving.

Run after ``sphinx-build`` by ``nox -s docs``; exits non-zero with a list of what is missing.
"""

from __future__ import annotations

import re
import sys
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
