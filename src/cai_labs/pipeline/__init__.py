"""Pipeline parallelism: stages, micro-batches, point-to-point links, GPipe and 1F1B.

* :mod:`~cai_labs.pipeline.partition` — cut a GPT into contiguous stages.
* :mod:`~cai_labs.pipeline.microbatch` — split a batch into equal micro-batches.
* :mod:`~cai_labs.pipeline.p2p` — send activations forward and gradients back (``dist.isend`` /
  ``dist.recv``).
* :mod:`~cai_labs.pipeline.schedules` — the GPipe and 1F1B orders and one training step.
* :mod:`~cai_labs.pipeline.bubble` — the bubble measured from a timeline;
* :mod:`~cai_labs.pipeline.formulas` — bubble, micro-batches in flight and p2p bytes.
"""

from cai_labs.pipeline.bubble import measured_bubble, step_events
from cai_labs.pipeline.formulas import bubble_formula
from cai_labs.pipeline.microbatch import split_microbatches
from cai_labs.pipeline.p2p import StageLinks
from cai_labs.pipeline.partition import GPTStage, partition_layers
from cai_labs.pipeline.schedules import (
    SCHEDULES,
    gpipe_order,
    one_f_one_b_order,
    pipeline_step,
)

__all__ = [
    "GPTStage",
    "partition_layers",
    "split_microbatches",
    "StageLinks",
    "SCHEDULES",
    "gpipe_order",
    "one_f_one_b_order",
    "pipeline_step",
    "bubble_formula",
    "measured_bubble",
    "step_events",
]
