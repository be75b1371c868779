"""The headroom KV cache stores exactly what ``torch.cat`` would, and reuses its buffers."""

import pytest
import torch

if not hasattr(pytest.importorskip("transformers.cache_utils"), "DynamicLayer"):
    # transformers 4.51 (Colossal-AI's pin, in the colossalai session) has no DynamicLayer
    pytest.skip("the serving KV cache needs transformers 5", allow_module_level=True)

from cai_labs.serving.headroom_cache import HeadroomCache  # noqa: E402
from cai_labs.serving.running_batch import RunningBatch  # noqa: E402


def _states(b: int, s: int, seed: int) -> torch.Tensor:
    return torch.randn(b, 2, s, 4, generator=torch.Generator().manual_seed(seed))


def test_steps_append_in_place_and_equal_cat():
    cache = HeadroomCache()
    keys = _states(3, 5, 0)
    cache.update(keys, keys + 1, 0)
    layer = cache.layers[0]
    buffer = layer.buffers["keys"]
    for step in range(layer.spare + 1):
        new = _states(3, 1, step + 1)
        keys = torch.cat([keys, new], 2)
        out, values = cache.update(new, new + 1, 0)
        assert torch.equal(out, keys) and torch.equal(values, keys + 1)
        fits = step < layer.spare  # the step after the spare columns needs a new buffer
        assert (layer.buffers["keys"] is buffer) == fits


def test_leaves_and_joins_equal_index_and_padded_cat():
    cache, other = HeadroomCache(), HeadroomCache()
    keys, theirs = _states(4, 6, 0), _states(2, 3, 1)
    cache.update(keys, keys, 0)
    other.update(theirs, theirs, 0)
    ones = torch.ones(4, 6, dtype=torch.long)
    batch = RunningBatch(list("abcd"), cache, ones, torch.arange(4))
    batch.keep([1, 3])  # d moves into a's place
    assert batch.seqs == ["d", "b"] and torch.equal(cache.layers[0].keys, keys[[3, 1]])
    buffer = cache.layers[0].buffers["keys"]
    mask = torch.ones(2, 3, dtype=torch.long)
    batch.extend(RunningBatch(list("ef"), other, mask, torch.arange(2)))
    padded = torch.cat([torch.zeros(2, 2, 3, 4), theirs], 2)
    assert torch.equal(cache.layers[0].keys, torch.cat([keys[[3, 1]], padded]))
    assert cache.layers[0].buffers["keys"] is buffer  # joined in the rows left free
    assert batch.mask[2:, :3].sum() == 0 and batch.seqs == list("dbef")
