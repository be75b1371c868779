"""Run every tutorial under torchrun (gloo, CPU), as a reader on a cluster would.

Each page runs with as many processes as its largest launch. A page passes when every rank
exits cleanly (so every ``assert`` on the page held on every rank), its output is printed once
(rank 0 only), and rank 0's output holds the page's verification lines: the lines printed next
to the page's checks, the same the gallery build shows.

    python docs/run_torchrun.py [PATTERN] [--nnodes 2 --nproc-per-node 4]

``--nnodes 2`` starts two torchrun agents on this machine, joined by the c10d rendezvous on
loopback: how a two-node cluster looks to the code. Each agent starts ``--nproc-per-node``
processes (by default the page's largest launch divided by the nodes).

Pages that launch no ranks (their largest launch is 1: serving, the Colossal-AI system page)
run under torchrun as they run as a script, one process with nothing forked; the sweep over
every page leaves them out, and naming one (``python docs/run_torchrun.py tutorial_06``) runs it.
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
    "tutorial_00": (4, ["largest difference parallel vs serial", "all-reduce calls in step 1"]),
    "tutorial_01": (8, ["TP8-3D ", "DP2 x PP2 x TP2-1D ", "max |loss - serial|"]),
    "tutorial_02": (8, ["SP=4 all-to-all", "largest |measured / formula - 1| over all ranks"]),
    "tutorial_03": (4, ["pairs timed", "Spearman rho"]),
    "tutorial_04": (4, ["float64: largest |θ_parallel", "all-reduce bytes per step =="]),
    "tutorial_05": (4, ["largest loss difference from DDP", "ZeRO-3 fine-tuning:"]),
    "tutorial_06": (1, ["identical to one at a time", "server processes ended:"]),
    "tutorial_07": (2, ["judge accuracy"]),
    "tutorial_08": (1, ["colossalai:"]),
    "tutorial_09": (4, ["largest |ring - serial| over outputs", "longest sequence seed ring"]),
    "tutorial_10": (4, ["largest |expert parallel - serial| over", "all-to-all bytes == formula"]),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agents(script: Path, per_node: int, nnodes: int) -> list[list[str]]:
    base = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        return [[*base, "--standalone", f"--nproc-per-node={per_node}", str(script)]]
    endpoint = f"127.0.0.1:{_free_port()}"
    return [
        [*base, f"--nnodes={nnodes}", f"--nproc-per-node={per_node}", "--rdzv-backend=c10d",
         f"--rdzv-endpoint={endpoint}", f"--rdzv-id=cai-labs-{script.stem}", str(script)]
        for _ in range(nnodes)
    ]  # fmt: skip


def run_page(
    script: Path, per_node: int, lines: list[str], nnodes: int = 1, timeout: float = 900
) -> str:
    """Run one page on ``nnodes`` agents of ``per_node`` processes; '' when it passed, else what
    went wrong."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    workdir = tempfile.mkdtemp(prefix=f"torchrun_{script.stem}_")  # files a page writes
    procs = [
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=workdir
        )
        for cmd in _agents(script, per_node, nnodes)
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
    parser.add_argument("--nproc-per-node", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    scripts = sorted(p for p in TUTORIALS.glob("tutorial_*.py") if args.pattern in p.name)
    if args.pattern == "tutorial_":  # the sweep: the pages that launch ranks
        scripts = [p for p in scripts if PAGES[p.name[:11]][0] > 1]
    if not scripts:
        print(f"no tutorial matches {args.pattern!r}")
        return 1
    failures = 0
    for script in scripts:
        largest, lines = PAGES[script.name[:11]]
        per_node = args.nproc_per_node or max(1, largest // args.nnodes)
        start = time.monotonic()
        problem = run_page(script, per_node, lines, args.nnodes, args.timeout)
        took = time.monotonic() - start
        status = "ok" if not problem else f"FAILED: {problem}"
        where = f"{args.nnodes} x {per_node} processes"
        print(f"{script.name}: {where}, {took:.0f} s, {status}", flush=True)
        failures += bool(problem)
    print(f"torchrun: {len(scripts) - failures} of {len(scripts)} pages passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
