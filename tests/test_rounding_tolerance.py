"""The float32 tolerance helper: a bound from the dtype and the computation that correct
parallel results meet on any kernel path, and that the broken variants exceed."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call, grad, vmap

from cai_labs import launch
from cai_labs.data import load_digits_split
from cai_labs.data_parallel import allreduce_gradients, shard_batch
from cai_labs.models import MLP
from cai_labs.testing import assert_close_to_serial, rounding_bound

BATCH = 128
LAYERS = 3  # the MLP's linear layers: reductions that feed each other in backward


def test_bound_holds_for_every_summation_order():
    """Sums of the same float32 numbers in 200 random orders and in float64 stay within it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.logspace(-3, 3, 4096)
    exact = x.double().sum().item()
    bound = rounding_bound(torch.float32, x.numel(), x.abs().sum().item())
    for _ in range(200):
        perm = x[torch.randperm(x.numel(), generator=g)]
        assert abs(perm.sum().item() - exact) <= bound / 2  # each order is within half of it
    assert bound < 1e-2 * x.abs().sum().item()  # and it is still a tight check, not a blank


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="terms and depth must be >= 1"):
        rounding_bound(torch.float32, 0, 1.0)
    with pytest.raises(ValueError, match="exceed what"):
        rounding_bound(torch.float16, 10_000, 1.0)


def _batch():
    data = load_digits_split()
    return data.x_train[:BATCH], data.y_train[:BATCH]


def _serial_grads_and_magnitudes() -> tuple[list[torch.Tensor], float]:
    """The full-batch gradient, and sum over samples of |per-sample gradient| / B: the sum of
    absolute terms of the batch reduction behind each entry."""
    model, (x, y) = MLP(seed=0), _batch()
    nn.functional.cross_entropy(model(x), y).backward()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xb, yb):
        out = functional_call(model, p, (xb[None],))
        return nn.functional.cross_entropy(out, yb[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    magnitude = max(g.abs().sum(0).max().item() for g in per_sample.values()) / BATCH
    return [p.grad for p in model.parameters()], magnitude


def _parallel_grads(average: bool) -> list[torch.Tensor]:
    model, (x, y) = MLP(seed=0), _batch()
    xs, ys = shard_batch(x, y, rank=dist.get_rank(), world_size=dist.get_world_size())
    nn.functional.cross_entropy(model(xs), ys).backward()
    if average:
        allreduce_gradients(model)
    else:  # a plausible bug: sum the ranks' gradients without dividing by N
        for p in model.parameters():
            dist.all_reduce(p.grad)
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("n", [2, 4])
def test_data_parallel_float32_gradient_within_the_bound_and_broken_variants_outside(n):
    serial, magnitude = _serial_grads_and_magnitudes()
    good = launch(_parallel_grads, n, True)
    assert_close_to_serial(good, serial, terms=BATCH, magnitude=magnitude, depth=LAYERS)
    bad = launch(_parallel_grads, n, False)
    with pytest.raises(AssertionError, match="more than rounding"):
        assert_close_to_serial(bad, serial, terms=BATCH, magnitude=magnitude, depth=LAYERS)
    off_by_one_sample = [g * (BATCH / (BATCH - 1)) for g in good]  # a mean over B-1
    with pytest.raises(AssertionError, match="more than rounding"):
        assert_close_to_serial(
            off_by_one_sample, serial, terms=BATCH, magnitude=magnitude, depth=LAYERS
        )
