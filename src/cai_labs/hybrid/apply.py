"""``parallelize(model, layout)`` and its steps: each parallel dimension applied in a fixed order.

Like torchtitan's ``parallelize.py``, each ``apply_*`` takes the model and returns it changed:

1. :func:`apply_tp` — blocks by their tensor-parallel twins on the grid; token embedding, head
   and loss split by vocabulary (``layout.vocab_parallel``);
2. :func:`apply_sp` — attention on sequence chunks (ring or all-to-all), positions offset;
3. :func:`apply_pp` — keep this rank's pipeline stage, link it to its neighbours;
4. :func:`apply_zero` (``layout.zero > 0``) or :func:`apply_dp` — how the replicas combine
   their gradients: ZeRO's sharded step, or an all-reduce average.

Tensor and sequence parallelism rewrite layers, so they come first; the pipeline then cuts the
rewritten model; data parallelism wraps whatever parameters this rank ended with.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cai_labs.devices import device
from cai_labs.hybrid.layout import Layout
from cai_labs.hybrid.model import LayoutGroups, ParallelGPT
from cai_labs.models.gpt import GPT
from cai_labs.pipeline import GPTStage, StageLinks
from cai_labs.sequence_parallel.gpt import ChunkAttention, OffsetPositions
from cai_labs.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from cai_labs.tensor_parallel.layers_1d import ColumnParallelLinear, VocabParallelEmbedding
from cai_labs.tensor_parallel.modes import tp_mode

__all__ = ["parallelize", "apply_tp", "apply_sp", "apply_pp", "apply_dp", "apply_zero"]


def parallelize(model: GPT, layout: Layout) -> ParallelGPT:
    """This rank's part of ``model`` laid out by ``layout``. Collective: every rank calls it
    with the same model (same seed) and layout.

    The serial model's modules are reused, not copied: pass a copy to keep the serial one. They
    move to :func:`~cai_labs.devices.device` (the rank's GPU on a GPU node, else the CPU).
    """
    layout.validate(model.cfg)
    pm = ParallelGPT(model.to(device()), layout, LayoutGroups.build(layout))
    pm = apply_tp(pm)
    pm = apply_sp(pm)
    pm = apply_pp(pm)
    return apply_zero(pm) if layout.zero else apply_dp(pm)


def vocab_parallel_lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup, vocab_size: int
) -> torch.Tensor:
    """Mean cross-entropy of logits split by vocabulary ``(b, s, V/tp)`` (never gathered)."""
    return vocab_parallel_cross_entropy(logits, targets, group, vocab_size=vocab_size)


def apply_tp(model: ParallelGPT) -> ParallelGPT:
    """Tensor parallelism: every block on the grid, entered after the embeddings and left
    before the final norm; with ``vocab_parallel``, the token table and the head split by
    vocabulary over the whole grid and the loss computed on the split logits."""
    lay, grid, st = model.layout, model.grid, model.stage
    if lay.tp == 1:
        return model
    mode = tp_mode(lay.tp_mode)
    st.blocks = nn.ModuleList(mode.parallelize_block(b, grid) for b in st.blocks)
    st.enter_blocks = functools.partial(mode.enter, grid=grid)
    st.leave_blocks = functools.partial(mode.leave, grid=grid)
    if lay.vocab_parallel:
        st.tok_emb = VocabParallelEmbedding.from_serial(st.tok_emb, grid)
        st.head = ColumnParallelLinear.from_serial(st.head, grid)  # logits (b, s, V/tp)
        model.loss_fn = functools.partial(
            vocab_parallel_lm_loss, group=grid.group, vocab_size=model.cfg.vocab_size
        )
    return model


def chunk_lm_loss(logits: torch.Tensor, targets: torch.Tensor, sp: int) -> torch.Tensor:
    """This SP rank's share of the micro-batch's mean loss: its tokens' sum over all tokens."""
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    return total / (targets.numel() * sp)


def apply_sp(model: ParallelGPT) -> ParallelGPT:
    """Sequence parallelism: each SP rank runs every layer on its ``L/sp`` tokens; attention
    meets the other chunks over the SP group; the SP ranks' gradients are summed."""
    lay, st = model.layout, model.stage
    if lay.sp == 1:
        return model
    for block in st.blocks:
        block.attn = ChunkAttention(block.attn, model.sp_group, lay.sp_attention)
    st.pos_emb = OffsetPositions(st.pos_emb, model.coords[2] * (model.cfg.seq_len // lay.sp))
    model.loss_fn = functools.partial(chunk_lm_loss, sp=lay.sp)
    model.grad_sum_groups.append(model.sp_group)
    return model


def apply_pp(model: ParallelGPT) -> ParallelGPT:
    """Pipeline parallelism: keep stage ``s`` of ``pp`` (contiguous blocks; embeddings on the
    first, norm and head on the last) and link it to the same grid position of its
    neighbouring stages."""
    lay = model.layout
    if lay.pp == 1:
        return model
    d, s, t = model.coords
    whole = model.stage
    stage = GPTStage(whole, s, lay.pp)
    stage.enter_blocks, stage.leave_blocks = whole.enter_blocks, whole.leave_blocks
    model.stage = stage
    prev = lay.rank_of(d, s - 1, t) if s > 0 else None
    nxt = lay.rank_of(d, s + 1, t) if s < lay.pp - 1 else None
    model.links = StageLinks(prev, nxt)
    return model


def apply_dp(model: ParallelGPT) -> ParallelGPT:
    """Data parallelism: average the gradients over the replicas holding the same shard."""
    model.dp_group = model.groups.dp_group
    return model


def apply_zero(model: ParallelGPT) -> ParallelGPT:
    """ZeRO over the replicas: the stage's parameters in flat units whose optimizer state
    (stage 1), gradients (2) and parameters (3) are sharded over the data-parallel group.
    Build the optimizer with ``model.make_optimizer(cls, **kwargs)``."""
    from cai_labs.zero import STAGES

    model.zero = STAGES[model.layout.zero](model.stage, group=model.groups.dp_group)
    model.dp_group = None  # the sharded step averages the gradients
    return model
