"""The ledger counts exactly the bytes of known collectives and the memory of known tensors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from cai_labs import Ledger, comm_totals, gather_reports, launch, tensor_bytes
from cai_labs.models import GPT, GPTConfig


def _known_collectives() -> list[dict]:
    n, r = dist.get_world_size(), dist.get_rank()
    with Ledger() as ledger:
        dist.all_reduce(torch.ones(1000))  # 4000 B
        dist.broadcast(torch.ones(10, dtype=torch.float64), src=0)  # 80 B
        out = [torch.empty(25) for _ in range(n)]
        dist.all_gather(out, torch.ones(25))  # n * 100 B
        flat = torch.empty(n * 8)
        dist.all_gather_into_tensor(flat, torch.ones(8))  # n * 32 B
        dist.reduce_scatter_tensor(torch.empty(16), torch.ones(n * 16))  # n * 64 B
        dist.all_to_all_single(torch.empty(n * 4), torch.ones(n * 4))  # n * 16 B
        if n > 1:
            if r == 0:
                dist.send(torch.ones(7, dtype=torch.int16), dst=1)  # 14 B
            elif r == 1:
                dist.recv(torch.empty(7, dtype=torch.int16), src=0)
        work = dist.all_reduce(torch.ones(3), async_op=True)  # 12 B
        work.wait()
    return gather_reports(ledger.report())


@pytest.mark.parametrize("n", [2, 4])
def test_bytes_of_known_collectives(n):
    reports = launch(_known_collectives, n)
    assert [r["rank"] for r in reports] == list(range(n))
    totals = comm_totals(reports[0])
    assert totals["all_reduce"]["bytes"] == 4012 and totals["all_reduce"]["calls"] == 2
    # the modeled (ring) traffic; tests/test_wire.py checks the measured bytes against it
    assert totals["all_reduce"]["modeled_sent_bytes"] == round(2 * (n - 1) / n * 4000) + round(
        2 * (n - 1) / n * 12
    )
    assert totals["broadcast"]["bytes"] == 80
    assert totals["all_gather"]["bytes"] == n * 100
    assert totals["all_gather"]["modeled_sent_bytes"] == (n - 1) * 100
    assert totals["all_reduce"]["wire_sent"] is None  # one call was asynchronous
    assert totals["all_gather"]["wire_sent"] >= (n - 1) * 100  # measured, headers included
    assert totals["all_gather_into_tensor"]["bytes"] == n * 32
    assert totals["reduce_scatter_tensor"]["bytes"] == n * 64
    assert totals["all_to_all_single"]["bytes"] == n * 16
    assert totals["send"]["bytes"] == 14
    assert "recv" in comm_totals(reports[1]) and "send" not in comm_totals(reports[1])
    assert reports[0]["comm"][-1]["async"] is True
    assert all(rec["group"] == tuple(range(n)) for rec in reports[0]["comm"])


def _subgroup_records() -> list:
    group = dist.new_group([0, 1])
    with Ledger() as ledger:
        if dist.get_rank() in (0, 1):
            dist.all_reduce(torch.ones(5), group=group)
    return ledger.report()["comm"]


def test_subgroup_is_recorded():
    recs = launch(_subgroup_records, 4)
    assert recs == [dict(recs[0], op="all_reduce", group=(0, 1), bytes=20)]


def test_ledger_restores_torch_distributed():
    original = dist.all_reduce
    with Ledger():
        assert dist.all_reduce is not original
    assert dist.all_reduce is original


def test_memory_account_of_a_known_model():
    model = nn.Linear(100, 50)  # 5050 float32 parameters
    opt = torch.optim.Adam(model.parameters())
    with Ledger(model=model, optimizer=opt) as ledger:
        before = ledger.snapshot("start")
        x = torch.randn(32, 100)
        h = model(x)  # saves x (32*100*4 B) for the weight gradient
        y = torch.relu(h)  # saves its output (32*50*4 B)
        during = ledger.snapshot("after forward")
        y.sum().backward()
        opt.step()
        del h, y
        after = ledger.snapshot("after step")
    assert before == {
        "params": 5050 * 4,
        "grads": 0,
        "optimizer": 0,
        "activations": 0,
        "total": 5050 * 4,
    }
    assert during["activations"] == 32 * 100 * 4 + 32 * 50 * 4
    assert after["grads"] == 5050 * 4
    # Adam keeps exp_avg and exp_avg_sq per parameter, plus a scalar step per tensor.
    assert after["optimizer"] == 2 * 5050 * 4 + 2 * 4
    assert after["activations"] == 0
    report = ledger.report()
    assert report["memory"]["peak_activations"] == 32 * 100 * 4 + 32 * 50 * 4
    assert report["memory"]["peak_total"] >= during["total"]


def test_parameters_saved_by_ops_are_not_activations():
    model = nn.Linear(10, 10, bias=False)
    with Ledger(model=model) as ledger:
        model(torch.randn(4, 10, requires_grad=True)).sum().backward()
    # Linear saves its input (4*10*4 B) and its weight; only the input is an activation.
    assert ledger.report()["memory"]["peak_activations"] == 4 * 10 * 4


def test_activations_kept_by_a_retained_graph_are_freed_with_it():
    """tanh saves its *output*: held with its grad_fn, it would keep the graph alive after a
    backward with retain_graph=True (a split backward runs that way), and never be freed."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    with Ledger(model=model) as ledger:
        out = model(torch.randn(4, 8, requires_grad=True)).sum()
        out.backward(retain_graph=True)
        assert ledger.live_activations == 2 * 4 * 8 * 4  # the input and the tanh output
        del out
        assert ledger.live_activations == 0


