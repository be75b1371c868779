"""BERT masked-language modelling with sequence, data and pipeline parallelism at once.

The three dimensions of :mod:`cai_labs.sequence_parallel.groups` (``dp x pp x sp`` ranks):

* **pipeline**: ``BertForMaskedLM`` is cut into ``pp`` stages with
  :func:`~cai_labs.pipeline.partition.partition_layers`: the embeddings join stage 0, the
  encoder layers are split into contiguous runs, the MLM head and the loss join the last stage.
  The batch runs as ``n_micro`` micro-batches under the GPipe or 1F1B schedule of
  :func:`~cai_labs.pipeline.schedules.pipeline_step`, over its
  :class:`~cai_labs.pipeline.p2p.StageLinks`;
* **sequence**: inside a stage, each of the ``sp`` ranks holds ``C = L / sp`` consecutive tokens
  of every micro-batch; the layers run on that chunk and attention uses the ring (or all-to-all)
  over the stage's SP group. What travels between stages is the *local chunk*
  ``[b, C, hidden]`` (``b = B / (dp * n_micro)``), from SP rank ``t`` of stage ``s`` to SP rank
  ``t`` of stage ``s+1``, which holds the same tokens; the padding mask ``[b, C]`` of the chunk
  is known to every rank and passed to every stage (``extra_inputs`` of ``pipeline_step``);
* **data**: replica ``d`` takes rows ``d*B/dp .. (d+1)*B/dp - 1`` of the global batch.

**Loss and gradients.** The serial loss is the mean over the ``M`` target tokens of the global
batch. Every rank builds the same global batch, so ``M`` is known everywhere without
communication. The last stage scores a micro-batch's chunk as (sum of its target losses) / ``M``:
these shares add up, over micro-batches, SP ranks and replicas, to the serial loss, and their
gradients to the serial gradient. So after the pipeline step the gradients are **summed**
(:func:`~cai_labs.sequence_parallel.bert.allreduce_sum_gradients`):

1. over the stage's **replica group**, all ``sp * dp`` ranks of the stage: they hold the same
   weights, and each saw its own tokens (SP) of its own rows (DP). One all-reduce over the
   ``sp * dp`` ranks (``grad_sum="replica"``, the default) gives the same sum as two, over the
   SP group then over the DP group (``grad_sum="sp_then_dp"``, kept to compare), for less
   traffic;
2. over the embedding group, for the word-embedding matrix only: stage 0 uses it to embed, the
   last stage (tied) to decode; each copy gets part of the gradient.

Bytes sent per rank and step (``P`` parameter bytes of the stage, ``A = (B/dp) C h * itemsize``
the activation of the replica's batch chunk, ``l`` layers on the stage, ``N = sp``):
ring ``6 (N-1) A l``; pipeline ``A`` (activations forward from every stage but the last, their
gradients back from every stage but the first); gradient sum ``2 (n-1)/n P`` with
``n = N * dp`` (``"replica"``), or ``2 (N-1)/N P + 2 (dp-1)/dp P`` (``"sp_then_dp"``: more
whenever both ``N`` and ``dp`` exceed 1); tied embedding ``V h * itemsize`` on the first and
last stages (two ranks: ``2 (2-1)/2``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch import nn

from cai_labs.data.mlm import MLMBatch
from cai_labs.launcher import device
from cai_labs.ledger import Ledger, wire_by_kind
from cai_labs.pipeline import StageLinks, partition_layers, pipeline_step
from cai_labs.sequence_parallel.bert import (
    allreduce_sum_gradients,
    chunk_attention,
    embed_chunk,
    layer_on_chunk,
    mlm_loss_sum,
)
from cai_labs.sequence_parallel.chunking import check_sequence_split, split_sequence
from cai_labs.sequence_parallel.groups import SequenceDataGroups

__all__ = ["GRAD_SUMS", "BertStage", "PipelinedSequenceBert", "traffic_by_kind"]

#: How :meth:`PipelinedSequenceBert.sum_gradients` sums a stage's gradients over its ranks.
GRAD_SUMS = ("replica", "sp_then_dp")


class BertStage(nn.Module):
    """Stage ``stage`` of ``n_stages`` of a ``BertForMaskedLM``, run on one sequence chunk.

    Keeps references to the sub-modules of its slice of ``model`` (every rank builds the whole
    model from the same weights, then keeps its part):

    * first stage: ``forward(input_ids [b, C], mask [b, C])`` embeds the chunk (positions start
      at ``sp_rank * C``);
    * other stages: ``forward(h [b, C, hidden], mask)``, ``h`` received from the previous stage;
    * last stage: returns the MLM logits ``[b, C, vocab]``; the others ``[b, C, hidden]``.
    """

    def __init__(
        self,
        model: nn.Module,
        stage: int,
        n_stages: int,
        *,
        sp_rank: int = 0,
        sp_group: dist.ProcessGroup | None = None,
        attention: str = "ring",
    ):
        super().__init__()
        if not 0 <= stage < n_stages:
            raise ValueError(f"stage must be in [0, {n_stages}); got {stage}")
        bert = model.bert
        self.layer_ids = partition_layers(len(bert.encoder.layer), n_stages)[stage]
        self.is_first, self.is_last = stage == 0, stage == n_stages - 1
        self.sp_rank = sp_rank
        self.attend = chunk_attention(attention, sp_group)
        self.layers = nn.ModuleList(bert.encoder.layer[i] for i in self.layer_ids)
        if self.is_first:
            self.embeddings = bert.embeddings
        if self.is_last:
            self.cls = model.cls
        # Names in the whole model, so gradients and weights can be compared with the serial
        # model's (a tied weight is named once, by its first name, as named_parameters does).
        names = {id(p): n for n, p in model.named_parameters()}
        self.model_names = [names[id(p)] for p in self.parameters()]

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            x = embed_chunk(self.embeddings, x, offset=self.sp_rank * x.shape[1])
        for layer in self.layers:
            x = layer_on_chunk(layer, x, attention_mask, self.attend)
        if self.is_last:
            x = self.cls(x)
        return x

    def named_model_parameters(self) -> dict[str, nn.Parameter]:
        """This stage's parameters by their name in the whole ``BertForMaskedLM``."""
        return dict(zip(self.model_names, self.parameters()))


