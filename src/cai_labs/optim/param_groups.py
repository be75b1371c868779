"""Split a model's parameters into the groups large-batch optimizers expect.

LARS and LAMB scale each layer's step by a *trust ratio* built from the norm of that layer's
weights. For a bias or a normalisation layer's scale and shift, that ratio means little: those
tensors are small, often start at exactly zero or one, and their norm says nothing about the scale
of a useful update. Decaying them towards zero also hurts (a LayerNorm gain of zero switches the
layer off). So the usual recipe (You et al. 2017 and 2019; Goyal et al. 2017; the reference LARS
ImageNet code) is: biases and normalisation parameters get **no weight decay and no trust
ratio**; every other tensor gets both.

:func:`param_groups` returns two ``torch.optim`` parameter groups that encode exactly that:

* ``{"params": weights, "weight_decay": wd, "adapt": True, "names": [...]}``
* ``{"params": biases_and_norms, "weight_decay": 0.0, "adapt": False, "names": [...]}``

Each exclusion can be switched off on its own: excluded tensors that keep no trust ratio move
with the raw global rate, and LARS's global rate is large (its steps are ``lr * eta * ||w||``
with ``eta ~ 1e-3``); some recipes therefore exclude them from decay only.

The ``adapt`` key is read by :class:`~cai_labs.optim.LARS` and :class:`~cai_labs.optim.LAMB`
(ordinary optimizers ignore it); ``names`` lets an optimizer report trust ratios per layer name.
"""

from __future__ import annotations

from torch import nn

__all__ = ["NORM_TYPES", "is_excluded", "param_groups"]

#: Module types whose parameters are normalisation scales and shifts.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)
if hasattr(nn, "RMSNorm"):
    NORM_TYPES = (*NORM_TYPES, nn.RMSNorm)


def is_excluded(module: nn.Module, param_name: str) -> bool:
    """True if the parameter ``param_name`` of ``module`` (its direct owner) is a bias or belongs
    to a normalisation layer, i.e. should get neither weight decay nor a trust ratio."""
    return isinstance(module, NORM_TYPES) or param_name == "bias" or param_name.endswith(".bias")


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.0,
    exclude_from_decay: bool = True,
    exclude_from_adaptation: bool = True,
    excluded_lr: float | None = None,
) -> list[dict]:
    """Parameter groups for LARS/LAMB: weights first, then biases and normalisation tensors.

    Args:
        model: any module; every parameter with ``requires_grad`` lands in exactly one group.
        weight_decay: the decay of the weights (and of the excluded tensors if
            ``exclude_from_decay`` is False).
        exclude_from_decay: biases and norm parameters get ``weight_decay=0``.
        exclude_from_adaptation: biases and norm parameters get ``adapt=False`` (trust ratio 1,
            so they move with the *global* rate: with LARS, whose global rate is often 10-100x
            SGD's, that can be too large; the tutorial measures it).
        excluded_lr: if given, the excluded group gets its own ``lr`` (for LARS: an SGD rate
            for the tensors that take plain SGD steps). Schedules such as ``LambdaLR`` scale
            each group's own rate, so the two stay in proportion.

    Returns:
        A list of one or two dicts to pass as the optimizer's ``params`` (each with ``params``,
        ``names``, ``weight_decay`` and ``adapt``). With both exclusions off, one group.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")
    if excluded_lr is not None and excluded_lr < 0:
        raise ValueError(f"excluded_lr must be >= 0 or None; got {excluded_lr}")
    regular: list[tuple[str, nn.Parameter]] = []
    special: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            (special if is_excluded(module, p_name) else regular).append((full, p))
    if not (exclude_from_decay or exclude_from_adaptation):
        regular, special = regular + special, []
    groups = []
    if regular:
        groups.append(
            {
                "params": [p for _, p in regular],
                "names": [n for n, _ in regular],
                "weight_decay": weight_decay,
                "adapt": True,
            }
        )
    if special:
        groups.append(
            {
                "params": [p for _, p in special],
                "names": [n for n, _ in special],
                "weight_decay": 0.0 if exclude_from_decay else weight_decay,
                "adapt": not exclude_from_adaptation,
            }
        )
        if excluded_lr is not None:
            groups[-1]["lr"] = excluded_lr
    return groups
