"""Execute every tutorial notebook of the built site in a Jupyter kernel, as a reader would.

The notebooks are the ``.ipynb`` downloads of ``docs/_build/html`` (build the site first with
``nox -s docs``). Each runs top to bottom with nbclient in a fresh kernel and a scratch working
directory; any cell error fails the run.

    python docs/run_notebooks.py [PATTERN]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat

SITE = Path(__file__).resolve().parent / "_build" / "html"


def notebooks(site: Path, pattern: str) -> list[Path]:
    """The site's notebook downloads, one per tutorial."""
    found = {p.name: p for p in sorted(site.glob("_downloads/*/tutorial_*.ipynb"))}
    return [found[name] for name in sorted(found) if pattern in name]


def run(path: Path, timeout: float) -> str:
    """Execute one notebook; return '' when every cell ran, else the error."""
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="notebook_") as cwd:
        client = nbclient.NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": cwd}}
        )
        try:
            client.execute()
        except nbclient.exceptions.CellExecutionError as err:
            return str(err)[-3000:]
    return ""


def main() -> int:
    pattern = sys.argv[1] if len(sys.argv) > 1 else "tutorial_"
    paths = notebooks(SITE, pattern)
    if not paths:
        print(f"no notebook matching {pattern!r} under {SITE.name}/_downloads: run nox -s docs")
        return 1
    failed = 0
    for path in paths:
        start = time.monotonic()
        problem = run(path, timeout=900)
        status = "ok" if not problem else f"FAILED:\n{problem}"
        print(f"{path.name}: {time.monotonic() - start:.0f} s, {status}", flush=True)
        failed += bool(problem)
    print(f"notebooks: {len(paths) - failed} of {len(paths)} ran end to end")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
