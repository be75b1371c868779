"""On a machine with CUDA: run the parallel-vs-serial tests and every page, write a results file.

Ranks get GPUs where there are enough of them (``cpu:gloo,cuda:nccl``), else they stay on the
CPU; the results file records the GPU, the driver, CUDA and torch versions, the date, and pass /
fail and time for each test and page, under ``docs/gpu_results/``. The site's "Running" page
shows the newest file. Without CUDA this exits 0 and says why it skipped.

    python docs/run_gpu.py     (or: nox -s gpu)
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "gpu_results"
# The parallel-vs-serial tests: every technique against its serial twin.
TESTS = [
    "tests/test_launcher.py",
    "tests/test_torchrun.py",
    "tests/test_data_parallel.py",
    "tests/test_pipeline.py",
    "tests/test_tensor_parallel_1d.py",
    "tests/test_tensor_sequence_parallel.py",
    "tests/test_tensor_parallel_2d.py",
    "tests/test_tensor_parallel_3d.py",
    "tests/test_sequence_parallel.py",
    "tests/test_context_parallel.py",
    "tests/test_expert_parallel.py",
    "tests/test_zero.py",
    "tests/test_opt_tensor_parallel.py",
]


def environment() -> dict | str:
    """What the results were taken on, or why there is no usable GPU."""
    try:
        import torch
    except ImportError:
        return "torch is not installed in this environment"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device here"
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    )
    return {
        "gpu": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "driver": smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else "unknown",
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }


def run_tests() -> list[dict]:
    """pytest over the parallel-vs-serial tests; one row per test from its JUnit report."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
        subprocess.run([*cmd, f"--junitxml={report}"], cwd=ROOT)
        rows = []
        for case in ET.parse(report).iter("testcase"):
            failed = case.find("failure") is not None or case.find("error") is not None
            skipped = case.find("skipped") is not None
            status = "failed" if failed else "skipped" if skipped else "passed"
            name = f"{case.get('classname')}::{case.get('name')}"
            rows.append({"test": name, "status": status, "seconds": float(case.get("time", 0))})
        return rows


def run_pages() -> list[dict]:
    """Every tutorial under torchrun (docs/run_torchrun.py), one row per page."""
    sys.path.insert(0, str(ROOT / "docs"))
    from run_torchrun import PAGES, TUTORIALS, run_page

    rows = []
    for script in sorted(TUTORIALS.glob("tutorial_*.py")):
        nproc, lines = PAGES[script.name[:11]]
        start = time.monotonic()
        problem = run_page(script, nproc, lines)
        rows.append(
            {
                "page": script.name,
                "processes": nproc,
                "status": "failed" if problem else "passed",
                "seconds": round(time.monotonic() - start, 1),
                "problem": problem[-2000:],
            }
        )
    return rows


def main() -> int:
    env = environment()
    if isinstance(env, str):
        print(f"nox -s gpu: skipped, nothing was run: {env}")
        return 0
    print(f"running on {env['gpus']} x {env['gpu']} (CUDA {env['cuda']}, torch {env['torch']})")
    results = {**env, "tests": run_tests(), "pages": run_pages()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = env["gpu"].replace(" ", "-").lower()
    out = RESULTS / f"{env['date']}-{slug}.json"
    out.write_text(json.dumps(results, indent=1))
    bad = [r for r in results["tests"] + results["pages"] if r["status"] == "failed"]
    print(f"wrote {out.relative_to(ROOT)}: {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
