"""GPipe and 1F1B: in which order each stage runs the forwards and backwards of micro-batches.

Both schedules compute exactly the same gradients (the sum over micro-batches of the gradient of
``loss_i / m``); they differ in *when* each stage runs what, which sets two costs:

* **Bubble** — the fraction of a step a stage sits idle. With ``p`` stages, ``m`` micro-batches
  and equal forward+backward time per micro-batch on every stage, both schedules idle for
  ``(p - 1)`` slots out of ``m + p - 1``: bubble ``= (p - 1) / (m + p - 1)`` (GPipe paper).
* **Activation memory** — GPipe runs all ``m`` forwards, then all ``m`` backwards, so every
  stage holds the activations of all ``m`` micro-batches at its peak. 1F1B (PipeDream-Flush,
  Megatron-LM) lets stage ``s`` run only ``p - s - 1`` warm-up forwards, then alternates one
  forward with one backward, so it never holds more than ``min(p - s, m)`` micro-batches.

Each forward and backward is recorded on the ledger's timeline as ``F``/``B`` with its
``microbatch`` and ``stage``, so the measured schedule can be drawn as a Gantt chart; the
events cover computation only (waiting for a neighbour's message is the gap between them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from cai_labs.ledger import Ledger
from cai_labs.pipeline.microbatch import split_microbatches
from cai_labs.pipeline.p2p import StageLinks

__all__ = ["SCHEDULES", "pipeline_step", "gpipe_order", "one_f_one_b_order"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


SCHEDULES: dict[str, Callable[[int, int, int], list[tuple[str, int]]]] = {
    "gpipe": gpipe_order,
    "1f1b": one_f_one_b_order,
}


def pipeline_step(
    stage_module: nn.Module,
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
        stage_module: this rank's stage (e.g. :class:`~cai_labs.pipeline.partition.GPTStage`).
        links: the global ranks of the previous and next stage.
        inputs: the batch ``(B, ...)``, fed to the first stage (passed on every stage: its size
            fixes the shapes of the messages).
        targets: the batch's targets ``(B, ...)``, scored on the last stage.
        n_micro: micro-batches ``m``; must divide ``B``.
        loss_fn: ``loss_fn(output, target)`` -> mean loss of a micro-batch.
        schedule: ``"gpipe"`` or ``"1f1b"``.
        ledger: if given, each forward/backward is recorded as a timeline event ``F``/``B``
            with ``microbatch``, ``stage``, ``step`` and ``rank``.
        step: the step number written on the events.
        extra_inputs: optional per-sample data ``(B, ...)`` that *every* stage needs besides the
            activation, e.g. BERT's attention mask (each encoder layer masks the padded keys).
            It is cut into the same micro-batches and each stage is called as
            ``stage_module(x, extra)``; every rank has it, so it is never sent between stages.

    Returns:
        On the last stage the batch loss (mean of the micro-batch losses, detached); else None.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
    first, last = stage == 0, stage == n_stages - 1
    if inputs is None or targets is None:
        raise ValueError(
            "every stage passes the batch's `inputs` and `targets`: the first stage feeds the "
            "inputs, the last scores the targets, all use the batch size to agree on shapes"
        )
    in_mbs = split_microbatches(inputs, n_micro)
    tgt_mbs = split_microbatches(targets, n_micro)
    extra_mbs = None if extra_inputs is None else split_microbatches(extra_inputs, n_micro)
    key = in_mbs[0].shape[0]  # the micro-batch size: both ends of a link know it

    rank = dist.get_rank() if dist.is_initialized() else 0

    def event(name: str, i: int) -> contextlib.AbstractContextManager:
        if ledger is None:
            return contextlib.nullcontext()
        return ledger.event(name, microbatch=i, stage=stage, step=step, rank=rank)

    stage_inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    losses: list[torch.Tensor] = []
    for kind, i in SCHEDULES[schedule](stage, n_stages, n_micro):
        if kind == "F":
            x = in_mbs[i] if first else links.recv_forward(key)
            with event("F", i):
                out = stage_module(x) if extra_mbs is None else stage_module(x, extra_mbs[i])
                if last:
                    out = loss_fn(out, tgt_mbs[i]) / n_micro
                    losses.append(out.detach())
            if not last:
                links.send_forward(out, key)
            stage_inputs[i], outputs[i] = x, out
        else:
            grad = None if last else links.recv_backward(key)
            x, out = stage_inputs.pop(i), outputs.pop(i)
            with event("B", i):
                out.backward(grad)
            if not first:
                if x.grad is None:
                    raise RuntimeError(
                        f"stage {stage}: its input got no gradient; the stage's output does not "
                        "depend on its input through autograd"
                    )
                links.send_backward(x.grad, key)
    links.wait()
    return torch.stack(losses).sum() if last else None
