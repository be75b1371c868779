"""Tensor-parallel serving: the scheduler on a 1D tensor-parallel OPT (2 and 4 ranks, rank 0
deciding, the others following) yields the serial model's greedy tokens, with requests
arriving while others decode; without the row-parallel all-reduce the tokens differ."""

from __future__ import annotations

import pytest

from cai_labs import launch
from cai_labs.serving import GenerationEngine, GenerationJob, make_toy_checkpoint
from cai_labs.serving.tensor_parallel import TensorParallelScheduler, tensor_parallel_engine

PROMPTS = ["Return a copy of the string", "hello", "Path objects are", "x " * 40, "join these"]
LENGTHS = [8, 3, 10, 6, 9]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_toy_checkpoint(tmp_path_factory.mktemp("opt_tp"), init_std=0.3)


@pytest.fixture(scope="module")
def serial_tokens(checkpoint):
    engine = GenerationEngine.from_pretrained(checkpoint, torch_threads=1)
    engine.model.double()
    jobs = [GenerationJob(engine.encode(p), n) for p, n in zip(PROMPTS, LENGTHS)]
    return [engine.generate_batch([job])[0].token_ids for job in jobs]


def _worker(checkpoint, broken: bool = False):
    if broken:  # row-parallel layers forget to sum their partial products
        from cai_labs.tensor_parallel import layers_1d

        layers_1d.reduce_from_group = lambda x, group: x
    engine, grid = tensor_parallel_engine(checkpoint, torch_threads=1)
    engine.model.double()
    scheduler = TensorParallelScheduler(engine, grid, max_batch_size=3, prefill_chunk=16)
    if not scheduler.is_root:
        return scheduler.follow()
    jobs = [GenerationJob(engine.encode(p), n) for p, n in zip(PROMPTS, LENGTHS)]
    seqs = [scheduler.add(job) for job in jobs[:2]]
    scheduler.step()  # the others arrive while these two decode
    seqs += [scheduler.add(job) for job in jobs[2:]]
    while not scheduler.idle():
        scheduler.step()
    scheduler.close()
    return [s.tokens for s in seqs]


@pytest.mark.parametrize("n", [2, 4])
def test_tensor_parallel_serving_equals_serial(checkpoint, serial_tokens, n):
    assert launch(_worker, n, checkpoint) == serial_tokens


def test_tensor_parallel_serving_without_all_reduce_is_caught(checkpoint, serial_tokens):
    assert launch(_worker, 2, checkpoint, broken=True) != serial_tokens
