"""Run one function on N ranks and hand rank 0's result back to the caller.

Every tutorial and test needs the same thing: start ``world_size`` processes, give each a
``torch.distributed`` process group, run a worker function on all of them, and get a plain Python
result back in the process that asked (a tutorial page, a test, a script). ``launch`` does that.

Why ``fork``: sphinx-gallery ``exec()``s each tutorial in a namespace that is not an importable
module, so a worker defined on the page cannot be pickled by name, which is what ``spawn`` needs.
A forked child inherits the function as it is. The same is true in a notebook.

What the parent guarantees:

* rank 0's return value comes back, its tensors moved to the CPU (it must be picklable:
  numbers, lists, dicts, tensors);
* whatever rank 0 prints is replayed in the parent, so it shows on the page;
* if any rank raises, every rank is ended and :class:`RankFailed` is raised in the parent with that
  rank's traceback, within about a second;
* a collective that waits for a peer that never comes raises after ``collective_timeout`` seconds,
  and the whole call is bounded by ``timeout``; when it runs out, :class:`LaunchTimeout` shows
  the Python stack of every thread of every unfinished rank (dumped by :mod:`faulthandler`), so
  a hang in a build log says where each rank was waiting;
* no child process outlives the call, whatever happened;
* each forked rank computes on one intra-op thread: OpenMP's thread pool does not survive a
  fork (a child asking for more threads after the parent used its pool can hang), and ranks
  that share a machine's cores should not oversubscribe them anyway.

Under ``torchrun`` nothing is forked: ``launch(fn, n)`` runs ``fn`` on a process group of the
first ``n`` of torchrun's ranks and returns rank 0's result on every rank
(:mod:`cai_labs.torchrun`), and only rank 0 prints, so the same page runs on one laptop or many
GPU nodes. With GPUs the group is ``cpu:gloo,cuda:nccl`` (:mod:`cai_labs.devices`).
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import io
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import connection, get_context
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from cai_labs.devices import device, pick_backend, to_host, use_rank_device
from cai_labs.errors import LaunchTimeout, RankFailed
from cai_labs.torchrun import quiet_other_ranks, run_under_torchrun, under_torchrun
from cai_labs.wire import forget_inherited_sockets

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

__all__ = [
    "RankFailed",
    "LaunchTimeout",
    "RankInfo",
    "launch",
    "rank_info",
]
# ``device`` and ``under_torchrun`` are imported here for callers' convenience; they are
# documented where they are defined (cai_labs.devices, cai_labs.torchrun).


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits: its rank, the world size and the device its tensors live on."""

    rank: int
    world_size: int
    device: torch.device
    backend: str


def rank_info() -> RankInfo:
    """This rank's :class:`RankInfo` (rank 0 of 1 when no process group exists)."""
    if not dist.is_initialized():
        return RankInfo(0, 1, torch.device("cpu"), "none")
    return RankInfo(dist.get_rank(), dist.get_world_size(), device(), dist.get_backend())


def _worker(
    rank: int,
    world_size: int,
    backend: str,
    store_path: str,
    collective_timeout: float,
    conn: connection.Connection,
    stack_path: str,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
) -> None:
    """Body of each child: join the group, run ``fn``, report, and leave without cleanup hooks."""
    status = 1
    captured = io.StringIO()
    try:
        # The parent may be a test runner or Sphinx with its own signal handlers and atexit hooks;
        # the child must die on SIGTERM and never run the parent's exit handlers.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # On the parent's SIGUSR1 (sent when the launch times out), write every thread's stack.
        stack_file = open(stack_path, "w")  # noqa: SIM115 - open until os._exit
        faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
        _one_thread()
        forget_inherited_sockets()  # a notebook kernel's sockets are not this rank's traffic
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        use_rank_device(backend, rank)
        dist.init_process_group(
            backend,
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_timeout),
        )
        out = captured if rank == 0 else sys.__stdout__
        with contextlib.redirect_stdout(out):
            result = fn(*args, **kwargs)
        _send(conn, ("ok", rank, to_host(result) if rank == 0 else None, captured.getvalue()))
        status = 0
        # Stay alive until the parent has every rank's report: a rank that exits early closes
        # sockets its peers may still be using (gloo reports "connection closed by peer").
        with contextlib.suppress(EOFError, OSError):
            conn.recv_bytes()
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        tb = traceback.format_exc()
        if isinstance(sys.exc_info()[1], RuntimeError) and "imed out" in tb:
            tb += (
                f"\n(a collective waited {collective_timeout:g} s for a peer that never joined it: "
                "check that every rank makes the same collective calls in the same order)"
            )
        with contextlib.suppress(Exception):
            _send(conn, ("error", rank, tb, captured.getvalue()))
    finally:
        with contextlib.suppress(Exception):
            conn.close()
        sys.stdout.flush() if sys.stdout else None
        os._exit(status)