def test_timeline_events_are_ordered_and_carry_meta():
    with Ledger() as ledger:
        with ledger.event("forward", microbatch=0):
            torch.ones(10).sum()
        with ledger.event("backward", microbatch=0):
            pass
    ev = ledger.report()["timeline"]
    assert [e["name"] for e in ev] == ["forward", "backward"]
    assert ev[0]["microbatch"] == 0 and ev[0]["start"] <= ev[0]["end"] <= ev[1]["start"]


def test_tensor_bytes_counts_shared_storage_once():
    a = torch.zeros(100)
    assert tensor_bytes([a, a[:10], a.view(10, 10)]) == 400


def test_peak_total_includes_activations_saved_between_snapshots():
    """No snapshot while the activations live: the peak must come from the saves themselves."""
    model = nn.Linear(100, 50)  # 5050 float32 parameters
    with Ledger(model=model) as ledger:
        ledger.snapshot("start")
        y = torch.relu(model(torch.randn(256, 100)))  # saves x (256*100*4 B) and y (256*50*4 B)
        y.sum().backward()
        del y
        after = ledger.snapshot("after backward")
    acts = 256 * 100 * 4 + 256 * 50 * 4
    assert after["total"] == 2 * 5050 * 4 < 5050 * 4 + acts  # the peak is not at a snapshot
    assert ledger.report()["memory"]["peak_total"] == 5050 * 4 + acts


def _saved_activation_bytes(model: nn.Module, fn) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while ``fn()`` runs forward,
    counted by the test's own hooks (independently of the ledger)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    total = sum(seen.values())
    del out
    return total


def test_activation_peak_of_a_gpt_matches_an_independent_count():
    cfg = GPTConfig(n_layers=2, d_model=32, n_heads=4, seq_len=16)
    model = GPT(cfg, seed=0)
    x = torch.randint(
        0, cfg.vocab_size, (16, cfg.seq_len), generator=torch.Generator().manual_seed(0)
    )
    want = _saved_activation_bytes(model, lambda: model(x).logsumexp(-1).mean())
    params = sum(p.numel() * 4 for p in model.parameters())
    with Ledger(model=model) as ledger:
        ledger.snapshot("start")  # parameters only: no gradients yet
        model(x).logsumexp(-1).mean().backward()
        ledger.snapshot("after backward")  # parameters + gradients, no activations
    mem = ledger.report()["memory"]
    assert want > params  # the activations, not a snapshot, set the peak
    assert mem["peak_activations"] == want
    assert mem["peak_total"] == params + want


