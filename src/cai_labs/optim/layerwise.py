"""What LARS and LAMB share: a per-layer *trust ratio* that rescales each tensor's step.

With a large batch, the linear scaling rule (learning rate proportional to batch size) makes the
learning rate large, and a single global rate is then too large for some layers and too small
for others: the ratio :math:`\\|w\\| / \\|\\text{update}\\|` differs by orders of magnitude between
layers (You et al. 2017 show it layer by layer for AlexNet). Layer-wise adaptation multiplies each
tensor's step by a trust ratio proportional to :math:`\\|w\\| / \\|\\text{update}\\|`, so that every
layer moves by about the same *relative* amount, whatever its gradient scale.

"Layer" means one parameter tensor here (a weight matrix, a convolution kernel), as in both
papers' reference code. Tensors in a group with ``adapt=False`` (biases and normalisation
parameters, see :func:`~cai_labs.optim.param_groups`) get a ratio of 1.

:class:`LayerwiseOptimizer` stores the last ratio of every tensor in ``state[p]["trust_ratio"]``
and :meth:`LayerwiseOptimizer.trust_ratios` returns them by name, so that a page can trace them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim import Optimizer

__all__ = ["LayerwiseOptimizer", "trust_ratio"]


def trust_ratio(
    weight_norm: torch.Tensor,
    update_norm: torch.Tensor,
    coefficient: float = 1.0,
    max_ratio: float | None = None,
) -> torch.Tensor:
    """``coefficient * weight_norm / update_norm``, or 1 when either norm is zero.

    Zero norms: a tensor initialised to zero (``||w|| = 0``) would never move with a ratio of 0,
    and a zero update would divide by zero; both papers' reference code falls back to 1.
    ``max_ratio`` clips the ratio from above (the function :math:`\\phi` of the LAMB paper).
    Both norms are 0-d tensors; so is the result.
    """
    ok = (weight_norm > 0) & (update_norm > 0)
    ratio = torch.where(
        ok,
        coefficient * weight_norm / torch.where(ok, update_norm, 1.0),
        torch.ones_like(weight_norm),
    )
    if max_ratio is not None:
        ratio = ratio.clamp(max=max_ratio)
    return ratio


class LayerwiseOptimizer(Optimizer):
    """Base class: parameter groups may carry ``adapt`` (bool) and ``names`` (list of str).

    :meth:`step` walks the groups and the tensors that have a (dense) gradient and hands each one
    to :meth:`update`, which a subclass writes: the per-tensor rule is all that differs between
    LARS and LAMB.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"{type(self).__name__} does not support sparse gradients")
                self.update(p, p.grad, group, self.state[p])
        return loss

    def update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> None:
        """Change ``p`` in place from its gradient, its group's settings and its ``state``."""
        raise NotImplementedError

    def trust_ratios(self) -> dict[str, float]:
        """The trust ratio each adapted tensor used in the last step, keyed by parameter name.

        Names come from the group's ``names`` list (as made by
        :func:`~cai_labs.optim.param_groups`), else ``"group{i}.{j}"``. Tensors that have not
        stepped yet, or that are not adapted, are left out.
        """
        out: dict[str, float] = {}
        for i, group in enumerate(self.param_groups):
            if not group.get("adapt", True):
                continue
            names = group.get("names") or [f"group{i}.{j}" for j in range(len(group["params"]))]
            for name, p in zip(names, group["params"]):
                r = self.state.get(p, {}).get("trust_ratio")
                if r is not None:
                    out[name] = float(r)
        return out