def _one_thread() -> None:
    """Pin this forked rank to one intra-op thread, and keep it there.

    OpenMP is not fork-safe: once the parent has used its thread pool (any sizeable torch op), a
    forked child that asks OpenMP for more than one thread hangs in its next parallel op (a
    matmul after ``torch.set_num_threads(2)`` never returns). Libraries raise the count on their
    own: Lightning's launcher calls ``torch.set_num_threads(cpus // processes)`` unless
    ``OMP_NUM_THREADS`` is set. So the variable is set to 1, and ``torch.set_num_threads`` with
    more than one thread raises a clear error in a forked rank instead of hanging. Under
    ``torchrun`` (no fork) none of this applies.
    """
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    allowed = torch.set_num_threads

    def set_num_threads(n: int) -> None:
        if n != 1:
            raise RuntimeError(
                f"torch.set_num_threads({n}) in a rank forked by cai_labs.launch: a forked rank "
                "computes on one thread (OpenMP's pool does not survive fork and would hang). "
                "Use more ranks, or run the script under torchrun for multi-threaded ranks."
            )
        allowed(1)

    torch.set_num_threads = set_num_threads


def _send(conn: connection.Connection, message: tuple) -> None:
    """Send with plain pickle: multiprocessing's pickler would share tensor storage through
    file descriptors that vanish when the child exits; plain pickle copies the bytes."""
    conn.send_bytes(pickle.dumps(message))


def _stop_all(procs: list) -> None:
    """Terminate, then kill, every child still alive, and reap them all."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 3.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str | None = None,
    timeout: float = 600.0,
    collective_timeout: float = 60.0,
    **kwargs: Any,
) -> Any:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks and return rank 0's result.

    Inside ``fn`` the default process group is initialised: use ``torch.distributed`` as usual
    and :func:`rank_info` for the rank, world size and device.

    Args:
        fn: the worker. Defined anywhere (a page, a notebook, a module): the children are forked.
        world_size: number of ranks, 1 or more. More ranks than cores works (gloo), just slower.
        backend: by default ``cpu:gloo,cuda:nccl`` when ``world_size`` GPUs are visible, else
            ``gloo`` (``CAI_LABS_BACKEND`` overrides the default).
        timeout: seconds for the whole call before every rank is stopped. The environment
            variable ``CAI_LABS_LAUNCH_TIMEOUT`` caps it (the docs build sets it, so that a page
            that hangs fails within minutes whatever its own ``timeout=``).
        collective_timeout: seconds one collective may wait for its peers.

    Raises:
        RankFailed: a rank raised or died; carries that rank's traceback.
        LaunchTimeout: the call outlived ``timeout``.
        ValueError: ``world_size`` < 1, or more than ``torchrun``'s ``WORLD_SIZE``.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer; got {world_size!r}")
    cap = os.environ.get("CAI_LABS_LAUNCH_TIMEOUT")
    if cap:
        timeout = min(timeout, float(cap))
    if under_torchrun():
        return run_under_torchrun(
            fn, world_size, args, kwargs, backend, collective_timeout, timeout
        )
    backend = pick_backend(world_size, backend)
    ctx = get_context("fork")
    workdir = tempfile.mkdtemp(prefix="cai_labs_launch_")
    store_path = os.path.join(workdir, "store")  # the FileStore creates it
    stack_paths = [os.path.join(workdir, f"stacks.rank{rank}") for rank in range(world_size)]
    procs, conns = [], []
    try:
        for rank in range(world_size):
            parent_end, child_end = ctx.Pipe(duplex=True)
            p = ctx.Process(
                target=_worker,
                args=(
                    rank,
                    world_size,
                    backend,
                    store_path,
                    collective_timeout,
                    child_end,
                    stack_paths[rank],
                    fn,
                    args,
                    kwargs,
                ),
                name=f"cai_labs-rank{rank}",
            )
            p.start()
            child_end.close()
            procs.append(p)
            conns.append(parent_end)
        return _collect(procs, conns, timeout, stack_paths)
    finally:
        for c in conns:  # EOF tells finished ranks to exit
            c.close()
        _stop_all(procs)
        shutil.rmtree(workdir, ignore_errors=True)


def _collect(procs: list, conns: list, timeout: float, stack_paths: list[str]) -> Any:
    """Wait for every rank's report; fail fast on the first error, death, or the deadline."""
    deadline = time.monotonic() + timeout
    pending = {c: rank for rank, c in enumerate(conns)}
    sentinels = {p.sentinel: rank for rank, p in enumerate(procs)}
    result, rank0_output = None, ""
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            waiting = sorted(pending.values())
            raise LaunchTimeout(
                f"ranks {waiting} did not finish within {timeout:g} s and were stopped; "
                "raise `timeout=` if the work is just long, or look for a rank stuck in a "
                "collective its peers never call. Where each rank was:\n"
                + _stacks({r: procs[r] for r in waiting}, stack_paths)
            )
        ready = connection.wait(list(pending) + list(sentinels), timeout=min(left, 1.0))
        for obj in ready:
            if obj in pending:
                rank = pending.pop(obj)
                try:
                    status, _, payload, output = pickle.loads(obj.recv_bytes())
                except EOFError:
                    status, payload, output = "error", _death_note(procs[rank]), ""
                if status == "error":
                    sys.stdout.write(output)
                    rank, payload = _root_cause(rank, payload, pending)
                    raise RankFailed(rank, payload)
                if rank == 0:
                    result, rank0_output = payload, output
            elif obj in sentinels:
                rank = sentinels.pop(obj)
                conn = conns[rank]
                if conn in pending and not conn.poll(0.2):
                    pending.pop(conn)
                    raise RankFailed(rank, _death_note(procs[rank]))
    sys.stdout.write(rank0_output)
    return result


