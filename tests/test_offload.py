"""The chunk manager trains like data parallel under a device budget it never exceeds."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_zero import LR, SIZES, _batches, _flat, _setup

from cai_labs import Ledger, comm_totals, launch
from cai_labs.data_parallel import allreduce_gradients
from cai_labs.models.opt import tiny_opt
from cai_labs.offload import ChunkedAdam, ChunkedModel, PoolBudgetExceeded
from cai_labs.offload.chunk import Chunk
from cai_labs.offload.manager import ChunkManager

CHUNK = 2048  # elements: 8 KiB chunks; the largest tensor of the test model has 2048 elements


def _worker(budget_chunks: int, prefetch: int = 2) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    tok, _ = _setup()
    ref = tiny_opt(tok, seed=0, **SIZES).train()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=LR)
    for x, y in _batches(rank, world):
        ref_opt.zero_grad()
        ref(input_ids=x, labels=y).loss.backward()
        allreduce_gradients(ref)
        ref_opt.step()
    budget = budget_chunks * CHUNK * 4
    model = ChunkedModel(tiny_opt(tok, seed=rank, **SIZES).train(), CHUNK, budget,
                         prefetch=prefetch)
    opt = ChunkedAdam(model, lr=LR)
    with Ledger(track_activations=False) as ledger:
        for x, y in _batches(rank, world):
            opt.zero_grad()
            model(input_ids=x, labels=y).loss.backward()
            opt.step()
    full = model.full_state_dict()
    flat = torch.cat([full[k].reshape(-1) for k in ref.state_dict()])
    every = [None] * world
    dist.all_gather_object(every, flat)
    return {"ref": _flat(ref), "chunked": every, "stats": model.manager.stats(),
            "states": sum(model.state_bytes().values()), "budget": budget,
            "comm": comm_totals(ledger.report())}


@pytest.mark.parametrize("n", [2, 4])
def test_chunked_equals_data_parallel_under_budget(n):
    out = launch(_worker, n, 5)
    for flat in out["chunked"]:
        err = (flat - out["ref"]).abs().max().item()
        assert err < 1e-2 * LR, f"chunked training on {n} ranks differs from DP by {err}"
    s = out["stats"]
    assert out["states"] > out["budget"], "the test must train states larger than the budget"
    assert s["device_peak"] <= out["budget"]  # never over budget
    assert s["h2d_demand"] > 0 and s["d2h"] > 0 and s["evict"] > 0  # it really moved chunks
    assert out["comm"]["reduce"]["calls"] > 0 and out["comm"]["broadcast"]["calls"] > 0


def test_prefetch_hits_when_room():
    out = launch(_worker, 2, 12, 2)
    assert out["stats"]["prefetch"] > 0 and out["stats"]["prefetch_hits"] > 0


def test_budget_too_small_is_a_clear_error():
    tok, _ = _setup()
    with pytest.raises(ValueError, match="cannot hold even one chunk"):
        ChunkedModel(tiny_opt(tok, **SIZES), CHUNK, device_budget=CHUNK * 4 - 1)
    with pytest.raises(ValueError, match="fewer than 4 chunks"):
        ChunkedModel(tiny_opt(tok, **SIZES), CHUNK, device_budget=CHUNK * 4 * 3)
    with pytest.raises(ValueError, match="smaller than the largest parameter"):
        ChunkedModel(tiny_opt(tok, **SIZES), 100, device_budget=None)


def test_manager_refuses_when_everything_is_pinned():
    m = ChunkManager(device_budget=2 * 400)
    a, b, c = (m.register(Chunk("param", i, 100)) for i in range(3))
    m.fetch(a)
    m.fetch(b)
    with pytest.raises(PoolBudgetExceeded, match="every resident chunk is in use"):
        m.fetch(c)
    m.unpin(a)
    m.fetch(c)  # evicts a (least recently used, unpinned)
    assert not a.resident and c.resident and m.device.peak <= 800
