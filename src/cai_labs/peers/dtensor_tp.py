"""The GPT under PyTorch's DTensor 1D tensor parallelism (Megatron-style, done by PyTorch).

``parallelize_module`` with ``ColwiseParallel`` on ``qkv`` and ``fc1`` and ``RowwiseParallel`` on
``proj`` and ``fc2`` shards the same weights :mod:`cai_labs.tensor_parallel` shards, and inserts
the same all-reduces (inside PyTorch's C++ functional collectives, which the ledger does not
see). Two things the serial GPT needs adapting for, both also done by the cai_labs 1D layers:

* the fused ``qkv`` weight is ``[q; k; v]`` stacked by rows; a plain column shard would give
  rank 0 all of ``q`` and half of ``k``. Its rows are reordered first to
  ``[q_0; k_0; v_0; q_1; k_1; v_1; ...]`` so that rank ``r``'s contiguous shard is its own heads'
  ``q``, ``k`` and ``v``;
* attention then runs on the ``n_heads / N`` local heads of a ``(b, s, 3d/N)`` local tensor.

Embeddings, layer norms and the head stay ordinary replicated tensors; their gradients agree on
every rank because DTensor all-reduces the gradient of each block's replicated input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from cai_labs.devices import device
from cai_labs.models.gpt import GPT, GPTConfig

__all__ = ["dtensor_tp_gpt", "interleave_qkv_rows"]


def interleave_qkv_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Reorder the rows of a fused ``[q; k; v]`` weight ``(3d, d)`` or bias ``(3d,)`` so that
    the ``n`` contiguous shards are ``[q_r; k_r; v_r]``."""
    q, k, v = t.chunk(3, dim=0)
    return torch.cat([torch.cat([q.chunk(n)[r], k.chunk(n)[r], v.chunk(n)[r]]) for r in range(n)])


def dtensor_tp_gpt(cfg: GPTConfig, seed: int = 0) -> nn.Module:
    """The serial GPT of ``seed``, tensor parallel over all ranks with DTensor, on
    :func:`cai_labs.device`. Collective."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    n = dist.get_world_size()
    if cfg.n_heads % n:
        raise ValueError(f"n_heads={cfg.n_heads} does not split over {n} tensor-parallel ranks")
    mesh = init_device_mesh(device().type, (n,))
    model = GPT(cfg, seed=seed).to(device())
    plan = {
        "attn.qkv": ColwiseParallel(),
        "attn.proj": RowwiseParallel(),
        "mlp.fc1": ColwiseParallel(),
        "mlp.fc2": RowwiseParallel(),
    }
    for block in model.blocks:
        with torch.no_grad():
            block.attn.qkv.weight.copy_(interleave_qkv_rows(block.attn.qkv.weight, n))
            block.attn.qkv.bias.copy_(interleave_qkv_rows(block.attn.qkv.bias, n))
        parallelize_module(block, mesh, plan)
        # The serial attention runs unchanged on the local q, k, v of this rank's heads
        # (models.gpt.causal_attention splits the fused output in three, whatever its width).
        block.attn.n_heads = cfg.n_heads // n
    return model
