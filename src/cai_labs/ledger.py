"""The ledger: what each rank communicated, what memory it held, and when it did what.

Tutorials compare measured numbers with the formulas of the papers, so measurement lives here,
once, instead of in every page. A :class:`Ledger` is a context manager used on each rank::

    with Ledger(model=model, optimizer=opt) as ledger:
        with ledger.event("forward", microbatch=0):
            loss = model(x).sum()
        loss.backward()
        ledger.snapshot("after backward")
    report = ledger.report()          # plain dicts and lists: picklable, ready for tables

Three records are kept:

**Communication.** While the ledger is open, every collective and point-to-point call made
through ``torch.distributed.<op>`` is recorded with its op, the ranks of its group, its *buffer
bytes* and its wall time. Buffer bytes are the size of the collective's full buffer, the way
``nccl-tests`` reports "size": the tensor for ``all_reduce``/``broadcast``/``send``; the gathered
output for ``all_gather``; the unreduced input for ``reduce_scatter``; the input for
``all_to_all``.

What a rank really sent is *measured*: the ledger reads the kernel's TCP counters of this
process's sockets (:mod:`cai_labs.wire`) before and after each synchronous call
(``wire_sent``, payload bytes this rank handed to TCP during the call) and, settled so nothing
is in flight, when it opens and closes (``report()["wire"]``: sent and received over the whole
ledger, the rendezvous store's sockets apart). Asynchronous calls (``isend``, ``async_op=True``)
overlap other work, so only the totals count them (``wire_sent`` is None). Where the counters
are unavailable, or a buffer lives on a GPU (NCCL does not use these sockets), the ledger says
so (``"measured": False``, ``wire_sent`` None) instead of guessing.

Each record also carries ``modeled_sent_bytes``: the ring algorithms' traffic for this buffer
(all-reduce ``2(N-1)/N * S``, all-gather, reduce-scatter and all-to-all ``(N-1)/N * S``), a
model, labelled as one. gloo's own algorithms differ for some ops (its broadcast is a binomial
tree; its reduce-scatter all-reduces the whole buffer), and every gloo message carries a 48-byte
header, which is why the measured bytes are the ones to show. Calls made inside PyTorch's C++
(DDP's reducer) are not recorded one by one, but their bytes are in the measured totals.

**Memory.** Bytes of parameters, gradients and optimizer state of the watched model/optimizer at
each :meth:`Ledger.snapshot`, and the bytes of activations saved for backward, counted through
:func:`torch.autograd.graph.saved_tensors_hooks` as they are saved and freed (parameters saved
by an op are not activations and are not counted; activations recomputed by activation
checkpointing are never saved and so are not counted). ``peak_total`` is the largest sum of the
categories seen at any save or snapshot. On CUDA the allocator's own peak is reported as well.

**Timeline.** Named events with start and end times on the machine's monotonic clock, which all
ranks of one machine share, so events of different ranks can be drawn on one Gantt chart.
"""

from __future__ import annotations

import contextlib
import functools
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cai_labs import wire as _wire

__all__ = [
    "Ledger",
    "tensor_bytes",
    "comm_totals",
    "gather_reports",
    "ring_sent_bytes",
    "wire_by_kind",
]

# Collective name -> how to find its buffer in (args, kwargs) and its ring traffic factor.
_RING = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "all_gather_into_tensor": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "reduce_scatter_tensor": lambda n: (n - 1) / n,
    "reduce_scatter_single": lambda n: (n - 1) / n,
    "all_gather_single": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "all_to_all_single": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0 if n > 1 else 0.0,
    "reduce": lambda n: 1.0 if n > 1 else 0.0,
    "gather": lambda n: (n - 1) / n,
    "scatter": lambda n: (n - 1) / n,
    "send": lambda n: 1.0,
    "isend": lambda n: 1.0,
    "recv": lambda n: 0.0,
    "irecv": lambda n: 0.0,
    "barrier": lambda n: 0.0,
}


