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

import torch
import torch.distributed as dist
from torch import nn

from cai_labs.sequence_parallel.all_to_all_attention import all_to_all_attention
from cai_labs.sequence_parallel.chunking import serial_attention
from cai_labs.sequence_parallel.ring_attention import ring_attention

__all__ = ["tiny_bert_config", "sequence_parallel_mlm_loss", "allreduce_sum_gradients",
           "ATTENTION"]

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
):
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
    rank, n = _group(group)
    b, c = input_ids.shape
    bert = model.bert
    positions = torch.arange(rank * c, (rank + 1) * c, device=input_ids.device).expand(b, c)
    if rank * c + c > bert.config.max_position_embeddings:
        raise ValueError(f"sequence length {n * c} exceeds max_position_embeddings="
                         f"{bert.config.max_position_embeddings}")
    h = bert.embeddings(input_ids=input_ids, position_ids=positions,
                        token_type_ids=torch.zeros_like(input_ids))  # [B, C, hidden]
    attend = serial_attention if n == 1 else ATTENTION[attention]
    kwargs = {} if n == 1 else {"group": group}
    for layer in bert.encoder.layer:
        sa = layer.attention.self
        heads, d = sa.num_attention_heads, sa.attention_head_size
        q, k, v = (proj(h).view(b, c, heads, d).transpose(1, 2)  # [B, H, C, D]
                   for proj in (sa.query, sa.key, sa.value))
        ctx = attend(q, k, v, attention_mask, scale=sa.scaling, **kwargs)  # [B, H, C, D]
        ctx = ctx.transpose(1, 2).reshape(b, c, heads * d)
        a = layer.attention.output(ctx, h)  # output projection, residual, LayerNorm
        h = layer.output(layer.intermediate(a), a)  # MLP, residual, LayerNorm
    logits = model.cls(h)  # [B, C, vocab]
    loss_sum = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
        reduction="sum",
    )
    count = (labels != -100).sum().to(logits.dtype)
    if dist.is_initialized() and dist.get_world_size(loss_group or group) > 1:
        dist.all_reduce(count, group=loss_group or group)
    return loss_sum / count


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
