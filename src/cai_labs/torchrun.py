"""``launch(fn, n)`` under torchrun: run ``fn`` on a process group of the first ``n`` ranks.

A page launches several world sizes (2, 4, 8 ranks) one after another; torchrun starts one fixed
set of processes. So each ``launch`` call builds a fresh default process group of the first
``n`` ranks on its own key prefix of torchrun's store, runs ``fn`` there, destroys the group, and
rank 0 hands its result to every rank through the store. Ranks ``>= n`` take no part in the
group and wait for that result. Every process runs the page's code in the same order, so the
``k``-th launch is the same call on every rank.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist

from cai_labs.devices import pick_backend, to_host, use_rank_device
from cai_labs.errors import RankFailed

__all__ = ["run_under_torchrun", "under_torchrun", "quiet_other_ranks"]

_state: dict[str, Any] = {"stores": {}, "launches": 0}


def under_torchrun() -> bool:
    """True when this process was started by ``torchrun`` (or any launcher that sets the env)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def quiet_other_ranks() -> None:
    """Under torchrun, silence stdout of every rank but 0, so a page prints once, not N times.

    ``CAI_LABS_ALL_RANKS_PRINT=1`` keeps every rank's output (for debugging one rank).
    """
    everyone = os.environ.get("CAI_LABS_ALL_RANKS_PRINT") == "1"
    if under_torchrun() and os.environ["RANK"] != "0" and not everyone:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


def _store(timeout: float) -> dist.Store:
    """torchrun's key-value store (its agent's, or rank 0's), joined once per process."""
    where = (os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))
    if where not in _state["stores"]:
        wait = datetime.timedelta(seconds=timeout)
        _state["stores"][where] = next(dist.rendezvous("env://", timeout=wait))[0]
    return _state["stores"][where]


@contextlib.contextmanager
def _as_rank(rank: int, world_size: int) -> Iterator[None]:
    """Libraries inside ``fn`` (Lightning, DDP) read RANK and WORLD_SIZE: show them the group."""
    saved = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE")}
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    try:
        yield
    finally:
        os.environ.update(saved)


def run_under_torchrun(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple,
    kwargs: dict,
    backend: str | None,
    collective_timeout: float,
    timeout: float,
) -> Any:
    """Run ``fn`` on ranks ``0..world_size-1`` of this torchrun job; every rank gets rank 0's
    result. ``world_size`` larger than torchrun's ``WORLD_SIZE`` is an error that says what to
    start."""
    env_world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world_size > env_world:
        raise ValueError(
            f"launch(fn, {world_size}) needs {world_size} ranks, but torchrun started "
            f"WORLD_SIZE={env_world}: start torchrun with at least {world_size} processes in "
            f"total (e.g. --nproc-per-node={world_size}) or ask for at most {env_world} ranks"
        )
    if dist.is_initialized():
        raise RuntimeError(
            "launch() under torchrun builds its own process group for each call: do not call "
            "torch.distributed.init_process_group yourself before it"
        )
    _state["launches"] += 1
    store = dist.PrefixStore(f"cai_labs/launch{_state['launches']}/", _store(timeout))
    if rank < world_size:
        args, kwargs = _rank0_arguments(store, rank, args, kwargs, timeout)
        _run_member(fn, rank, world_size, args, kwargs, backend, collective_timeout, store)
    store.wait(["result"], datetime.timedelta(seconds=timeout))
    status, payload = pickle.loads(_get_large(store, "result"))
    if status == "error":
        raise RankFailed(0, payload)
    return payload


def _rank0_arguments(
    store: dist.Store, rank: int, args: tuple, kwargs: dict, timeout: float
) -> tuple[tuple, dict]:
    """Every member gets rank 0's arguments, as forked ranks get their parent's: each process
    computed its own in the page's serial cells, and a search with a time limit (the
    auto-parallel solver) may not find the same answer twice. Arguments that do not pickle
    stay each process's own."""
    if rank == 0:
        try:
            data = pickle.dumps(("rank0", args, kwargs))
        except Exception:  # noqa: BLE001 - a lambda, a live object: keep each process's own
            data = pickle.dumps(("local", None, None))
        _set_large(store, "args", data)
        return args, kwargs
    store.wait(["args"], datetime.timedelta(seconds=timeout))
    whose, args0, kwargs0 = pickle.loads(_get_large(store, "args"))
    return (args0, kwargs0) if whose == "rank0" else (args, kwargs)


def _run_member(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: tuple,
    kwargs: dict,
    backend: str | None,
    collective_timeout: float,
    store: dist.Store,
) -> None:
    """Join this launch's group, run ``fn``; rank 0 posts its result (or its traceback)."""
    backend = pick_backend(world_size, backend, local=True)
    use_rank_device(backend, int(os.environ["LOCAL_RANK"]))
    group_store = dist.PrefixStore("group/", store)
    with _as_rank(rank, world_size):
        dist.init_process_group(
            backend,
            store=group_store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_timeout),
        )
        try:
            result = ("ok", to_host(fn(*args, **kwargs)))
            dist.barrier()  # no rank closes its sockets while a peer still uses them
        except BaseException:
            if rank != 0:
                raise  # torchrun's agent ends the job when this process exits with the error
            result = ("error", traceback.format_exc())
        finally:
            dist.destroy_process_group()
    if rank == 0:
        _set_large(store, "result", pickle.dumps(result))


_PIECE = 4 * 2**20  # a store message holds at most 8 MiB; results may be larger


def _set_large(store: dist.Store, key: str, data: bytes) -> None:
    """Store ``data`` under ``key`` in pieces; ``key`` itself, set last, holds their count."""
    pieces = range(0, max(len(data), 1), _PIECE)
    for i, start in enumerate(pieces):
        store.set(f"{key}/{i}", data[start : start + _PIECE])
    store.set(key, str(len(pieces)))


def _get_large(store: dist.Store, key: str) -> bytes:
    count = int(store.get(key))
    return b"".join(store.get(f"{key}/{i}") for i in range(count))