# -- deliberate breaks: the memory checks above fail on a plausible bug ------------------------


def _pack_without_peak_total(self, t):
    """``Ledger._pack`` with the ``peak_total`` update deleted (the audit's break)."""
    peak = self.peak_total
    out = _REAL_PACK(self, t)
    self.peak_total = peak
    return out


_REAL_PACK = Ledger._pack


@pytest.mark.parametrize(
    "check",
    [
        test_peak_total_includes_activations_saved_between_snapshots,
        test_activation_peak_of_a_gpt_matches_an_independent_count,
    ],
)
def test_peak_total_without_saved_activations_is_caught(monkeypatch, check):
    monkeypatch.setattr(Ledger, "_pack", _pack_without_peak_total)
    with pytest.raises(AssertionError):
        check()


def test_activation_undercount_is_caught(monkeypatch):
    """A ledger that counts only the first save of each op's tensors (drops relu's output)."""

    def pack_first_only(self, t):
        if getattr(self, "_dropped", False):
            return _REAL_PACK(self, t)
        self._dropped = True  # skips one storage: the count is short by its bytes
        return t

    monkeypatch.setattr(Ledger, "_pack", pack_first_only)
    with pytest.raises(AssertionError):
        test_activation_peak_of_a_gpt_matches_an_independent_count()


# -- deliberate breaks: the byte checks fail on a plausible bug ----------------------------------


def _buffer_of_one_shard(real):
    """``_buffer_bytes`` that reports an all-gather's input (one shard), not its output."""

    def buffer_bytes(op, args, kwargs):
        if op == "all_gather_into_tensor":
            return real("all_reduce", (args[1],), {})
        return real(op, args, kwargs)

    return buffer_bytes


def test_wrong_buffer_bytes_are_caught(monkeypatch):
    from cai_labs import ledger as ledger_mod

    monkeypatch.setattr(ledger_mod, "_buffer_bytes", _buffer_of_one_shard(ledger_mod._buffer_bytes))
    with pytest.raises(AssertionError):
        test_bytes_of_known_collectives(2)


# -- the accounting helpers on one process (fast; also what `nox -s mutants` runs) -------------


def _t(n: int, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(n, dtype=dtype)


# op -> (positional args as torch.distributed takes them, the buffer bytes the docstring defines)
_CALLS = {
    "all_reduce": ((_t(3),), 12),
    "broadcast": ((_t(5, torch.float64), 0), 40),
    "reduce": ((_t(7), 0), 28),
    "send": ((_t(2, torch.int16), 1), 4),
    "isend": ((_t(9), 1), 36),
    "recv": ((_t(4), 0), 16),
    "irecv": ((_t(6), 0), 24),
    "all_gather": (([_t(2), _t(2), _t(2)], _t(2)), 24),  # the gathered list
    "all_gather_into_tensor": ((_t(12), _t(4)), 48),  # the output
    "reduce_scatter": ((_t(2), [_t(2), _t(2)]), 16),  # the unreduced inputs
    "reduce_scatter_tensor": ((_t(3), _t(9)), 36),  # the input
    "all_to_all": (([_t(1), _t(1)], [_t(5), _t(5)]), 40),  # the inputs
    "all_to_all_single": ((_t(8), _t(10)), 40),  # the input
    "gather": ((_t(2), [_t(2)] * 4, 0), 32),
    "scatter": ((_t(2), [_t(2)] * 3, 0), 24),
    "barrier": ((), 0),
}


@pytest.mark.parametrize("op", sorted(_CALLS))
def test_buffer_bytes_of_each_op_positional_and_by_name(op):
    import inspect

    from cai_labs import ledger as ledger_mod

    args, want = _CALLS[op]
    assert ledger_mod._buffer_bytes(op, args, {}) == want
    # The same call with torch's own parameter names as keywords.
    names = list(inspect.signature(getattr(dist, op)).parameters)
    assert ledger_mod._buffer_bytes(op, (), dict(zip(names, args))) == want


def test_buffer_bytes_of_gather_and_scatter_off_the_root(monkeypatch):
    """Without the list (non-root ranks) the buffer is the tensor times the group size."""
    from cai_labs import ledger as ledger_mod

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 5 if group == "five" else 3)
    for op in ("gather", "scatter"):
        assert ledger_mod._buffer_bytes(op, (_t(3), None, 0), {}) == 3 * 12
        assert ledger_mod._buffer_bytes(op, (_t(3),), {"group": "five"}) == 5 * 12
        assert ledger_mod._buffer_bytes(op, (), {"tensor": _t(2), "group": "five"}) == 5 * 8
    # The ledger's names for ZeRO's flat collectives: output / input buffers as above.
    assert ledger_mod._buffer_bytes("all_gather_single", (_t(12), _t(4)), {}) == 48
    assert ledger_mod._buffer_bytes("reduce_scatter_single", (_t(3), _t(9)), {}) == 36
    assert ledger_mod._buffer_bytes("unknown_op", (_t(3),), {}) == 0
    assert ledger_mod._nbytes(("not a tensor", [_t(2), [_t(1, torch.float64)]])) == 16


