r"""Learning-rate rules for large batches: scale with the batch, warm up, then decay.

* **Linear scaling** (Krizhevsky 2014; Goyal et al. 2017, "Accurate, Large Minibatch SGD"): with
  ``k`` times the batch, take ``k`` times the rate, :math:`\gamma_B = \gamma_{B_0}\,B/B_0`. One
  step on a batch of :math:`kB_0` then moves about as far as :math:`k` steps on batches of
  :math:`B_0` would, as long as the gradient changes little over those :math:`k` steps.
  **Square-root scaling** :math:`\gamma_{B_0}\sqrt{B/B_0}` keeps the variance of the step
  constant instead; the LAMB paper uses it for BERT.
* **Warm-up**: early in training the weights change fast and the linear-scaling assumption
  fails; a large rate diverges. Rising linearly from near 0 to the peak over the first steps
  (Goyal et al. used 5 epochs) lets a large batch survive its start.
* **Cosine decay** (Loshchilov & Hutter 2017): from the peak down to ``final_factor`` times the
  peak along half a cosine, so that the last steps are small and the weights settle.

The factor used at optimizer step :math:`s` (0-based) of :math:`S` steps, :math:`W` of them
warm-up, is

.. math::

    f(s) = \begin{cases} \dfrac{s+1}{W} & s < W \\[6pt]
    f_{\min} + (1-f_{\min})\,\tfrac12\Big(1+\cos\big(\pi\,\tfrac{s-W}{S-W}\big)\Big) & s \ge W
    \end{cases}
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["linear_scaled_lr", "sqrt_scaled_lr", "warmup_cosine_factor", "warmup_cosine"]


def _check_batch(batch_size: int, base_batch_size: int) -> None:
    if batch_size <= 0 or base_batch_size <= 0:
        raise ValueError(
            f"batch sizes must be positive; got batch_size={batch_size}, "
            f"base_batch_size={base_batch_size}"
        )


def linear_scaled_lr(base_lr: float, batch_size: int, base_batch_size: int) -> float:
    """``base_lr * batch_size / base_batch_size``: the rate tuned at ``base_batch_size``, scaled."""
    _check_batch(batch_size, base_batch_size)
    return base_lr * batch_size / base_batch_size


def sqrt_scaled_lr(base_lr: float, batch_size: int, base_batch_size: int) -> float:
    """``base_lr * sqrt(batch_size / base_batch_size)``."""
    _check_batch(batch_size, base_batch_size)
    return base_lr * math.sqrt(batch_size / base_batch_size)


def warmup_cosine_factor(
    step: int, total_steps: int, warmup_steps: int, final_factor: float = 0.0
) -> float:
    """The multiplier of the peak rate at 0-based ``step`` (formula in the module docstring)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive; got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be between 0 and total_steps={total_steps}; got {warmup_steps}"
        )
    if not 0 <= final_factor <= 1:
        raise ValueError(f"final_factor must be in [0, 1]; got {final_factor}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    final_factor: float = 0.0,
) -> LambdaLR:
    """A ``LambdaLR`` applying :func:`warmup_cosine_factor` to every group's initial ``lr``.

    Call ``scheduler.step()`` once after each ``optimizer.step()``; step ``s`` then runs with
    ``lr * warmup_cosine_factor(s, ...)``.
    """
    # LambdaLR evaluates the factor at step 0 as it is built, so bad arguments raise here.
    return LambdaLR(
        optimizer, lambda s: warmup_cosine_factor(s, total_steps, warmup_steps, final_factor)
    )
