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