def tensor_bytes(tensors: torch.Tensor | Iterable[torch.Tensor] | None) -> int:
    """Bytes held by ``tensors``, each storage counted once (views and ties share storage)."""
    if tensors is None:
        return 0
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def ring_sent_bytes(op: str, nbytes: int, group_size: int) -> int:
    """Bytes one rank sends for ``op`` on a ``nbytes`` buffer under ring algorithms."""
    return int(round(_RING[op](group_size) * nbytes)) if group_size > 0 else 0


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _buffer_bytes(op: str, args: tuple, kwargs: dict) -> int:
    """The buffer size (see module docstring) of one call of ``op``."""

    def arg(i: int, name: str) -> Any:
        return kwargs[name] if name in kwargs else (args[i] if len(args) > i else None)

    if op in ("all_reduce", "broadcast", "reduce", "send", "isend", "recv", "irecv"):
        return _nbytes(arg(0, "tensor"))
    if op == "all_gather":
        return _nbytes(arg(0, "tensor_list"))
    if op in ("all_gather_into_tensor", "all_gather_single"):
        return _nbytes(arg(0, "output_tensor"))
    if op == "reduce_scatter":
        return _nbytes(arg(1, "input_list"))
    if op in ("reduce_scatter_tensor", "reduce_scatter_single"):
        return _nbytes(arg(1, "input"))
    if op == "all_to_all":
        return _nbytes(arg(1, "input_tensor_list"))
    if op == "all_to_all_single":
        return _nbytes(arg(1, "input"))
    if op == "gather":
        return _nbytes(arg(1, "gather_list")) or _nbytes(arg(0, "tensor")) * _size(kwargs)
    if op == "scatter":
        return _nbytes(arg(1, "scatter_list")) or _nbytes(arg(0, "tensor")) * _size(kwargs)
    return 0


def _size(kwargs: dict) -> int:
    return dist.get_world_size(kwargs.get("group"))


def _group_of(op: str, args: tuple, kwargs: dict) -> Any:
    if "group" in kwargs:
        return kwargs["group"]
    # Positional group index per signature (after the tensors and op/src/dst arguments).
    positions = {
        "all_reduce": 2,
        "broadcast": 2,
        "reduce": 3,
        "all_gather": 2,
        "all_gather_into_tensor": 2,
        "reduce_scatter": 3,
        "reduce_scatter_tensor": 3,
        "all_to_all": 2,
        "all_to_all_single": 4,
        "send": 2,
        "isend": 2,
        "recv": 2,
        "irecv": 2,
        "barrier": 0,
        "gather": 3,
        "scatter": 3,
    }
    i = positions.get(op)
    return args[i] if i is not None and len(args) > i else None


_SETTLE = 0.5  # seconds to wait, at most, for in-flight bytes to be acknowledged


def _on_host(args: tuple, kwargs: dict) -> bool:
    """True when no tensor argument lives on a GPU (whose traffic bypasses the TCP counters)."""

    def tensors(x: Any) -> Iterator[torch.Tensor]:
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            for t in x:
                yield from tensors(t)

    return all(t.device.type == "cpu" for a in (*args, *kwargs.values()) for t in tensors(a))