class PipelinedSequenceBert(nn.Module):
    """This rank's part of a ``BertForMaskedLM`` laid out as ``dp x pp x sp`` (module docstring).

    Args:
        model: the whole ``BertForMaskedLM``, the same weights on every rank (moved to
            :func:`cai_labs.device`, as are the batches of :meth:`local_batch`).
        groups: from :func:`~cai_labs.sequence_parallel.groups.make_sequence_groups`.
        attention: ``"ring"`` or ``"all_to_all"`` inside each stage's SP group.
        n_micro: micro-batches per step on each pipeline.
        schedule: ``"gpipe"`` or ``"1f1b"``.
        grad_sum: ``"replica"`` (one all-reduce over the stage's ``sp * dp`` ranks) or
            ``"sp_then_dp"`` (over the SP group, then the DP group: same sum, more bytes).
    """

    def __init__(
        self,
        model: nn.Module,
        groups: SequenceDataGroups,
        *,
        attention: str = "ring",
        n_micro: int = 1,
        schedule: str = "1f1b",
        grad_sum: str = "replica",
    ):
        super().__init__()
        if grad_sum not in GRAD_SUMS:
            raise ValueError(f"unknown grad_sum {grad_sum!r}; choose one of {GRAD_SUMS}")
        self.groups, self.n_micro, self.schedule = groups, n_micro, schedule
        self.grad_sum = grad_sum
        g = groups
        model = model.to(device())
        self.stage = BertStage(
            model, g.pp_rank, g.pp_size, sp_rank=g.sp_rank, sp_group=g.sp_group, attention=attention
        )
        self.links = StageLinks(g.prev_stage, g.next_stage)
        tied = model.get_input_embeddings().weight
        mine = {id(p) for p in self.stage.parameters()}
        # The word-embedding matrix, if this stage holds it and another stage holds it too.
        self.tied = [tied] if g.embedding_group is not None and id(tied) in mine else []

    def local_batch(self, batch: MLMBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's rows (replica) and columns (sequence chunk) of the global batch:
        ``input_ids, attention_mask, labels``, each ``[B / dp, L / sp]``."""
        g = self.groups
        b, length = batch.input_ids.shape
        if b % (g.dp_size * self.n_micro):
            raise ValueError(
                f"a batch of {b} sequences does not split over dp={g.dp_size} replicas x "
                f"n_micro={self.n_micro} micro-batches; use a batch size divisible by "
                f"{g.dp_size * self.n_micro}"
            )
        check_sequence_split(length, g.sp_size)
        rows = slice(g.dp_rank * b // g.dp_size, (g.dp_rank + 1) * b // g.dp_size)
        return tuple(
            split_sequence(t[rows].to(device()), g.sp_rank, g.sp_size)
            for t in (batch.input_ids, batch.attention_mask, batch.labels)
        )

    def forward_backward(
        self, batch: MLMBatch, ledger: Ledger | None = None, step: int = 0
    ) -> torch.Tensor | None:
        """Pipeline forward and backward of the global ``batch``; gradients accumulate, not yet
        summed over ranks. Returns this rank's share of the loss on the last stage, else None."""
        ids, mask, labels = self.local_batch(batch)
        total_targets = (batch.labels != -100).sum().item()  # M of the global batch
        n_micro = self.n_micro

        def loss_fn(logits: torch.Tensor, mb_labels: torch.Tensor) -> torch.Tensor:
            # pipeline_step divides by n_micro (right for a mean over equal micro-batches);
            # the MLM share is a sum over targets / M, so undo that division.
            return mlm_loss_sum(logits, mb_labels) * (n_micro / total_targets)

        g = self.groups
        return pipeline_step(
            self.stage,
            self.links,
            stage=g.pp_rank,
            n_stages=g.pp_size,
            inputs=ids,
            targets=labels,
            extra_inputs=mask,
            n_micro=n_micro,
            loss_fn=loss_fn,
            schedule=self.schedule,
            ledger=ledger,
            step=step,
        )

    def sum_gradients(self) -> None:
        """Sum the gradient shares over the stage's ``sp * dp`` ranks (one all-reduce over the
        replica group, or two: SP then DP), then the tied embedding over the embedding group."""
        g = self.groups
        if self.grad_sum == "replica":
            allreduce_sum_gradients(self.stage, group=g.replica_group)
        else:
            allreduce_sum_gradients(self.stage, group=g.sp_group)
            allreduce_sum_gradients(self.stage, group=g.dp_group)
        for w in self.tied:
            if w.grad is not None:
                dist.all_reduce(w.grad, group=g.embedding_group)

    def train_step(
        self,
        batch: MLMBatch,
        optimizer: torch.optim.Optimizer,
        ledger: Ledger | None = None,
        step: int = 0,
    ) -> torch.Tensor | None:
        """One optimizer step on the global ``batch``; returns this rank's loss share (last
        stage) or None. :meth:`global_loss` adds the shares up."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(batch, ledger=ledger, step=step)
        self.sum_gradients()
        optimizer.step()
        return loss

    @staticmethod
    def global_loss(loss: torch.Tensor | None) -> float:
        """The global batch loss on every rank: the sum of the last stage's shares. Reduced with
        ``distributed_c10d.all_reduce`` so a ledger does not count it as training traffic."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return float(loss)
        buf = torch.zeros((), dtype=torch.float64, device=device())
        if loss is not None:
            buf += float(loss)
        c10d.all_reduce(buf)
        return float(buf)


def traffic_by_kind(
    report: dict[str, Any], groups: SequenceDataGroups, *, measured: bool = True
) -> dict[str, int | None]:
    """Bytes this rank sent, from a :class:`~cai_labs.ledger.Ledger` report, by purpose.

    The purpose is read off each call's op and group: point-to-point and all-gathers inside the
    SP group are attention (``"SP attention"``: ring chunks or all-to-all, padding masks);
    point-to-point on the default group is the pipeline (``"PP p2p"``); all-reduces over the
    replica, SP or DP group are the gradient sum (``"grad all-reduce"``, one call or two
    depending on ``grad_sum``), over the embedding group the tied word embeddings.

    ``measured=True``: bytes measured on the wire (:func:`~cai_labs.ledger.wire_by_kind`); where
    attention's calls and the pipeline's ``isend`` overlap, they are one entry,
    ``"PP p2p + SP attention"``; every value is None where the ledger could not measure.
    ``measured=False``: the ring model's bytes (``modeled_sent_bytes``) per purpose.
    """
    kind_of = _purpose(groups, report["world_size"])
    base: dict[str, int | None] = {
        "SP attention": 0,
        "PP p2p": 0,
        "grad all-reduce": 0,
        "tied embedding all-reduce": 0,
    }
    if measured:
        got = wire_by_kind(report, kind_of)
        if got is None:
            return dict.fromkeys(base)
        for joined in [k for k in got if " + " in k]:
            for k in joined.split(" + "):
                base.pop(k, None)
        return {**base, **got}
    for rec in report["comm"]:
        base[kind_of(rec)] += rec["modeled_sent_bytes"]
    return base


def _purpose(groups: SequenceDataGroups, world_size: int) -> Callable[[dict[str, Any]], str]:
    """A function naming the purpose of one ledger record (see :func:`traffic_by_kind`)."""

    def ranks(group: dist.ProcessGroup | None) -> tuple[int, ...] | None:
        return None if group is None else tuple(dist.get_process_group_ranks(group))

    grad_groups = {ranks(g) for g in (groups.replica_group, groups.sp_group, groups.dp_group)}
    grad_groups.discard(None)
    emb = ranks(groups.embedding_group)
    sp = ranks(groups.sp_group)
    world = tuple(range(world_size))

    def kind_of(rec: dict[str, Any]) -> str:
        op, grp = rec["op"], tuple(rec["group"])
        if op == "all_reduce":
            kind = (
                "grad all-reduce"
                if grp in grad_groups
                else "tied embedding all-reduce"
                if grp == emb
                else None
            )
        elif groups.pp_size > 1 and grp == world:  # StageLinks talk on the default group
            kind = "PP p2p"
        else:
            kind = "SP attention" if grp == sp else None
        if kind is None:
            raise ValueError(f"traffic_by_kind: unexpected {op} on ranks {grp}")
        return kind

    return kind_of
