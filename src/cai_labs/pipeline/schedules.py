"""Pipeline schedules: in which order each stage runs the forwards and backwards of micro-batches.

Every schedule computes exactly the same gradients (the sum over micro-batches of the gradient of
``loss_i / m``); they differ in *when* each stage runs what, which sets two costs:

* **Bubble** — the fraction of a step a stage sits idle. With ``p`` stages, ``m`` micro-batches
  and equal forward+backward time per micro-batch on every stage, GPipe and 1F1B idle for
  ``(p - 1)`` slots out of ``m + p - 1``: bubble ``= (p - 1) / (m + p - 1)`` (GPipe paper).
* **Activation memory** — GPipe runs all ``m`` forwards, then all ``m`` backwards, so every
  stage holds the activations of all ``m`` micro-batches at its peak. 1F1B (PipeDream-Flush,
  Megatron-LM) lets stage ``s`` run only ``p - s - 1`` warm-up forwards, then alternates one
  forward with one backward, so it never holds more than ``min(p - s, m)`` micro-batches.

Two schedules cut the bubble (formulas in :mod:`~cai_labs.pipeline.formulas`):

* **Interleaved 1F1B** (Narayanan et al. 2021): each rank holds ``v`` model chunks, virtual
  stage ``c p + r`` on rank ``r``, so a micro-batch crosses the ranks ``v`` times and each
  slot lasts ``1/v`` as long; the ring of ranks wraps from the last back to the first.
* **ZB-H1** (Qi et al. 2023): the backward is split into ``B`` (input gradient, sent upstream
  at once) and ``W`` (weight gradient, :mod:`~cai_labs.pipeline.split_backward`). Stage ``s``
  defers its ``W`` passes by ``s`` micro-batches, which fills the cool-down's idle time and
  keeps ``min(p, m)`` micro-batches in flight on every stage, 1F1B's first-stage peak.

An order is a list of ops ``(kind, microbatch)`` — ``(kind, microbatch, chunk)`` for the
interleaved schedule — with ``kind`` one of ``F``, ``B`` (the whole backward, or only the input
gradient where the order has ``W`` ops) and ``W``. :func:`pipeline_step` runs any such order.

Each op is recorded on the ledger's timeline as ``F``/``B``/``W`` with its ``microbatch``,
``chunk`` and ``stage``, so the measured schedule can be drawn as a Gantt chart; the events cover
computation only. Each blocking receive is recorded as ``R`` (the time the stage waited for its
neighbour's message), so that what a stage spends between ops on its own (Python, sends) can be
told from the time it waits for the pipeline (:func:`~cai_labs.pipeline.bubble.waiting_bubble`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from cai_labs.ledger import Ledger
from cai_labs.pipeline.microbatch import split_microbatches
from cai_labs.pipeline.p2p import StageLinks
from cai_labs.pipeline.split_backward import backward_input, backward_weight, record_module_outputs

__all__ = [
    "SCHEDULES",
    "pipeline_step",
    "gpipe_order",
    "one_f_one_b_order",
    "interleaved_order",
    "zb_h1_order",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Op = tuple  # (kind, microbatch) or (kind, microbatch, chunk)


def gpipe_order(stage: int, n_stages: int, n_micro: int) -> list[tuple[str, int]]:
    """GPipe on stage ``stage``: ``F0 .. F(m-1)`` then ``B0 .. B(m-1)``."""
    return [("F", i) for i in range(n_micro)] + [("B", i) for i in range(n_micro)]


def one_f_one_b_order(stage: int, n_stages: int, n_micro: int) -> list[tuple[str, int]]:
    """1F1B on stage ``stage``: ``p - s - 1`` warm-up forwards, then one F and one B in turn,
    then the remaining backwards (cool-down)."""
    warmup = min(n_stages - stage - 1, n_micro)
    order = [("F", i) for i in range(warmup)]
    for j in range(n_micro - warmup):
        order += [("F", warmup + j), ("B", j)]
    order += [("B", i) for i in range(n_micro - warmup, n_micro)]
    return order


def zb_h1_order(stage: int, n_stages: int, n_micro: int) -> list[tuple[str, int]]:
    """ZB-H1 on stage ``stage``: 1F1B's F and B (B the input gradient only), with the weight
    pass ``W`` of micro-batch ``j - s`` after the ``j``-th B; the ``s`` deferred W passes run
    between and after the cool-down's B passes."""
    warmup = min(n_stages - stage - 1, n_micro)
    order: list[tuple[str, int]] = [("F", i) for i in range(warmup)]
    done_w = 0
    for j in range(n_micro):
        if warmup + j < n_micro:
            order.append(("F", warmup + j))
        order.append(("B", j))
        if j >= stage:
            order.append(("W", done_w))
            done_w += 1
    return order + [("W", i) for i in range(done_w, n_micro)]