@pytest.mark.parametrize("op", sorted(_CALLS))
def test_group_is_found_where_torch_puts_it(op):
    import inspect

    from cai_labs import ledger as ledger_mod

    names = list(inspect.signature(getattr(dist, op)).parameters)
    where = names.index("group")
    sentinel = object()
    args = tuple(range(where)) + (sentinel,)
    assert ledger_mod._group_of(op, args, {}) is sentinel
    assert ledger_mod._group_of(op, args[:where], {}) is None  # not given: the default group
    assert ledger_mod._group_of(op, (), {"group": sentinel}) is sentinel
    assert ledger_mod._group_of("unknown_op", args, {}) is None


def test_ring_sent_bytes_are_the_bandwidth_optimal_ring_traffic():
    from cai_labs.ledger import ring_sent_bytes

    # Independent of the table: a ring all-reduce is a reduce-scatter and an all-gather, each
    # sending N-1 of the N pieces; a broadcast/send sends the buffer once; receiving sends none.
    assert ring_sent_bytes("all_reduce", 1200, 4) == 1800
    assert ring_sent_bytes("all_gather", 1200, 4) == ring_sent_bytes("reduce_scatter", 1200, 4)
    assert ring_sent_bytes("all_gather", 1200, 4) == 900
    assert ring_sent_bytes("all_to_all_single", 1200, 3) == 800
    assert ring_sent_bytes("broadcast", 1200, 4) == ring_sent_bytes("send", 1200, 2) == 1200
    assert ring_sent_bytes("broadcast", 1200, 1) == ring_sent_bytes("recv", 1200, 2) == 0
    assert ring_sent_bytes("all_reduce", 1000, 3) == 1333  # rounded to whole bytes
    assert ring_sent_bytes("all_reduce", 1200, 0) == 0
    assert ring_sent_bytes("send", 1200, 1) == 1200  # a send sends its buffer, whatever the group


def test_comm_totals_sum_per_op():
    def rec(op, nbytes, modeled, wire, seconds):
        return {
            "op": op,
            "bytes": nbytes,
            "modeled_sent_bytes": modeled,
            "wire_sent": wire,
            "seconds": seconds,
        }

    recs = [
        rec("all_reduce", 10, 15, 63, 0.5),
        rec("send", 4, 4, None, 0.25),
        rec("all_reduce", 30, 45, 93, 1.0),
    ]
    assert comm_totals({"comm": recs}) == {
        "all_reduce": {
            "calls": 2,
            "bytes": 40,
            "wire_sent": 156,
            "modeled_sent_bytes": 60,
            "seconds": 1.5,
        },
        "send": {
            "calls": 1,
            "bytes": 4,
            "wire_sent": None,  # not measured one by one: only the ledger's total has it
            "modeled_sent_bytes": 4,
            "seconds": 0.25,
        },
    }


