"""Masked-language-model training of transformers' ``BertForMaskedLM`` with sequence parallelism.

The model is the real ``transformers`` class (built from a small config, or loaded with
``from_pretrained``); nothing in it is rewritten. :func:`sequence_parallel_mlm_loss` runs its
sub-modules in order on this rank's chunk of the sequence:

* embeddings (word + position + token type, LayerNorm): per token, so local; the only thing to get
  right is the position ids, which start at ``rank * C``, not 0;
* per layer: the q/k/v projections (local), attention across the whole sequence by
  :func:`~cai_labs.sequence_parallel.ring_attention.ring_attention` or
  :func:`~cai_labs.sequence_parallel.all_to_all_attention.all_to_all_attention`, then the
  output projection, residual + LayerNorm, and the MLP (all local);
* the MLM head and the cross-entropy on the local tokens.

Loss and gradients: the serial loss is the mean over all ``M`` target tokens of the batch. Each
rank returns ``(sum of its targets' losses) / M`` (``M`` is summed over the group), so the losses
of the ranks *add up* to the serial loss, and so do their gradients: a sum all-reduce of the
gradients (:func:`allreduce_sum_gradients`) gives every rank the serial gradient of the
replicated parameters. With data parallelism as well, pass the whole SP x DP world as
``loss_group``: ``M`` then counts the global batch's targets, and the gradient sum runs over all
ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from cai_labs.sequence_parallel.all_to_all_attention import all_to_all_attention
from cai_labs.sequence_parallel.chunking import serial_attention
from cai_labs.sequence_parallel.ring_attention import ring_attention

if TYPE_CHECKING:
    from transformers import BertConfig

__all__ = [
    "tiny_bert_config",
    "sequence_parallel_mlm_loss",
    "allreduce_sum_gradients",
    "ATTENTION",
    "chunk_attention",
    "embed_chunk",
    "layer_on_chunk",
    "mlm_loss_sum",
]

ATTENTION: dict[str, Callable[..., torch.Tensor]] = {
    "ring": ring_attention,
    "all_to_all": all_to_all_attention,
}


def tiny_bert_config(
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    max_positions: int = 4096,
) -> BertConfig:
    """A small ``BertConfig`` without dropout (so parallel and serial runs are comparable)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )


def _group(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def sequence_parallel_mlm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    attention: str = "ring",
    group: dist.ProcessGroup | None = None,
    loss_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """This rank's share of the MLM loss of a ``BertForMaskedLM``, sequence-parallel.

    Args:
        model: a ``transformers`` ``BertForMaskedLM`` (same weights on every rank).
        input_ids, attention_mask, labels: this rank's chunk ``[B, C]`` of the batch (chunk
            ``r`` of the sequence on rank ``r`` of ``group``; labels -100 where not a target).
        attention: ``"ring"`` or ``"all_to_all"``; with one rank either is serial attention.
        group: the sequence-parallel group (default: all ranks).
        loss_group: ranks whose targets make up the batch the loss averages over (default:
            ``group``; the whole world under SP x DP).

    Returns:
        a scalar: sum of this rank's target losses divided by the group's target count. Summed
        over ``loss_group`` it is the serial loss (see the module docstring).
    """
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {sorted(ATTENTION)}; got {attention!r}")
    rank = _group(group)[0]
    attend = chunk_attention(attention, group)
    offset = rank * input_ids.shape[1]
    h = embed_chunk(model.bert.embeddings, input_ids, offset=offset)  # [B, C, hidden]
    for layer in model.bert.encoder.layer:
        h = layer_on_chunk(layer, h, attention_mask, attend)
    loss_sum = mlm_loss_sum(model.cls(h), labels)  # logits [B, C, vocab]
    count = (labels != -100).sum().to(loss_sum.dtype)
    if dist.is_initialized() and dist.get_world_size(loss_group or group) > 1:
        dist.all_reduce(count, group=loss_group or group)
    return loss_sum / count


def chunk_attention(attention: str, group: dist.ProcessGroup | None) -> Callable[..., torch.Tensor]:
    """``attend(q, k, v, key_mask, scale=)`` over ``group``: the ring or all-to-all variant, or
    plain serial attention when the group has one rank."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {sorted(ATTENTION)}; got {attention!r}")
    if _group(group)[1] == 1:
        return serial_attention
    fn = ATTENTION[attention]
    return lambda q, k, v, key_mask, scale=None: fn(q, k, v, key_mask, group=group, scale=scale)


def embed_chunk(embeddings: nn.Module, input_ids: torch.Tensor, offset: int) -> torch.Tensor:
    """``BertEmbeddings`` of a chunk of tokens ``[B, C]`` that starts at position ``offset``.

    Returns ``[B, C, hidden]``. The embeddings are per token, so a chunk is embedded alone; only
    the position ids must be the chunk's place in the whole sequence, not ``0 .. C-1``.
    """
    b, c = input_ids.shape
    max_positions = embeddings.position_embeddings.num_embeddings
    if offset + c > max_positions:
        raise ValueError(
            f"sequence length {offset + c} exceeds max_position_embeddings="
            f"{max_positions}; build the model with more positions"
        )
    positions = torch.arange(offset, offset + c, device=input_ids.device).expand(b, c)
    return embeddings(
        input_ids=input_ids, position_ids=positions, token_type_ids=torch.zeros_like(input_ids)
    )


def layer_on_chunk(
    layer: nn.Module,
    h: torch.Tensor,
    attention_mask: torch.Tensor,
    attend: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """One ``BertLayer`` on this rank's chunk ``h`` ``[B, C, hidden]`` -> ``[B, C, hidden]``.

    The q/k/v projections, output projection, residuals, LayerNorms and MLP are the layer's own
    sub-modules applied to the local tokens; only ``attend`` (from :func:`chunk_attention`)
    looks at the other ranks' chunks. ``attention_mask`` ``[B, C]`` is this chunk's padding.
    """
    b, c, _ = h.shape
    sa = layer.attention.self
    heads, d = sa.num_attention_heads, sa.attention_head_size
    q, k, v = (
        proj(h).view(b, c, heads, d).transpose(1, 2)  # [B, H, C, D]
        for proj in (sa.query, sa.key, sa.value)
    )
    ctx = attend(q, k, v, attention_mask, scale=sa.scaling)  # [B, H, C, D]
    ctx = ctx.transpose(1, 2).reshape(b, c, heads * d)
    a = layer.attention.output(ctx, h)  # output projection, residual, LayerNorm
    return layer.output(layer.intermediate(a), a)  # MLP, residual, LayerNorm


def mlm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of the cross-entropy over the target tokens (labels != -100).

    ``logits`` ``[B, C, vocab]``, ``labels`` ``[B, C]``. A sum, so that shares computed on
    different ranks (or micro-batches) can be divided by one global target count.
    """
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def allreduce_sum_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum every parameter gradient over ``group`` (one all-reduce of all gradients, flattened).

    The losses returned by :func:`sequence_parallel_mlm_loss` add up to the serial loss, so their
    gradients add up to the serial gradient: a sum, not a mean.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