class _Saved:
    """What autograd keeps for one saved activation while the ledger is open."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class Ledger:
    """Per-rank record of communication, memory and a timeline; see the module docstring.

    Args:
        model: module whose parameters and gradients are accounted (optional; see :meth:`watch`).
        optimizer: optimizer whose state is accounted (optional).
        track_activations: count activations saved for backward while the ledger is open.
        wire: read the sockets' byte counters around each call (off: only buffer bytes and
            seconds are recorded, for timing without the counters' cost).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        track_activations: bool = True,
        wire: bool = True,
    ) -> None:
        self._params: list[torch.Tensor] = []
        self._optimizers: list[torch.optim.Optimizer] = []
        self._extra: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.watch(model=model, optimizer=optimizer)
        self.track_activations = track_activations
        self.comm: list[dict[str, Any]] = []
        self.timeline: list[dict[str, Any]] = []
        self.snapshots: list[dict[str, Any]] = []
        self._live: dict[int, list[int]] = {}  # storage ptr -> [bytes, refcount]
        self.live_activations = 0
        self.peak_activations = 0
        self.peak_total = 0
        self._static = 0
        self._param_ptr_cache: set[int] = set()
        self._stack: contextlib.ExitStack | None = None
        self._patched: dict[str, Any] = {}
        self._wire = _wire.WireCounter() if wire and _wire.available() else None
        self._wire_start: _wire.WireBytes | None = None
        self._wire_total: _wire.WireBytes | None = None
        self._in_flight: list[Any] = []  # work handles of asynchronous sends not known done
        self.t0 = time.perf_counter()

    # -- what to account ---------------------------------------------------------------
    def watch(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **tensors: Iterable[torch.Tensor],
    ) -> Ledger:
        """Add a model's parameters, an optimizer's state, or named extra tensor categories.

        Extra categories (``ledger.watch(buffers=[...])``) appear in snapshots under their name;
        ZeRO and offload use them for flat shards and pinned host copies.
        """
        if model is not None:
            self._params.extend(model.parameters())
        if optimizer is not None:
            self._optimizers.append(optimizer)
        for name, ts in tensors.items():
            self._extra[name].extend(ts)
        return self

    def _param_ptrs(self) -> set[int]:
        return {p.untyped_storage().data_ptr() for p in self._params}

    def memory(self) -> dict[str, int]:
        """Bytes per category right now (parameters, gradients, optimizer state, extras)."""
        out = {
            "params": tensor_bytes(self._params),
            "grads": tensor_bytes(p.grad for p in self._params if p.grad is not None),
            "optimizer": tensor_bytes(
                v
                for opt in self._optimizers
                for state in opt.state.values()
                for v in state.values()
                if isinstance(v, torch.Tensor)
            ),
        }
        for name, ts in self._extra.items():
            out[name] = tensor_bytes(ts)
        return out

    def snapshot(self, tag: str) -> dict[str, int]:
        """Record the memory account now under ``tag``; returns it."""
        mem = self.memory()
        self._static = sum(mem.values())
        mem["activations"] = self.live_activations
        mem["total"] = self._static + self.live_activations
        self.peak_total = max(self.peak_total, mem["total"])
        self.snapshots.append({"tag": tag, "t": time.perf_counter() - self.t0, **mem})
        return mem

    # -- activations ---------------------------------------------------------------------
    def _pack(self, t: torch.Tensor) -> Any:
        if t.device.type == "meta":
            return t
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in self._param_ptr_cache:
            return t
        entry = self._live.get(ptr)
        if entry is None:
            self._live[ptr] = [st.nbytes(), 1]
            self.live_activations += st.nbytes()
            self.peak_activations = max(self.peak_activations, self.live_activations)
            self.peak_total = max(self.peak_total, self._static + self.live_activations)
        else:
            entry[1] += 1
        # Autograd holds the packed object exactly as long as it keeps the activation for
        # backward; its end (not the tensor's, which the caller may still hold) frees the count.
        # Detached: an op's saved *output* would otherwise hold its own grad_fn, a cycle that
        # outlives the graph once backward kept it (retain_graph=True) and is never freed.
        saved = _Saved(t.detach())
        weakref.finalize(saved, self._release, ptr)
        return saved

    @staticmethod
    def _unpack(saved: Any) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, ptr: int) -> None:
        entry = self._live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live_activations -= entry[0]
            del self._live[ptr]

    # -- communication ---------------------------------------------------------------------
    def _wrap(self, op: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            group = _group_of(op, args, kwargs)
            is_async = bool(kwargs.get("async_op")) or op in ("isend", "irecv")
            # A send still in flight from an earlier asynchronous call would be counted here.
            self._in_flight = [w for w in self._in_flight if not w.is_completed()]
            alone = not is_async and not self._in_flight and _on_host(args, kwargs)
            counter = self._wire if alone and self._wire_start is not None else None
            before = counter.read() if counter is not None else None
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            seconds = time.perf_counter() - start
            if is_async and op != "irecv" and hasattr(out, "is_completed"):
                self._in_flight.append(out)
            sent = (counter.read() - before).sent if counter is not None else None
            nbytes = _buffer_bytes(op, args, kwargs)
            ranks = (
                tuple(dist.get_process_group_ranks(group))
                if group is not None
                else tuple(range(dist.get_world_size()))
            )
            self.comm.append(
                {
                    "op": op,
                    "group": ranks,
                    "bytes": nbytes,
                    "wire_sent": sent,
                    "modeled_sent_bytes": ring_sent_bytes(op, nbytes, len(ranks)),
                    "seconds": seconds,
                    "t": start - self.t0,
                    "async": is_async,
                }
            )
            return out

        return recorded

    # -- timeline ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def event(self, name: str, **meta: Any) -> Iterator[None]:
        """Record ``name`` from entry to exit on the timeline, with ``meta`` (e.g. microbatch)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timeline.append({"name": name, "start": start, "end": time.perf_counter(), **meta})

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> Ledger:
        if self._wire is not None and dist.is_available() and dist.is_initialized():
            self._wire_start = self._wire.read(settle=_SETTLE, rescan=True)
        self.t0 = time.perf_counter()
        self._stack = contextlib.ExitStack()
        if dist.is_available():
            for op in _RING:
                fn = getattr(dist, op, None)
                if fn is not None:
                    self._patched[op] = fn
                    setattr(dist, op, self._wrap(op, fn))
        if self.track_activations:
            self._param_ptr_cache = self._param_ptrs()
            self._stack.enter_context(
                torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            )
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._wire is not None and self._wire_start is not None:
            self._wire_total = self._wire.read(settle=_SETTLE, rescan=True) - self._wire_start
            self._wire.close()
        for op, fn in self._patched.items():
            setattr(dist, op, fn)
        self._patched.clear()
        if self._stack is not None:
            self._stack.close()

    def wire_report(self) -> dict[str, Any]:
        """Bytes measured on this rank's sockets while the ledger was open (settled).

        ``{"measured": True, "sent", "received", "store_sent", "store_received"}``, or
        ``{"measured": False, "why": ...}`` where the counters are unavailable or the ledger
        is still open. Traffic of GPU buffers under NCCL is never in these counters.
        """
        if self._wire is None:
            return {"measured": False, "why": "TCP_INFO byte counters are off or not available"}
        if self._wire_start is None:
            return {"measured": False, "why": "no process group: nothing was sent"}
        if self._wire_total is None:
            return {"measured": False, "why": "the ledger is still open"}
        t = self._wire_total
        return {
            "measured": True,
            "sent": t.sent,
            "received": t.received,
            "store_sent": t.store_sent,
            "store_received": t.store_received,
        }

    # -- results -------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """Everything recorded, as plain data (picklable; safe to return from a worker)."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        out: dict[str, Any] = {
            "rank": rank,
            "world_size": world,
            "comm": list(self.comm),
            "memory": {
                "snapshots": list(self.snapshots),
                "peak_activations": self.peak_activations,
                "peak_total": self.peak_total,
            },
            "timeline": list(self.timeline),
            "wire": self.wire_report(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["memory"]["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
        return out


def comm_totals(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Sum communication per op.

    ``{op: {"calls", "bytes", "wire_sent", "modeled_sent_bytes", "seconds"}}``; ``wire_sent``
    (measured) is None when any call of that op was not measured one by one (asynchronous, or
    no counters): then only the ledger's total ``report["wire"]`` holds its bytes.
    """
    totals: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"calls": 0, "bytes": 0, "wire_sent": 0, "modeled_sent_bytes": 0, "seconds": 0.0}
    )
    for rec in report["comm"]:
        t = totals[rec["op"]]
        t["calls"] += 1
        t["bytes"] += rec["bytes"]
        sent = rec.get("wire_sent")
        t["wire_sent"] = None if sent is None or t["wire_sent"] is None else t["wire_sent"] + sent
        t["modeled_sent_bytes"] += rec["modeled_sent_bytes"]
        t["seconds"] += rec["seconds"]
    return dict(totals)


def wire_by_kind(
    report: dict[str, Any], kind_of: Callable[[dict[str, Any]], str]
) -> dict[str, int] | None:
    """Measured bytes sent per kind of traffic (``kind_of(record)`` names a record's kind).

    Synchronous calls are measured one by one. What asynchronous calls sent is the ledger's
    settled total minus the synchronous calls: it goes to the one kind that has asynchronous
    calls, or, when several kinds do, to one entry named by them, sorted, joined with " + " (the
    counters cannot split overlapping transfers). Bytes sent by no recorded call (DDP's C++
    reducer) appear under ``"unrecorded"``. None when the report was not measured.
    """
    if not report.get("wire", {}).get("measured") or report["wire"].get("sent") is None:
        return None
    out: dict[str, int] = defaultdict(int)
    async_kinds: list[str] = []
    for rec in report["comm"]:
        kind = kind_of(rec)
        out[kind] += 0
        if rec.get("wire_sent") is None:
            if kind not in async_kinds:
                async_kinds.append(kind)
        else:
            out[kind] += rec["wire_sent"]
    rest = report["wire"]["sent"] - sum(out.values())
    if len(async_kinds) == 1:
        out[async_kinds[0]] += rest
    elif async_kinds:
        joined = " + ".join(sorted(async_kinds))
        out[joined] = rest + sum(out.pop(k) for k in async_kinds)
    elif rest:
        out["unrecorded"] = rest
    return dict(out)


def gather_reports(report: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Collect every rank's report on rank 0 (a list in rank order); other ranks get None.

    Call it after the ledger is closed so the gathering itself is not recorded.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [report]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(report, out, dst=0)
    return out
