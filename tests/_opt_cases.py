"""The tiny OPT case shared by the ZeRO, FSDP2 and offload tests (imported by test files).

Each of those tests compares a memory-saving wrapper with plain data parallel on the same
batches; :func:`data_parallel_reference` is that reference, trained here once per worker.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from cai_labs.data.reverse_task import make_reverse_task
from cai_labs.data_parallel import allreduce_gradients, shard_batch
from cai_labs.models.opt import tiny_opt, train_char_tokenizer
from cai_labs.recipes.opt_finetune import sample_words, task_batch

STEPS, BATCH, LR = 3, 8, 1e-2
SIZES = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    ffn_dim=64,
    max_position_embeddings=32,
)


@functools.lru_cache(maxsize=1)
def setup():
    """(tokenizer, reverse task): built once per process (the forked ranks inherit it)."""
    tok = train_char_tokenizer("reverse abcdefgh => . the quick brown fox")
    return tok, make_reverse_task(n_test=8)


def batches(rank: int, world: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``STEPS`` batches of ``BATCH`` examples, this rank's ``BATCH / world`` slice of each."""
    tok, task = setup()
    for step in range(STEPS):
        x, y = task_batch(tok, task, sample_words(task, BATCH, step))
        yield shard_batch(x, y, rank=rank, world_size=world)


def flat_state(model) -> torch.Tensor:
    """Every entry of the state dict in one vector (to compare two models in one number)."""
    return torch.cat([v.reshape(-1) for v in model.state_dict().values()])


def model(seed: int):
    """The tiny OPT in training mode, weights from ``seed``."""
    return tiny_opt(setup()[0], seed=seed, **SIZES).train()


def data_parallel_reference(
    rank: int,
    world: int,
    optimizer: type = torch.optim.Adam,
    max_norm: float | None = None,
    **kwargs,
):
    """Plain data parallel over ``batches``: all-reduced gradients, a full optimizer on every
    rank, from the seed-0 weights. Returns ``(model, optimizer, gradient norms before clipping)``
    (norms only when ``max_norm`` is given)."""
    ref = model(seed=0)
    opt = optimizer(ref.parameters(), **(kwargs or {"lr": LR}))
    norms = []
    for x, y in batches(rank, world):
        opt.zero_grad()
        ref(input_ids=x, labels=y).loss.backward()
        allreduce_gradients(ref)
        if max_norm is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm).item())
        opt.step()
    return ref, opt, norms
