r"""LARS: layer-wise adaptive rate scaling for SGD with momentum (You, Gitman, Ginsburg 2017).

"Large Batch Training of Convolutional Networks", arXiv:1708.03888, Algorithm 1. For each layer
(parameter tensor) :math:`w^l` with gradient :math:`g^l = \nabla L(w^l_t)`, global learning
rate :math:`\gamma_t`, trust coefficient :math:`\eta` (0.001 in the paper), weight decay
:math:`\beta` and momentum :math:`m`:

.. math::

    \lambda^l &= \eta\,\frac{\|w^l_t\|}{\|g^l\| + \beta\,\|w^l_t\| + \epsilon}
        \qquad\text{(local learning rate, "trust ratio")}\\
    v^l_{t+1} &= m\,v^l_t + \gamma_t\,\lambda^l\,\big(g^l + \beta\,w^l_t\big)\\
    w^l_{t+1} &= w^l_t - v^l_{t+1}

with :math:`v_0 = 0` and :math:`\lambda^l = 1` if :math:`\|w^l\|` or :math:`\|g^l\|` is zero.
Note that the denominator uses :math:`\|g\| + \beta\|w\|`, an upper bound of
:math:`\|g + \beta w\|`, as in the paper. The step of every layer has norm about
:math:`\gamma\eta\|w\|`: a fixed fraction of the layer's own size, whatever its gradient scale.

Tensors in a group with ``adapt=False`` (biases, normalisation parameters: see
:func:`~cai_labs.optim.param_groups`) use :math:`\lambda = 1`, i.e. plain momentum SGD with
rate :math:`\gamma_t`.

**Where the learning rate enters the momentum.** The paper accumulates the *scaled* step
:math:`\gamma_t\lambda^l(g+\beta w)` in :math:`v` (``lr_in_momentum=True``, the default).
Colossal-AI's ``Lars`` (like PyTorch's SGD) accumulates the raw :math:`g+\beta w` and multiplies
the whole buffer by the current :math:`\gamma_t\lambda^l` (``lr_in_momentum=False``). The two
agree on the first step and whenever :math:`\gamma_t\lambda^l` is constant; they differ when the
rate or the ratio changes (warm-up, decay). Colossal-AI also clips the ratio at 50 and the
gradient elementwise at :math:`\pm 10`; ``max_trust_ratio`` reproduces the first, the second is
not done here (it never binds for gradients below 10, which the cross-check asserts).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from cai_labs.optim.layerwise import LayerwiseOptimizer, trust_ratio

__all__ = ["LARS"]


class LARS(LayerwiseOptimizer):
    """SGD with momentum and a per-tensor trust ratio (see the module docstring for equations).

    Args:
        params: tensors or parameter groups; groups may set ``adapt=False`` and ``names``.
        lr: the global learning rate :math:`\\gamma` (the one a schedule changes).
        momentum: :math:`m`, 0 for none.
        weight_decay: :math:`\\beta` (L2 penalty, added to the gradient and to the ratio's
            denominator).
        trust_coefficient: :math:`\\eta`, how far (relative to ``||w||``) a layer moves per unit
            of ``lr``.
        eps: added to the ratio's denominator.
        max_trust_ratio: clip :math:`\\lambda` from above (None: no clip).
        lr_in_momentum: True: the paper's :math:`v \\leftarrow m v + \\gamma\\lambda d`;
            False: Colossal-AI's :math:`v \\leftarrow m v + d`, then
            :math:`w \\leftarrow w - \\gamma\\lambda v`.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 0.0,
        max_trust_ratio: float | None = None,
        lr_in_momentum: bool = True,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0; got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1); got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")
        if trust_coefficient <= 0:
            raise ValueError(f"trust_coefficient must be > 0; got {trust_coefficient}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0; got {eps}")
        if max_trust_ratio is not None and max_trust_ratio <= 0:
            raise ValueError(f"max_trust_ratio must be > 0 or None; got {max_trust_ratio}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            max_trust_ratio=max_trust_ratio,
            lr_in_momentum=lr_in_momentum,
            adapt=True,
            names=None,
        )
        super().__init__(params, defaults)

    def update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> None:
        lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
        if group["adapt"]:
            w_norm = torch.linalg.vector_norm(p)
            g_norm = torch.linalg.vector_norm(grad)
            ratio = trust_ratio(
                w_norm,
                g_norm + wd * w_norm + group["eps"],
                group["trust_coefficient"],
                group["max_trust_ratio"],
            )
            state["trust_ratio"] = ratio.item()
            local_lr = lr * state["trust_ratio"]
        else:
            local_lr = lr
        d = grad.add(p, alpha=wd) if wd != 0 else grad.clone()
        if group["lr_in_momentum"]:
            d.mul_(local_lr)  # gamma * lambda * (g + beta w), accumulated in the buffer
            p.sub_(_momentum(state, d, m))
        else:
            p.add_(_momentum(state, d, m), alpha=-local_lr)  # buffer of g + beta w, scaled last


def _momentum(state: dict, d: torch.Tensor, m: float) -> torch.Tensor:
    """``v <- m v + d`` (``v = d`` on the first step); returns ``v``, or ``d`` if ``m == 0``."""
    if m == 0:
        return d
    buf = state.get("momentum_buffer")
    if buf is None:
        buf = state["momentum_buffer"] = d
    else:
        buf.mul_(m).add_(d)
    return buf