_PEER_LOSS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _root_cause(rank: int, tb: str, pending: dict) -> tuple[int, str]:
    """When one rank fails, its peers soon fail too ("connection closed by peer").

    Give the others half a second to report and prefer an error that is not merely the loss of a
    peer, so the traceback shown is the one that explains the failure.
    """
    errors = [(rank, tb)]
    end = time.monotonic() + 0.5
    while pending and time.monotonic() < end:
        for conn in connection.wait(list(pending), timeout=max(0.0, end - time.monotonic())):
            r = pending.pop(conn)
            with contextlib.suppress(EOFError):
                status, _, payload, _ = pickle.loads(conn.recv_bytes())
                if status == "error":
                    errors.append((r, payload))
    for r, t in errors:
        if not any(marker in t for marker in _PEER_LOSS):
            return r, t
    return errors[0]


def _stacks(procs: dict[int, Any], stack_paths: list[str], wait: float = 1.0) -> str:
    """Ask each rank's faulthandler for its threads' stacks (SIGUSR1) and read what it wrote."""
    for p in procs.values():
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(p.pid, signal.SIGUSR1)
    deadline = time.monotonic() + wait
    out = {}
    while time.monotonic() < deadline:
        for rank in procs:
            with contextlib.suppress(OSError), open(stack_paths[rank]) as f:
                out[rank] = f.read()
        if all(out.get(rank) for rank in procs):
            break
        time.sleep(0.05)
    silent = "(no stack: the rank did not answer)"
    return "\n".join(
        f"--- rank {rank} ---\n{traceback_form(out.get(rank) or silent)}" for rank in procs
    )


_FAULTHANDLER_FRAME = re.compile(r'^(\s*File ".*", line \d+) in ', re.M)


def traceback_form(stack: str) -> str:
    """faulthandler's frames (``File "x", line 3 in f``) written as a traceback's
    (``File "x", line 3, in f``): Pygments' traceback lexer, which sphinx-gallery uses for a
    page's exception, loops forever on the former and would hang the docs build."""
    return _FAULTHANDLER_FRAME.sub(r"\1, in ", stack)


def _death_note(proc: BaseProcess) -> str:
    proc.join(1.0)
    code = proc.exitcode
    how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    return f"the process died ({how}) before reporting a result or an exception"


quiet_other_ranks()
