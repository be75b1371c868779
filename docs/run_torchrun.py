"""Run every tutorial under torchrun (gloo, CPU), as a reader on a cluster would.

Each page runs with as many processes as its largest launch. A page passes when every rank
exits cleanly (so every ``assert`` on the page held on every rank), its output is printed once
(rank 0 only), and rank 0's output holds the page's verification lines: the lines printed next
to the page's checks, the same the gallery build shows.

    python docs/run_torchrun.py [PATTERN] [--nnodes 2]

``--nnodes 2`` starts two torchrun agents on this machine, each with half the processes, joined
by the c10d rendezvous on loopback: how a two-node cluster looks to the code.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
ARTIFACTS = ROOT / "artifacts" / "torchrun"  # each page's output, for the log

# page -> (processes = its largest launch, the verification lines rank 0 must print)
PAGES: dict[str, tuple[int, list[str]]] = {
    "tutorial_00": (4, ["largest difference parallel vs serial", "all-reduce calls per step"]),
    "tutorial_01": (8, ["drift from serial", "measured bytes"]),
    "tutorial_02": (8, ["largest loss gap to serial", "bytes"]),
    "tutorial_03": (4, ["parallel vs serial"]),
    "tutorial_04": (4, ["all-reduce"]),
    "tutorial_05": (4, ["loss gap", "fine-tuning"]),
    "tutorial_06": (2, ["exact match"]),
    "tutorial_07": (2, ["judge accuracy"]),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agents(script: Path, nproc: int, nnodes: int) -> list[list[str]]:
    base = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        return [[*base, "--standalone", f"--nproc-per-node={nproc}", str(script)]]
    endpoint = f"127.0.0.1:{_free_port()}"
    per_node = nproc // nnodes
    return [
        [*base, f"--nnodes={nnodes}", f"--nproc-per-node={per_node}", "--rdzv-backend=c10d",
         f"--rdzv-endpoint={endpoint}", f"--rdzv-id=cai-labs-{script.stem}", str(script)]
        for _ in range(nnodes)
    ]  # fmt: skip


def run_page(script: Path, nproc: int, lines: list[str], nnodes: int, timeout: float) -> str:
    """Run one page; return '' when it passed, else what went wrong."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    workdir = tempfile.mkdtemp(prefix=f"torchrun_{script.stem}_")  # files a page writes
    procs = [
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=workdir
        )
        for cmd in _agents(script, nproc, nnodes)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout))
    except subprocess.TimeoutExpired:
        return f"did not finish within {timeout:g} s"
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None
    out = "".join(o for o, _ in outputs)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{script.stem}.out").write_text(out + "".join(e for _, e in outputs))
    failed = [(p.returncode, e) for p, (_, e) in zip(procs, outputs) if p.returncode]
    if failed:
        return f"exit code {failed[0][0]}:\n{failed[0][1][-4000:]}"
    first = next((line for line in out.splitlines() if line.strip()), "")
    if not first or out.count(first + "\n") != 1:
        return f"output missing or printed more than once (first line: {first!r})"
    missing = [m for m in lines if not re.search(re.escape(m), out, re.IGNORECASE)]
    return f"rank 0 never printed {missing}" if missing else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pattern", nargs="?", default="tutorial_")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    scripts = sorted(p for p in TUTORIALS.glob("tutorial_*.py") if args.pattern in p.name)
    if not scripts:
        print(f"no tutorial matches {args.pattern!r}")
        return 1
    failures = 0
    for script in scripts:
        nproc, lines = PAGES[script.name[:11]]
        start = time.monotonic()
        problem = run_page(script, nproc, lines, args.nnodes, args.timeout)
        took = time.monotonic() - start
        status = "ok" if not problem else f"FAILED: {problem}"
        print(f"{script.name}: {nproc} processes on {args.nnodes} node(s), {took:.0f} s, {status}")
        failures += bool(problem)
    print(f"torchrun: {len(scripts) - failures} of {len(scripts)} pages passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
