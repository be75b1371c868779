r"""LAMB: layer-wise adaptive moments for large batches (You et al. 2019, ICLR 2020).

"Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", arXiv:1904.00962,
Algorithm 2. Adam's direction, LARS's per-layer scaling. For each layer (parameter tensor)
:math:`x` with gradient :math:`g_t`, step :math:`t = 1, 2, \dots`, rate :math:`\eta_t`, decay
:math:`\lambda`:

.. math::

    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\,g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1-\beta_2)\,g_t^2\\
    \hat m_t &= m_t / (1-\beta_1^t), \qquad \hat v_t = v_t / (1-\beta_2^t)
        \qquad\text{(bias correction)}\\
    r_t &= \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon} + \lambda\,x_t\\
    x_{t+1} &= x_t - \eta_t\,\frac{\phi(\|x_t\|)}{\|r_t\|}\,r_t

with :math:`\phi` the identity (optionally the ratio is clipped at ``max_trust_ratio``) and a
ratio of 1 when :math:`\|x_t\|` or :math:`\|r_t\|` is zero. Unlike LARS, the weight decay is
*inside* the norm of the update (:math:`\|r_t\|` includes :math:`\lambda x_t`, AdamW style,
decoupled from the moments). Every layer's step has norm :math:`\eta_t\|x_t\|`.

Tensors in a group with ``adapt=False`` (biases, normalisation parameters) get ratio 1: plain
Adam(W) with rate :math:`\eta_t`.

**Colossal-AI's ``Lamb``** (adapted from cybertronai/pytorch-lamb) follows arXiv v3 of the paper:
no bias correction (``bias_correction=False`` here reproduces it), ``eps=1e-6``, the same ratio
:math:`\|x\|/\|r\|` with the decay inside :math:`r`, no clip, and it applies the ratio to every
tensor (it has no ``adapt`` flag; a group with ``weight_decay=0`` still gets a ratio).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from cai_labs.optim.layerwise import LayerwiseOptimizer, trust_ratio

__all__ = ["LAMB"]


class LAMB(LayerwiseOptimizer):
    """Adam with a per-tensor trust ratio (see the module docstring for the equations).

    Args:
        params: tensors or parameter groups; groups may set ``adapt=False`` and ``names``.
        lr: :math:`\\eta`.
        betas: :math:`(\\beta_1, \\beta_2)`.
        eps: added to :math:`\\sqrt{\\hat v}`.
        weight_decay: :math:`\\lambda`, decoupled (added to the Adam direction, not the gradient).
        bias_correction: divide the moments by :math:`1-\\beta^t` (paper, final version).
        max_trust_ratio: clip the ratio from above (None: no clip).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        max_trust_ratio: float | None = None,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0; got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must both be in [0, 1); got {betas}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0; got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")
        if max_trust_ratio is not None and max_trust_ratio <= 0:
            raise ValueError(f"max_trust_ratio must be > 0 or None; got {max_trust_ratio}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            max_trust_ratio=max_trust_ratio,
            adapt=True,
            names=None,
        )
        super().__init__(params, defaults)

    def update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> None:
        b1, b2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        if group["bias_correction"]:
            m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        else:
            m_hat, v_hat = m, v
        r = m_hat / (v_hat.sqrt() + group["eps"])
        if wd != 0:
            r.add_(p, alpha=wd)
        if group["adapt"]:
            ratio = trust_ratio(
                torch.linalg.vector_norm(p),
                torch.linalg.vector_norm(r),
                1.0,
                group["max_trust_ratio"],
            )
            state["trust_ratio"] = ratio.item()
            p.add_(r, alpha=-lr * state["trust_ratio"])
        else:
            p.add_(r, alpha=-lr)
