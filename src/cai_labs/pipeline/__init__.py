"""Pipeline parallelism: stages, micro-batches, point-to-point links, four schedules.

* :mod:`~cai_labs.pipeline.partition` — cut a GPT into contiguous stages.
* :mod:`~cai_labs.pipeline.microbatch` — split a batch into equal micro-batches.
* :mod:`~cai_labs.pipeline.p2p` — send activations forward and gradients back (``dist.isend`` /
  ``dist.recv``).
* :mod:`~cai_labs.pipeline.schedules` — the GPipe, 1F1B, interleaved 1F1B and ZB-H1 orders and
  one training step.
* :mod:`~cai_labs.pipeline.split_backward` — a backward in two passes (input, then weight
  gradients) for ZB-H1.
* :mod:`~cai_labs.pipeline.bubble` — the bubble measured from a timeline;
* :mod:`~cai_labs.pipeline.formulas` — bubble, micro-batches in flight and p2p bytes.
"""

from cai_labs.pipeline.bubble import measured_bubble, step_events, waiting_bubble
from cai_labs.pipeline.formulas import bubble_formula, bubble_fraction
from cai_labs.pipeline.microbatch import split_microbatches
from cai_labs.pipeline.p2p import StageLinks
from cai_labs.pipeline.partition import GPTStage, partition_layers, virtual_stages
from cai_labs.pipeline.schedules import (
    SCHEDULES,
    gpipe_order,
    interleaved_order,
    one_f_one_b_order,
    pipeline_step,
    zb_h1_order,
)

__all__ = [
    "GPTStage",
    "partition_layers",
    "virtual_stages",
    "split_microbatches",
    "StageLinks",
    "SCHEDULES",
    "gpipe_order",
    "one_f_one_b_order",
    "interleaved_order",
    "zb_h1_order",
    "pipeline_step",
    "bubble_formula",
    "bubble_fraction",
    "measured_bubble",
    "step_events",
    "waiting_bubble",
]
