"""Large-batch optimizers: LARS and LAMB with per-layer trust ratios, and their LR schedules.

* :class:`LARS` — SGD + momentum, each tensor's step scaled by ``eta * ||w|| / (||g|| + wd ||w||)``
  (You et al. 2017).
* :class:`LAMB` — Adam's direction, each tensor's step scaled by ``||w|| / ||r||``
  (You et al. 2019).
* :func:`param_groups` — biases and normalisation parameters out of weight decay and trust ratio.
* :mod:`cai_labs.optim.schedules` — linear LR scaling, warm-up, cosine decay.

Both optimizers work unchanged under data parallelism: after the gradient all-reduce every rank
holds the full-batch gradient, so every rank computes the same norms, ratios and step.
"""

from cai_labs.optim.lamb import LAMB
from cai_labs.optim.lars import LARS
from cai_labs.optim.layerwise import LayerwiseOptimizer, trust_ratio
from cai_labs.optim.param_groups import param_groups
from cai_labs.optim.schedules import (
    linear_scaled_lr,
    sqrt_scaled_lr,
    warmup_cosine,
    warmup_cosine_factor,
)

__all__ = [
    "LARS",
    "LAMB",
    "LayerwiseOptimizer",
    "trust_ratio",
    "param_groups",
    "linear_scaled_lr",
    "sqrt_scaled_lr",
    "warmup_cosine",
    "warmup_cosine_factor",
]
