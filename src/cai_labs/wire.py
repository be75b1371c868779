"""Bytes this process really put on the wire, read from the kernel's TCP counters.

A collective's buffer size says how big its tensor was; what a rank sends depends on the
backend's algorithm (gloo's broadcast is a binomial tree, not a ring). Linux keeps per TCP socket
the payload bytes transmitted (``tcpi_bytes_sent``, retransmissions included, which
``tcpi_bytes_retrans`` counts apart), the bytes queued but not yet transmitted
(``tcpi_notsent_bytes``) and the bytes received (``tcpi_bytes_received``), readable with
``getsockopt(TCP_INFO)``. A :class:`WireCounter` sums them over this process's TCP sockets, found
through ``/proc/self/fd``. Counts are TCP payload: the backend's own message headers are included,
IP and TCP headers are not.

Sockets of the rendezvous store (a ``TCPStore`` at ``MASTER_PORT``) carry keys, not tensors;
they are counted apart, as ``store_sent``/``store_received``. Where ``TCP_INFO`` is not available
(not Linux, an old kernel) or the traffic does not go through TCP (NCCL over NVLink or
InfiniBand), :func:`available` is False and callers report "not measured".
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass

__all__ = [
    "WireCounter",
    "WireBytes",
    "available",
    "forget_inherited_sockets",
    "GLOO_HEADER_BYTES",
    "gloo_headers",
]

_INHERITED: set[str] = set()  # socket inodes a forked rank got from its parent


def forget_inherited_sockets() -> None:
    """In a freshly forked rank: leave out of every count the sockets it inherited (a Jupyter
    kernel's channels, a test server's), which carry the parent's traffic, not this rank's."""
    _INHERITED.clear()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:"):
                _INHERITED.add(link)


#: gloo's TCP transport sends six 8-byte fields (size, opcode, slot, offsets) before each message.
GLOO_HEADER_BYTES = 48

# Offsets in Linux's struct tcp_info (include/uapi/linux/tcp.h); bytes_sent needs Linux >= 4.19.
_UNACKED, _BYTES_RECEIVED, _NOTSENT = 24, 128, 144
_BYTES_SENT, _BYTES_RETRANS, _INFO_LEN = 200, 208, 216


@dataclass(frozen=True)
class WireBytes:
    """Payload bytes sent and received, on the group's sockets and on the store's."""

    sent: int = 0
    received: int = 0
    store_sent: int = 0
    store_received: int = 0

    def __sub__(self, other: WireBytes) -> WireBytes:
        return WireBytes(
            self.sent - other.sent,
            self.received - other.received,
            self.store_sent - other.store_sent,
            self.store_received - other.store_received,
        )


def gloo_headers(measured: int, payload: int) -> int | None:
    """How many gloo message headers ``measured`` holds on top of ``payload`` bytes.

    None when the difference is negative or not a whole number of headers: then the measured
    bytes are not the payload plus framing, and the payload model is wrong.
    """
    extra = measured - payload
    if extra < 0 or extra % GLOO_HEADER_BYTES:
        return None
    return extra // GLOO_HEADER_BYTES


def _info(sock: socket.socket) -> tuple[int, int, int, int] | None:
    """(unique bytes handed to TCP, bytes received, unacked segments, not-sent bytes)."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    except OSError:
        return None
    if len(raw) < _INFO_LEN:
        return None
    (unacked,) = struct.unpack_from("I", raw, _UNACKED)
    (received,) = struct.unpack_from("Q", raw, _BYTES_RECEIVED)
    (notsent,) = struct.unpack_from("I", raw, _NOTSENT)
    sent, retrans = struct.unpack_from("QQ", raw, _BYTES_SENT)
    return sent - retrans + notsent, received, unacked, notsent


def _probe() -> bool:
    if not sys.platform.startswith("linux") or not hasattr(socket, "TCP_INFO"):
        return False
    if not os.path.isdir("/proc/self/fd"):
        return False
    with socket.socket() as s:
        return _info(s) is not None


_AVAILABLE: bool | None = None


def available() -> bool:
    """True when this platform exposes per-socket byte counters (Linux ``TCP_INFO``)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = _probe()
    return _AVAILABLE


class WireCounter:
    """Reads the byte counters of this process's TCP sockets.

    ``read()`` returns the totals now; the difference of two reads is what happened between
    them. The sockets are found by :meth:`scan` (reading ``/proc`` is slow, a few milliseconds
    on some kernels) and held until :meth:`close`; a read with ``rescan=True`` also counts
    sockets opened since, from zero. Keep a counter's reads within the life of the process
    group, and close it when done.

    Args:
        store_ports: ports whose sockets belong to the rendezvous store (default: ``MASTER_PORT``).
    """

    def __init__(self, store_ports: set[int] | None = None) -> None:
        if store_ports is None:
            port = os.environ.get("MASTER_PORT", "")
            store_ports = {int(port)} if port.isdigit() else set()
        self.store_ports = store_ports
        self._kind: dict[str, bool | None] = {}  # socket inode -> is_store (None: not TCP)
        self._held: list[tuple[socket.socket, bool]] = []  # duplicates of the sockets read
        self._scanned = False

    def _sockets(self) -> list[tuple[socket.socket, bool]]:
        """This process's TCP sockets (each a dup to close), with whether it is the store's."""
        links: dict[str, int] = {}  # inode -> one fd; listed before any dup can join the list
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/self/fd/{fd}")
                ours = link.startswith("socket:") and link not in _INHERITED
                if ours and self._kind.get(link, False) is not None:
                    links.setdefault(link, int(fd))
        out = []
        for link, fd in links.items():
            try:
                sock = socket.socket(fileno=os.dup(fd))
            except OSError:  # closed meanwhile
                continue
            try:
                if link not in self._kind:
                    self._kind[link] = self._classify(sock)
            except OSError:  # not connected (yet): carries no data now
                self._kind.pop(link, None)
            if self._kind.get(link) is None:
                sock.close()
                continue
            out.append((sock, bool(self._kind[link])))
        return out

    def _classify(self, sock: socket.socket) -> bool | None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            return None
        ports = {sock.getsockname()[1], sock.getpeername()[1]}  # OSError: not connected
        return bool(ports & self.store_ports)

    def scan(self) -> None:
        """Find this process's TCP sockets now (slow: it reads ``/proc``) and hold a duplicate
        of each, so that later reads cost one ``getsockopt`` per socket."""
        self.close()
        self._held, self._scanned = self._sockets(), True

    def close(self) -> None:
        """Let go of the duplicates (a held duplicate keeps its socket open)."""
        for sock, _ in self._held:
            sock.close()
        self._held = []

    def read(self, settle: float = 0.0, rescan: bool = False) -> WireBytes:
        """Totals now, over the sockets of the last :meth:`scan` (made now if ``rescan`` or if
        none was made). With ``settle`` > 0, first wait up to that many seconds until every
        socket has transmitted its queue and has it acknowledged, so nothing is in flight."""
        if rescan or not self._scanned:
            self.scan()
        deadline = time.monotonic() + settle
        while True:
            infos = [(_info(s), is_store) for s, is_store in self._held]
            busy = any(i is not None and (i[2] or i[3]) for i, _ in infos)
            if not busy or time.monotonic() >= deadline:
                break
            time.sleep(0.0005)
        totals = [0, 0, 0, 0]
        for info, is_store in infos:
            if info is not None:
                base = 2 if is_store else 0
                totals[base] += info[0]
                totals[base + 1] += info[1]
        return WireBytes(*totals)
