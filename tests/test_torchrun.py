"""The same page under torchrun: several world sizes in one job, output once, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "torchrun_scripts" / "launch_sizes.py"


def _torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(SCRIPT),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_launches_of_every_size_under_an_8_rank_torchrun():
    """launch(fn, n) for n = 1, 2, 4, 8 runs on the first n ranks and every rank gets rank 0's
    result; only rank 0 prints, so each line appears once."""
    run = _torchrun(8)
    assert run.returncode == 0, run.stderr[-3000:]
    for n in (1, 2, 4, 8):
        assert run.stdout.count(f"launch {n} of 8: ok") == 1, run.stdout
        assert run.stdout.count(f"n={n}: rank 0 of {n} says hi") == 1, run.stdout
    assert "rank 1 of" not in run.stdout  # ranks other than 0 stay quiet
    assert run.stdout.count("all launches done") == 1
    assert run.stdout.count("a 24 MiB result came back") == 1
    assert run.stdout.count("every member got rank 0's arguments") == 1


def test_more_ranks_than_torchrun_started_is_a_clear_error():
    run = _torchrun(2, "too-many", timeout=120)
    assert run.returncode != 0
    assert "launch(fn, 3) needs 3 ranks, but torchrun started WORLD_SIZE=2" in run.stderr
    assert "--nproc-per-node=3" in run.stderr


@pytest.mark.parametrize("cuda", [True, False])
def test_backend_serves_cpu_and_gpu_tensors(monkeypatch, cuda):
    """With GPUs visible the group is cpu:gloo,cuda:nccl, so CPU tensors never reach NCCL."""
    import torch

    from cai_labs import devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8 if cuda else 0)
    monkeypatch.delenv("CAI_LABS_BACKEND", raising=False)
    assert devices.pick_backend(8) == ("cpu:gloo,cuda:nccl" if cuda else "gloo")
    assert devices.pick_backend(16) == "gloo"  # more ranks than GPUs: all on the CPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert devices.pick_backend(16, local=True) == ("cpu:gloo,cuda:nccl" if cuda else "gloo")
    assert devices.pick_backend(8, "gloo") == "gloo"