def interleaved_order(
    stage: int, n_stages: int, n_micro: int, chunks: int = 2
) -> list[tuple[str, int, int]]:
    """Interleaved 1F1B on rank ``stage`` with ``chunks`` model chunks (Megatron-LM's order).

    The ``m v`` forwards run in groups of ``p`` micro-batches per chunk: micro-batches
    ``0..p-1`` through chunk 0, then through chunk 1, ..., then ``p..2p-1`` through chunk 0;
    backwards go through the chunks in reverse. Rank ``r`` runs ``2 (p - r - 1) + (v - 1) p``
    warm-up forwards, then one F and one B in turn, then the remaining backwards."""
    p, v = n_stages, chunks
    if n_micro % p:
        raise ValueError(
            f"the interleaved schedule needs micro-batches ({n_micro}) divisible by the "
            f"pipeline size ({p}); change n_micro"
        )
    total = n_micro * v

    def op(kind: str, k: int) -> tuple[str, int, int]:
        group, pos = divmod(k, p * v)
        chunk = pos // p
        return kind, group * p + pos % p, chunk if kind == "F" else v - 1 - chunk

    warmup = min(2 * (p - stage - 1) + (v - 1) * p, total)
    order = [op("F", k) for k in range(warmup)]
    for k in range(total - warmup):
        order += [op("F", warmup + k), op("B", k)]
    return order + [op("B", k) for k in range(total - warmup, total)]


SCHEDULES: dict[str, Callable[..., list[Op]]] = {
    "gpipe": gpipe_order,
    "1f1b": one_f_one_b_order,
    "interleaved": interleaved_order,
    "zb-h1": zb_h1_order,
}


class _Step:
    """The state of one step on one rank: micro-batches, saved activations, pending W passes.

    Chunk ``c`` of rank ``stage`` is virtual stage ``u = c p + stage`` of ``p v``; the message
    from ``u`` to ``u + 1`` (and its gradient back) is tagged ``2 u`` (``2 u + 1``).
    """

    def __init__(
        self,
        chunks: list[nn.Module],
        links: StageLinks,
        stage: int,
        n_stages: int,
        mbs: tuple,
        loss_fn: LossFn,
        event: Callable[[str, int, int], contextlib.AbstractContextManager],
        split: bool,
    ):
        self.chunks, self.links, self.stage, self.p = chunks, links, stage, n_stages
        self.in_mbs, self.tgt_mbs, self.extra_mbs = mbs
        self.key = self.in_mbs[0].shape[0]  # the micro-batch size: both ends of a link know it
        self.loss_fn, self.event, self.split = loss_fn, event, split
        self.n_virtual = n_stages * len(chunks)
        self.saved: dict[tuple[int, int], tuple] = {}
        self.pending: dict[tuple[int, int], list] = {}
        self.losses: list[torch.Tensor] = []

    def forward(self, i: int, c: int) -> None:
        u = c * self.p + self.stage
        first, last = u == 0, u == self.n_virtual - 1
        if first:
            x = self.in_mbs[i]
        else:
            with self.event("R", i, c):
                x = self.links.recv_forward(self.key, tag=2 * u - 2)
        module = self.chunks[c]
        rec = record_module_outputs(module) if self.split else contextlib.nullcontext([])
        with self.event("F", i, c), rec as records:
            out = module(x) if self.extra_mbs is None else module(x, self.extra_mbs[i])
            if last:
                out = self.loss_fn(out, self.tgt_mbs[i]) / len(self.in_mbs)
                self.losses.append(out.detach())
        if not last:
            self.links.send_forward(out, self.key, tag=2 * u)
        self.saved[(c, i)] = x, out, records

    def backward(self, i: int, c: int) -> None:
        u = c * self.p + self.stage
        first, last = u == 0, u == self.n_virtual - 1
        grad = None
        if not last:
            with self.event("R", i, c):
                grad = self.links.recv_backward(self.key, tag=2 * u + 1)
        x, out, records = self.saved.pop((c, i))
        with self.event("B", i, c):
            if self.split:
                grad_x, self.pending[(c, i)] = backward_input(out, grad, x, records)
            else:
                out.backward(grad)
                grad_x = None if first else x.grad
        if not first:
            if grad_x is None:
                raise RuntimeError(
                    f"stage {u}: its input got no gradient; the stage's output does not "
                    "depend on its input through autograd"
                )
            self.links.send_backward(grad_x, self.key, tag=2 * u - 1)

    def weight(self, i: int, c: int) -> None:
        with self.event("W", i, c):
            backward_weight(self.pending.pop((c, i)))


