"""Data parallel (plain and bucketed) equals the serial full-batch step."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from cai_labs import Ledger, comm_totals, launch
from cai_labs.data import load_digits_split
from cai_labs.data_parallel import (
    BucketedDataParallel,
    allreduce_gradients,
    shard_batch,
)
from cai_labs.models import MLP

STEPS, BATCH, LR = 3, 64, 0.1


def _batches(data, steps: int):
    for s in range(steps):
        sl = slice(s * BATCH, (s + 1) * BATCH)
        yield data.x_train[sl], data.y_train[sl]


def _serial() -> list[torch.Tensor]:
    data = load_digits_split()
    model = MLP(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for x, y in _batches(data, STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _parallel(mode: str, bucket_mb: float = 0.05) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    data = load_digits_split()
    # Start ranks from *different* weights: the wrapper must broadcast rank 0's.
    model = MLP(seed=0 if mode == "allreduce" else rank)
    if mode == "bucketed":
        model = BucketedDataParallel(model, bucket_mb=bucket_mb)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    with Ledger(model=model) as ledger:
        for x, y in _batches(data, STEPS):
            xs, ys = shard_batch(x, y, rank=rank, world_size=world)
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs), ys).backward()
            if mode == "allreduce":
                allreduce_gradients(model)
            opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    all_params = [None] * world
    dist.all_gather_object(all_params, params)
    return {
        "params": all_params,
        "comm": comm_totals(ledger.report()),
        "grad_bytes": sum(p.numel() * 4 for p in model.parameters()),
    }


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("mode", ["allreduce", "bucketed"])
def test_data_parallel_equals_serial_after_three_steps(n, mode):
    serial = _serial()
    out = launch(_parallel, n, mode)
    for rank_params in out["params"]:  # every replica, not just rank 0
        for p, q in zip(rank_params, serial):
            assert torch.allclose(p, q, atol=1e-6, rtol=0), (p - q).abs().max()
    # Every step all-reduces exactly the gradient bytes once.
    assert out["comm"]["all_reduce"]["bytes"] == STEPS * out["grad_bytes"]


def test_buckets_are_formed_and_several_messages_sent():
    out = launch(_parallel, 2, "bucketed", 0.05)
    assert out["comm"]["all_reduce"]["calls"] > STEPS  # more than one bucket per step


def test_broken_averaging_is_caught():
    """The comparison above must be able to fail: skipping the division by N breaks it."""
    serial = _serial()

    def no_average():
        data = load_digits_split()
        model = MLP(seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        for x, y in _batches(data, STEPS):
            xs, ys = shard_batch(x, y, rank=dist.get_rank(), world_size=2)
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs), ys).backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)  # sum, not mean
            opt.step()
        return [p.detach() for p in model.parameters()]

    broken = launch(no_average, 2)
    assert max((p - q).abs().max().item() for p, q in zip(broken, serial)) > 1e-3


def test_uneven_batch_is_rejected():
    with pytest.raises(ValueError, match="divisible by 4"):
        shard_batch(torch.zeros(10), rank=0, world_size=4)
