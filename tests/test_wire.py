"""Bytes measured on the wire (TCP counters) equal the algorithms' traffic, header by header."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist

from cai_labs import Ledger, launch, wire
from cai_labs.ledger import comm_totals

M = 1 << 20  # bytes of the full buffer of every collective below
GLOO_HEADER = 48  # gloo's TCP transport prefixes every message with six 8-byte fields

pytestmark = pytest.mark.skipif(not wire.available(), reason="no TCP_INFO byte counters here")


def _ops(n: int, r: int) -> dict:
    f = M // 4  # float32 elements of the full buffer
    return {
        "all_reduce": lambda: dist.all_reduce(torch.ones(f)),
        "all_gather": lambda: dist.all_gather(
            [torch.empty(f // n) for _ in range(n)], torch.ones(f // n)
        ),
        "all_gather_into_tensor": lambda: dist.all_gather_into_tensor(
            torch.empty(f), torch.ones(f // n)
        ),
        "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(
            torch.empty(f // n), torch.ones(f)
        ),
        "all_to_all_single": lambda: dist.all_to_all_single(torch.empty(f), torch.ones(f)),
        "all_to_all": lambda: dist.all_to_all(
            list(torch.empty(f).chunk(n)), list(torch.ones(f).chunk(n))
        ),
        "send": lambda: (
            dist.send(torch.ones(f), dst=1)
            if r == 0
            else dist.recv(torch.empty(f), src=0)
            if r == 1
            else None
        ),
        "broadcast": lambda: dist.broadcast(torch.ones(f), src=0),
    }


def _each_op() -> list[dict]:
    n, r = dist.get_world_size(), dist.get_rank()
    dist.all_reduce(torch.ones(1))  # connections up before anything is counted
    out = {}
    for name, fn in _ops(n, r).items():
        with Ledger(track_activations=False) as ledger:
            fn()
        rep = ledger.report()
        out[name] = {"call": rep["comm"][0]["wire_sent"] if rep["comm"] else 0, **rep["wire"]}
    every = [None] * n
    dist.all_gather_object(every, out)
    return every


def broadcast_children(rank: int, n: int) -> int:
    """Ranks ``rank`` forwards to in gloo's binomial-tree broadcast from root 0."""
    return sum(1 for k in range(max(n, 1).bit_length()) if 2**k > rank and rank + 2**k < n)


def expected_sent(op: str, rank: int, n: int) -> int:
    """Payload bytes rank ``rank`` sends for ``op`` on an ``M``-byte buffer under gloo."""
    ring = {
        "all_reduce": 2 * (n - 1) / n,
        # gloo has no reduce-scatter: torch's gloo backend all-reduces the whole buffer and
        # keeps its chunk, so it sends what an all-reduce sends, twice the ring's (N-1)/N.
        "reduce_scatter_tensor": 2 * (n - 1) / n,
        "all_gather": (n - 1) / n,
        "all_gather_into_tensor": (n - 1) / n,
        "all_to_all": (n - 1) / n,
        "all_to_all_single": (n - 1) / n,
    }
    if op in ring:
        return round(ring[op] * M)
    if op == "send":
        return M if rank == 0 else 0
    assert op == "broadcast"
    return broadcast_children(rank, n) * M


def check_headers(measured: int, expected: int, what: str) -> None:
    """``measured`` is ``expected`` plus whole gloo headers (a few per call, never payload)."""
    extra = measured - expected
    assert 0 <= extra <= 64 * GLOO_HEADER and extra % GLOO_HEADER == 0, (what, measured, extra)


@pytest.mark.parametrize("n", [2, 4])
def test_wire_bytes_equal_each_algorithm(n):
    every = launch(_each_op, n, timeout=120)
    for rank, per_op in enumerate(every):
        for op, got in per_op.items():
            want = expected_sent(op, rank, n)
            assert got["measured"], got
            check_headers(got["call"], want, (op, rank, "per call"))
            check_headers(got["sent"], want, (op, rank, "settled total"))
            assert got["store_sent"] == 0  # launch rendezvous through a file, not a TCP store
    # What the group sent, it received; a peer's last headers may land after a rank closed its
    # ledger (or its next call's before), so the two sides agree to a few headers.
    sent = sum(r[op]["sent"] for r in every for op in r)
    received = sum(r[op]["received"] for r in every for op in r)
    assert abs(sent - received) <= 16 * n * GLOO_HEADER, (sent, received)


def test_broadcast_tree_children():
    # root 0 of 4: sends to 1 then 2; rank 1 forwards to 3 (log2 N sends from the root)
    assert [broadcast_children(r, 4) for r in range(4)] == [2, 1, 0, 0]
    assert broadcast_children(0, 8) == 3 == math.log2(8)


def test_double_counted_sockets_are_caught(monkeypatch):
    """The check catches a counter that lists a socket twice (its dup'd fd, say)."""
    real = wire.WireCounter._sockets

    def twice(self):
        socks = real(self)
        return socks + [(socket.socket(fileno=os.dup(s.fileno())), st) for s, st in socks]

    monkeypatch.setattr(wire.WireCounter, "_sockets", twice)
    every = launch(_each_op, 2, timeout=120)
    with pytest.raises(AssertionError):
        check_headers(every[0]["all_reduce"]["sent"], expected_sent("all_reduce", 0, 2), "x")


def _store_worker(port: int) -> list[dict]:
    os.environ["MASTER_PORT"] = str(port)
    r = dist.get_rank()
    store = dist.TCPStore("127.0.0.1", port, dist.get_world_size(), is_master=r == 0)
    dist.all_reduce(torch.ones(1))
    with Ledger(track_activations=False) as ledger:
        store.set(f"key{r}", b"x" * 100_000)
        dist.all_reduce(torch.ones(M // 4))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, ledger.report()["wire"])
    return every


def test_store_traffic_is_counted_apart():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    every = launch(_store_worker, 2, port, timeout=60)
    for rank, w in enumerate(every):
        check_headers(w["sent"], expected_sent("all_reduce", rank, 2), rank)
    assert every[1]["store_sent"] >= 100_000  # the client's value went to rank 0's store


def test_not_measured_where_counters_are_missing(monkeypatch):
    monkeypatch.setattr(wire, "_AVAILABLE", False)
    with Ledger() as ledger:
        pass
    rep = ledger.report()
    assert rep["wire"]["measured"] is False and "not available" in rep["wire"]["why"]
    rep["comm"] = [
        {"op": "all_reduce", "bytes": 8, "wire_sent": None, "modeled_sent_bytes": 8, "seconds": 0}
    ]
    assert comm_totals(rep)["all_reduce"]["wire_sent"] is None
