"""Colossal-AI's Booster + TorchDDPPlugin on CPU ranks matches cai_labs data parallel.

Runs only in ``nox -s colossalai`` (marker ``colossalai``), where Colossal-AI 0.5.0 is installed.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from cai_labs import launch
from cai_labs.data import load_digits_split
from cai_labs.data_parallel import allreduce_gradients, shard_batch
from cai_labs.models import MLP

pytestmark = pytest.mark.colossalai
STEPS, BATCH, LR = 3, 64, 0.1


def _train(use_colossalai: bool) -> list[torch.Tensor]:
    rank, world = dist.get_rank(), dist.get_world_size()
    data = load_digits_split()
    model = MLP(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    if use_colossalai:
        from colossalai.booster import Booster
        from colossalai.booster.plugin import TorchDDPPlugin

        booster = Booster(plugin=TorchDDPPlugin())
        model, optimizer, *_ = booster.boost(model, optimizer)
    for s in range(STEPS):
        x, y = data.x_train[s * BATCH : (s + 1) * BATCH], data.y_train[s * BATCH : (s + 1) * BATCH]
        x, y = shard_batch(x, y, rank=rank, world_size=world)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if use_colossalai:
            booster.backward(loss, optimizer)
        else:
            loss.backward()
            allreduce_gradients(model)
        optimizer.step()
    plain = model.unwrap() if hasattr(model, "unwrap") else model
    return [p.detach().clone() for p in plain.parameters()]


@pytest.mark.parametrize("n", [2, 4])
def test_booster_torch_ddp_matches_cai_labs_data_parallel(n):
    pytest.importorskip("colossalai")
    ours = launch(_train, n, False)
    theirs = launch(_train, n, True)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
