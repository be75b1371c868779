"""The chunk manager trains like data parallel under a device budget it never exceeds."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _opt_cases import LR, batches, data_parallel_reference, flat_state, model

from cai_labs import Ledger, comm_totals, launch
from cai_labs.offload import ChunkedAdam, ChunkedModel, PoolBudgetExceeded
from cai_labs.offload.chunk import Chunk
from cai_labs.offload.manager import ChunkManager

CHUNK = 2048  # elements: 8 KiB chunks; the largest tensor of the test model has 2048 elements


def _worker(budget_chunks: int, prefetch: int = 2) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    ref, _, _ = data_parallel_reference(rank, world)
    budget = budget_chunks * CHUNK * 4
    chunked = ChunkedModel(model(seed=rank), CHUNK, budget, prefetch=prefetch)
    opt = ChunkedAdam(chunked, lr=LR)
    with Ledger(track_activations=False) as ledger:
        for x, y in batches(rank, world):
            opt.zero_grad()
            chunked(input_ids=x, labels=y).loss.backward()
            opt.step()
    full = chunked.full_state_dict()
    got = torch.cat([full[k].reshape(-1) for k in ref.state_dict()])
    every = [None] * world
    dist.all_gather_object(every, got)
    return {
        "ref": flat_state(ref),
        "chunked": every,
        "stats": chunked.manager.stats(),
        "states": sum(chunked.state_bytes().values()),
        "budget": budget,
        "comm": comm_totals(ledger.report()),
    }


@pytest.mark.parametrize("n", [2, 4])
def test_chunked_equals_data_parallel_under_budget(n):
    out = launch(_worker, n, 5)
    for flat in out["chunked"]:
        err = (flat - out["ref"]).abs().max().item()
        assert err < 1e-2 * LR, f"chunked training on {n} ranks differs from DP by {err}"
    s = out["stats"]
    assert out["states"] > out["budget"], "the test must train states larger than the budget"
    _assert_under_budget(out)
    assert s["h2d_demand"] > 0 and s["d2h"] > 0 and s["evict"] > 0  # it really moved chunks
    assert out["comm"]["reduce"]["calls"] > 0 and out["comm"]["broadcast"]["calls"] > 0


def _assert_under_budget(out: dict) -> None:
    s = out["stats"]
    assert s["device_peak"] <= out["budget"]  # the pool's account: never over budget
    # Measured apart from the account: the storage really allocated for the device copies.
    assert 0 < s["device_storage_peak"] <= out["budget"]


def test_prefetch_hits_when_room():
    out = launch(_worker, 2, 12, 2)
    assert out["stats"]["prefetch"] > 0 and out["stats"]["prefetch_hits"] > 0


def test_budget_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot hold even one chunk"):
        ChunkedModel(model(seed=0), CHUNK, device_budget=CHUNK * 4 - 1)
    with pytest.raises(ValueError, match="fewer than 4 chunks"):
        ChunkedModel(model(seed=0), CHUNK, device_budget=CHUNK * 4 * 3)
    with pytest.raises(ValueError, match="smaller than the largest parameter"):
        ChunkedModel(model(seed=0), 100, device_budget=None)


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


def test_storage_peak_is_measured_from_the_allocated_storages():
    m = ChunkManager(device_budget=2 * 400)
    a, b, c = (m.register(Chunk("param", i, 100)) for i in range(3))
    assert m.storage_bytes() == 0
    m.fetch(a)
    m.fetch(b)
    assert m.storage_bytes() == a.data.untyped_storage().nbytes() + 400 == 800
    m.unpin(a)
    m.fetch(c)  # evicts a: its storage is freed
    assert a.data.untyped_storage().nbytes() == 0 and m.storage_bytes() == 800
    assert m.stats()["device_storage_peak"] == m.stats()["device_peak"] == 800


# -- deliberate breaks: the budget check fails on a plausible bug --------------------------------


def _leaky_evict(real):
    """``evict`` that books the chunk off the device pool but never frees its storage."""

    def evict(self, chunk):
        real(self, chunk)
        chunk.data.untyped_storage().resize_(chunk.nbytes)

    return evict


def test_leaky_eviction_is_caught_by_the_measured_peak(monkeypatch):
    monkeypatch.setattr(ChunkManager, "evict", _leaky_evict(ChunkManager.evict))
    out = launch(_worker, 2, 5)
    assert out["stats"]["device_peak"] <= out["budget"]  # the account alone does not see it
    with pytest.raises(AssertionError):
        _assert_under_budget(out)


def test_memory_pool_accounts_and_refuses():
    from cai_labs.offload.pool import MemoryPool

    pool = MemoryPool("device", budget=1)  # one byte is a budget
    assert (pool.used, pool.peak, pool.free_bytes) == (0, 0, 1) and pool.fits(1)
    pool = MemoryPool("device", budget=100)
    pool.allocate(60)
    pool.allocate(40)  # exactly full is allowed
    pool.release(30)
    pool.allocate(20)
    assert (pool.used, pool.peak, pool.free_bytes) == (90, 100, 10)
    with pytest.raises(PoolBudgetExceeded, match="device pool: allocating 11 bytes with 90 of"):
        pool.allocate(11)
    pool.release(90)
    assert pool.used == 0  # everything back is fine; more than that is a bug
    with pytest.raises(AssertionError, match="device pool released more than it allocated"):
        pool.release(1)
    free = MemoryPool("host")
    free.allocate(10**12)
    assert free.free_bytes == float("inf") and free.peak == 10**12
    with pytest.raises(ValueError, match="pool 'x': budget must be a positive number"):
        MemoryPool("x", budget=0)
