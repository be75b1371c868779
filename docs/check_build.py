"""Validate a built site: every tutorial page holds executed output, figures and downloads.

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
    return problems


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/_build/html")
    found = check(root)
    for p in found:
        print("site check:", p)
    print(f"site check: {len(found)} problem(s) in {root}")
    sys.exit(1 if found else 0)