def pipeline_step(
    stage_module: nn.Module | Sequence[nn.Module],
    links: StageLinks,
    *,
    stage: int,
    n_stages: int,
    inputs: torch.Tensor | None,
    targets: torch.Tensor | None,
    n_micro: int,
    loss_fn: LossFn,
    schedule: str = "1f1b",
    ledger: Ledger | None = None,
    step: int = 0,
    extra_inputs: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Run forward and backward of one batch through this rank's stage; gradients accumulate.

    Args:
        stage_module: this rank's stage (e.g. :class:`~cai_labs.pipeline.partition.GPTStage`);
            for ``"interleaved"`` a list of its ``v`` chunks, chunk ``c`` being virtual stage
            ``c * n_stages + stage`` of ``v * n_stages``.
        links: the global ranks of the previous and next stage (for ``"interleaved"``,
            :meth:`StageLinks.ring`).
        stage: this rank's place in the pipeline, ``0 .. n_stages - 1``.
        n_stages: the number of pipeline ranks ``p``.
        inputs: the batch ``(B, ...)``, fed to the first stage (passed on every stage: its size
            fixes the shapes of the messages).
        targets: the batch's targets ``(B, ...)``, scored on the last stage.
        n_micro: micro-batches ``m``; must divide ``B``.
        loss_fn: ``loss_fn(output, target)`` -> mean loss of a micro-batch.
        schedule: a key of :data:`SCHEDULES`: ``"gpipe"``, ``"1f1b"``, ``"interleaved"``,
            ``"zb-h1"``.
        ledger: if given, each op is recorded as a timeline event ``F``/``B``/``W`` with
            ``microbatch``, ``chunk``, ``stage``, ``step`` and ``rank``; each blocking receive
            as ``R``.
        step: the step number written on the events.
        extra_inputs: optional per-sample data ``(B, ...)`` that *every* stage needs besides the
            activation, e.g. BERT's attention mask (each encoder layer masks the padded keys).
            It is cut into the same micro-batches and each stage is called as
            ``stage_module(x, extra)``; every rank has it, so it is never sent between stages.

    Returns:
        On the last stage the batch loss (mean of the micro-batch losses, detached); else None.
    """
    chunks = _chunks(stage_module, schedule)
    if inputs is None or targets is None:
        raise ValueError(
            "every stage passes the batch's `inputs` and `targets`: the first stage feeds the "
            "inputs, the last scores the targets, all use the batch size to agree on shapes"
        )
    if schedule == "interleaved":
        order = interleaved_order(stage, n_stages, n_micro, len(chunks))
    else:
        order = SCHEDULES[schedule](stage, n_stages, n_micro)
    mbs = tuple(
        None if t is None else split_microbatches(t, n_micro)
        for t in (inputs, targets, extra_inputs)
    )
    rank = dist.get_rank() if dist.is_initialized() else 0

    def event(name: str, i: int, c: int) -> contextlib.AbstractContextManager:
        if ledger is None:
            return contextlib.nullcontext()
        return ledger.event(name, microbatch=i, chunk=c, stage=stage, step=step, rank=rank)

    split = any(op[0] == "W" for op in order)
    run = _Step(chunks, links, stage, n_stages, mbs, loss_fn, event, split)
    ops = {"F": run.forward, "B": run.backward, "W": run.weight}
    for kind, i, *chunk in order:
        ops[kind](i, chunk[0] if chunk else 0)
    links.wait()
    return torch.stack(run.losses).sum() if stage == n_stages - 1 else None


def _chunks(stage_module: nn.Module | Sequence[nn.Module], schedule: str) -> list[nn.Module]:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
    many = isinstance(stage_module, (list, tuple, nn.ModuleList))
    if schedule == "interleaved":
        if not many or not stage_module:
            raise ValueError(
                "the interleaved schedule runs several model chunks per rank: pass "
                "stage_module as a list of this rank's chunks (virtual stages c * p + rank)"
            )
        return list(stage_module)
    if many:
        raise ValueError(
            f"schedule {schedule!r} runs one stage per rank; got {len(stage_module)} chunks: "
            "pass one module, or use schedule='interleaved'"
        )
    return [stage_module]
