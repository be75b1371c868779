"""A backward in two passes: input gradients now (``B``), weight gradients later (``W``).

Zero-bubble schedules (Qi et al. 2023) send the gradient w.r.t. a stage's input upstream as soon
as it is known and compute the weight gradients later, in time the stage would otherwise idle.
For a linear layer ``y = x A^T`` the two are separate products: ``dx = dy A`` (``B``) and
``dA = dy^T x`` (``W``); both need ``dy``, the gradient at the layer's output.

So during the forward we keep the output ``y`` of every module that owns parameters (a forward
hook). ``B`` is one ``torch.autograd.grad`` from the stage's output to its input *and* to those
outputs (``retain_graph=True``): autograd skips the weight products, since no parameter was asked
for. ``W`` then calls ``torch.autograd.grad(y, module's parameters, dy)`` per module, which runs
only that module's own backward node(s). Calling ``autograd.grad(out, parameters)`` instead
would redo the whole input-gradient chain, so ``W`` would cost ``B + W``.

This needs each parameter to be used by one module, once per forward: a parameter reached again
through a module's input (weight tying, a module called twice) would be counted twice, so that
is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["record_module_outputs", "backward_input", "backward_weight"]

#: One module's part of a forward: its parameters and its output.
Record = tuple[list[nn.Parameter], torch.Tensor]


def _owners(module: nn.Module) -> dict[nn.Module, list[nn.Parameter]]:
    owners: dict[nn.Module, list[nn.Parameter]] = {}
    seen: dict[int, str] = {}
    for name, mod in module.named_modules():
        params = [q for q in mod.parameters(recurse=False) if q.requires_grad]
        for q in params:
            if id(q) in seen:
                raise ValueError(
                    f"a parameter is owned by both {seen[id(q)]!r} and {name!r} (weight tying); "
                    "the split backward needs each parameter in one module: untie the weights "
                    "or use a schedule without a W pass"
                )
            seen[id(q)] = name
        if params:
            owners[mod] = params
    return owners


@contextlib.contextmanager
def record_module_outputs(module: nn.Module) -> Iterator[list[Record]]:
    """Within the block, the forward of ``module`` appends ``(params, output)`` for each of its
    submodules that owns parameters."""
    owners = _owners(module)
    records: list[Record] = []
    called: set[int] = set()

    def hook(mod: nn.Module, args: tuple, output: object) -> None:
        if id(mod) in called:
            raise ValueError(
                f"{type(mod).__name__} ran twice in one forward; the split backward needs each "
                "parameterised module once per forward (use a schedule without a W pass)"
            )
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"{type(mod).__name__} returns {type(output).__name__}; the split backward needs "
                "modules that own parameters to return one tensor"
            )
        called.add(id(mod))
        records.append((owners[mod], output))

    handles = [mod.register_forward_hook(hook) for mod in owners]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def backward_input(
    out: torch.Tensor, grad_out: torch.Tensor | None, x: torch.Tensor, records: list[Record]
) -> tuple[torch.Tensor | None, list[tuple[list[nn.Parameter], torch.Tensor, torch.Tensor]]]:
    """``B``: the gradient w.r.t. ``x`` (None if ``x`` needs none) and, for ``W``, each recorded
    module's ``(params, output, gradient at the output)``; the graph is kept for ``W``."""
    wants_x = x.requires_grad
    targets = ([x] if wants_x else []) + [y for _, y in records]
    if not targets:
        return None, []
    grads = torch.autograd.grad(out, targets, grad_out, retain_graph=True, allow_unused=True)
    grad_x = grads[0] if wants_x else None
    pending = [
        (params, y, g)
        for (params, y), g in zip(records, grads[int(wants_x) :], strict=True)
        if g is not None
    ]
    return grad_x, pending


def backward_weight(pending: list[tuple[list[nn.Parameter], torch.Tensor, torch.Tensor]]) -> None:
    """``W``: accumulate each module's weight gradients into ``.grad``, as ``backward`` does."""
    for params, y, g in pending:
        grads = torch.autograd.grad(y, params, g, allow_unused=True)
        for q, gq in zip(params, grads, strict=True):
            if gq is None:
                continue
            q.grad = gq if q.grad is None else q.grad + gq
