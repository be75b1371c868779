"""Composition: one GPT in any DP x PP x TP (x SP, ZeRO) layout, from one :class:`Layout`.

* :mod:`~cai_labs.hybrid.layout` — :class:`Layout` (the degrees) and its rank arithmetic.
* :mod:`~cai_labs.hybrid.apply` — ``parallelize(model, layout)``: ``apply_tp``,
  ``apply_sp``, ``apply_pp``, ``apply_zero`` / ``apply_dp``, in that order.
* :mod:`~cai_labs.hybrid.model` — :class:`ParallelGPT`, this rank's part, and its train step.
* :mod:`~cai_labs.hybrid.costs` — per-rank parameter and traffic formulas of a layout.
* :mod:`~cai_labs.hybrid.check` — a parallel GPT trained next to its serial twin.
"""

from cai_labs.hybrid.apply import (
    apply_dp,
    apply_pp,
    apply_sp,
    apply_tp,
    apply_zero,
    parallelize,
)
from cai_labs.hybrid.costs import RankCost, classify_comm, predicted_cost
from cai_labs.hybrid.layout import PRESETS, Layout
from cai_labs.hybrid.model import LayoutGroups, ParallelGPT, lm_loss

__all__ = [
    "Layout",
    "PRESETS",
    "ParallelGPT",
    "LayoutGroups",
    "lm_loss",
    "parallelize",
    "apply_tp",
    "apply_sp",
    "apply_pp",
    "apply_dp",
    "apply_zero",
    "RankCost",
    "predicted_cost",
    "classify_comm",
]
