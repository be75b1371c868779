"""The launcher: results come back, failures surface fast, nothing is left running."""

from __future__ import annotations

import os
import time

import psutil
import pytest
import torch
import torch.distributed as dist

from cai_labs import LaunchTimeout, RankFailed, launch, rank_info


def _children() -> list[psutil.Process]:
    return [c for c in psutil.Process().children(recursive=True) if c.is_running()]


def _whoami(tag: str) -> dict:
    info = rank_info()
    t = torch.tensor([float(info.rank)])
    dist.all_reduce(t)
    return {
        "tag": tag,
        "rank": info.rank,
        "world": info.world_size,
        "sum": t.item(),
        "threads": torch.get_num_threads(),
    }


@pytest.mark.parametrize("n", [1, 2, 4])
def test_returns_rank0_result(n):
    out = launch(_whoami, n, "x")
    assert out["tag"] == "x" and out["rank"] == 0 and out["world"] == n
    assert out["sum"] == n * (n - 1) / 2  # every rank took part in the all-reduce
    assert out["threads"] >= 1
    assert not _children()


def test_rank0_prints_reach_the_caller(capsys):
    def talk():
        print(f"rank {dist.get_rank()} says hi")

    launch(talk, 2)
    assert "rank 0 says hi" in capsys.readouterr().out


def _raise_on_rank1():
    if dist.get_rank() == 1:
        raise ValueError("rank one is unhappy")
    dist.barrier()  # rank 0 would wait here forever without the launcher's clean-up
    time.sleep(60)


def test_raising_rank_surfaces_traceback_fast_and_leaves_nothing():
    start = time.monotonic()
    with pytest.raises(RankFailed) as err:
        launch(_raise_on_rank1, 2)
    assert time.monotonic() - start < 10
    assert err.value.rank == 1
    assert "ValueError: rank one is unhappy" in str(err.value)
    assert "_raise_on_rank1" in err.value.remote_traceback
    assert not _children()


def test_dying_rank_is_reported():
    def die():
        if dist.get_rank() == 1:
            os._exit(7)
        time.sleep(60)

    with pytest.raises(RankFailed, match="exit code 7"):
        launch(die, 2)
    assert not _children()


def test_deadlocked_collective_times_out_with_a_clear_message():
    def deadlock():
        if dist.get_rank() == 0:
            dist.all_reduce(torch.ones(3))  # rank 1 never joins
        else:
            time.sleep(60)

    start = time.monotonic()
    with pytest.raises(RankFailed, match="peer that never joined"):
        launch(deadlock, 2, collective_timeout=2)
    assert time.monotonic() - start < 15
    assert not _children()


def test_overall_timeout_stops_every_rank():
    def sleepy():
        time.sleep(60)

    with pytest.raises(LaunchTimeout, match="did not finish within 1 s") as caught:
        launch(sleepy, 2, timeout=1)
    assert not _children()
    # The message shows where each rank was waiting: in this test's sleepy(), on both ranks.
    message = str(caught.value)
    for rank in (0, 1):
        stack = message.split(f"--- rank {rank} ---")[1].split("--- rank")[0]
        assert "in sleepy" in stack, message


def test_environment_caps_the_timeout(monkeypatch):
    def sleepy():
        time.sleep(60)

    monkeypatch.setenv("CAI_LABS_LAUNCH_TIMEOUT", "1")
    with pytest.raises(LaunchTimeout, match="did not finish within 1 s"):
        launch(sleepy, 1, timeout=600)
    assert not _children()


@pytest.mark.parametrize("bad", [0, -1, 2.0])
def test_bad_world_size_is_rejected(bad):
    with pytest.raises(ValueError, match="world_size must be a positive integer"):
        launch(_whoami, bad, "x")


def test_torchrun_path_runs_in_place(monkeypatch, tmp_path):
    """With torchrun's environment, launch() runs the worker in this very process."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    try:
        assert launch(lambda: os.getpid(), 1) == os.getpid()
        with pytest.raises(ValueError, match="--nproc-per-node=2"):
            launch(lambda: None, 2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_forked_ranks_compute_after_the_parent_used_its_thread_pool():
    """OpenMP is not fork-safe: a child with several threads can hang after the parent used its
    pool. The launcher gives forked ranks one thread, so this must finish quickly."""
    a = torch.randn(600, 600)
    torch.set_num_threads(2)
    (a @ a).sum()  # the parent's OpenMP pool is now live

    def matmul() -> float:
        b = torch.randn(600, 600)
        return float((b @ b).sum()) * 0 + torch.get_num_threads()

    for n in (1, 2):
        assert launch(matmul, n, timeout=60) == 1


def _threads_after_lightning() -> tuple[int, str]:
    from lightning.fabric.utilities.distributed import _set_num_threads_if_needed

    _set_num_threads_if_needed(num_processes=1)  # what Lightning's launcher does in every rank
    return torch.get_num_threads(), os.environ["OMP_NUM_THREADS"]


def test_forked_ranks_stay_on_one_thread():
    # The parent uses its OpenMP pool first: that is what makes more threads in a child hang.
    torch.ones(512, 512) @ torch.ones(512, 512)
    assert launch(_threads_after_lightning, 2, timeout=240) == (1, "1")

    def greedy():
        torch.set_num_threads(2)

    with pytest.raises(RankFailed, match="computes on one thread"):
        launch(greedy, 2, timeout=60)
    assert not _children()


_HIGHLIGHT = (
    "import sys; from pygments import highlight; from pygments.formatters import HtmlFormatter; "
    "from pygments.lexers import PythonTracebackLexer; "
    "highlight(sys.stdin.read(), PythonTracebackLexer(), HtmlFormatter())"
)
_DUMP = 'Current thread 0x00007f2a (most recent call first):\n  File "b.py", line 979 in step\n'
_TRACE = 'Traceback (most recent call last):\n  File "a.py", line 1, in <module>\n    f()\n'


def _highlights_within(text: str, seconds: float = 30.0) -> bool:
    """Whether sphinx-gallery's traceback highlighter gets through ``text`` in time."""
    import subprocess
    import sys

    try:
        subprocess.run(
            [sys.executable, "-c", _HIGHLIGHT], input=text, text=True, timeout=seconds, check=True
        )
    except subprocess.TimeoutExpired:
        return False
    return True


def test_rank_stacks_in_a_timeout_do_not_hang_the_docs_highlighter():
    from cai_labs.launcher import traceback_form

    assert traceback_form(_DUMP).endswith("line 979, in step\n")
    assert _highlights_within(_TRACE + "LaunchTimeout: where:\n" + traceback_form(_DUMP))


def test_the_raw_faulthandler_form_is_what_hangs_it():
    if _highlights_within(_TRACE + "LaunchTimeout: where:\n" + _DUMP, seconds=10.0):
        pytest.skip("this Pygments highlights faulthandler's frames: the rewrite is not needed")
