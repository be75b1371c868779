"""A forked rank leaves out the sockets it inherited: in a notebook those are the kernel's."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist

from cai_labs import Ledger, launch


def _sent_while_the_parent_talks() -> int:
    """Rank 0 sends 1 MiB on a socket the parent opened, then the ranks all-reduce 4 KiB."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()

    def worker() -> int:
        with Ledger(track_activations=False) as ledger:
            if dist.get_rank() == 0:
                client.sendall(b"x" * 2**20)  # the parent's traffic, on an inherited socket
            dist.all_reduce(torch.ones(1024))
        return ledger.report()["wire"]["sent"]

    try:
        return launch(worker, 2)
    finally:
        for s in (client, peer, server):
            s.close()


def test_traffic_on_an_inherited_socket_is_not_counted():
    """The ranks' measured bytes leave out the parent's socket (a Jupyter kernel's channels are
    such sockets): a 4 KiB all-reduce plus headers, not the megabyte."""
    assert _sent_while_the_parent_talks() < 2**20


def test_counting_inherited_sockets_is_caught(monkeypatch):
    import cai_labs.launcher

    monkeypatch.setattr(cai_labs.launcher, "forget_inherited_sockets", lambda: None)
    assert _sent_while_the_parent_talks() >= 2**20
