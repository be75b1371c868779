"""The ledger counts exactly the bytes of known collectives and the memory of known tensors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from cai_labs import Ledger, comm_totals, gather_reports, launch, tensor_bytes


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
    assert totals["all_reduce"]["sent_bytes"] == round(2 * (n - 1) / n * 4000) + round(
        2 * (n - 1) / n * 12
    )
    assert totals["broadcast"]["bytes"] == 80
    assert totals["all_gather"]["bytes"] == n * 100
    assert totals["all_gather"]["sent_bytes"] == (n - 1) * 100
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
    from cai_labs.models import GPT, GPTConfig

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