def test_tensor_bytes_of_mixed_inputs():
    a, b = torch.zeros(10), torch.zeros(3, dtype=torch.float64)
    assert tensor_bytes(None) == 0
    assert tensor_bytes(a) == 40
    assert tensor_bytes([a, None, b, a[2:]]) == 64
    assert tensor_bytes([torch.zeros(5, device="meta")]) == 0


def test_report_and_gather_on_one_process():
    with Ledger() as ledger, ledger.event("x", step=3):
        pass
    report = ledger.report()
    assert (report["rank"], report["world_size"]) == (0, 1)
    assert report["timeline"][0]["step"] == 3 and report["comm"] == []
    assert gather_reports(report) == [report]


def test_calls_are_recorded_in_process(monkeypatch):
    """The recording wrapper, on one process: a stand-in collective, a stand-in group."""
    calls = []

    def fake_all_reduce(tensor, op=None, group=None, async_op=False):
        calls.append(tensor.numel())

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(dist, "get_process_group_ranks", lambda group: [0, 2])
    with Ledger() as ledger:
        assert dist.all_reduce is not fake_all_reduce
        dist.all_reduce(torch.ones(10))
        dist.all_reduce(torch.ones(5), group="pair", async_op=True)
    assert dist.all_reduce is fake_all_reduce and calls == [10, 5]
    first, second = ledger.report()["comm"]
    assert {k: first[k] for k in ("op", "group", "bytes", "modeled_sent_bytes", "async")} == {
        "op": "all_reduce",
        "group": (0, 1, 2, 3),
        "bytes": 40,
        "modeled_sent_bytes": 60,
        "async": False,
    }
    assert first["wire_sent"] is None  # no process group here: nothing to measure
    assert (second["group"], second["bytes"], second["modeled_sent_bytes"], second["async"]) == (
        (0, 2),
        20,
        20,
        True,
    )
    assert 0 <= first["t"] <= second["t"] and first["seconds"] >= 0


def test_on_host_looks_into_arguments_lists_and_keywords():
    """Wire bytes are read only for calls whose tensors are all on the CPU (a GPU buffer's
    traffic bypasses the sockets' counters): a meta tensor stands in for a GPU one here."""
    from cai_labs.ledger import _on_host

    cpu, off = torch.ones(1), torch.ones(1, device="meta")
    assert _on_host((cpu, [cpu, cpu]), {"tensor": cpu})
    assert not _on_host((cpu,), {"tensor": off})
    assert not _on_host(([cpu, off],), {})
    assert not _on_host(([[off]],), {})


def test_wire_by_kind_splits_measured_bytes_by_kind():
    from cai_labs.ledger import wire_by_kind

    def report(sent: int | None, *recs: tuple[str, int | None], measured: bool = True) -> dict:
        comm = [{"kind": k, "wire_sent": w} for k, w in recs]
        return {"comm": comm, "wire": {"measured": measured, "sent": sent}}

    kind = lambda rec: rec["kind"]  # noqa: E731
    assert wire_by_kind(report(10, ("a", 4), measured=False), kind) is None
    assert wire_by_kind(report(None, ("a", 4)), kind) is None
    assert wire_by_kind({"comm": []}, kind) is None
    # every call measured: bytes no call sent (DDP's C++ reducer) are "unrecorded"
    assert wire_by_kind(report(10, ("a", 4), ("b", 1), ("a", 2)), kind) == {
        "a": 6,
        "b": 1,
        "unrecorded": 3,
    }
    assert wire_by_kind(report(7, ("a", 4), ("b", 3)), kind) == {"a": 4, "b": 3}
    # one kind has asynchronous calls: the rest is its
    assert wire_by_kind(report(20, ("a", 4), ("b", None), ("b", 5)), kind) == {"a": 4, "b": 16}
    # two kinds do: one entry named by both, sorted, holding their measured bytes too
    got = wire_by_kind(report(30, ("c", None), ("a", 4), ("b", None), ("b", 5), ("c", 1)), kind)
    assert got == {"a": 4, "b + c": 26}
    assert wire_by_kind(report(0, ("a", None)), kind) == {"a": 0}
