"""Check a tensor-parallel block against its serial twin, and measure it, on every rank.

Used by the tests and the tutorial alike: run the serial :class:`~cai_labs.models.gpt.Block`
and its parallel version from the same weights on the same input, compare outputs, the input
gradient and every parameter gradient (gathered back to full shape), and record with the
:class:`~cai_labs.Ledger` what the parallel forward+backward communicated and saved.
"""

from __future__ import annotations

from typing import Any

import torch

from cai_labs.devices import device
from cai_labs.ledger import Ledger, comm_totals, tensor_bytes
from cai_labs.models.gpt import Block, GPTConfig
from cai_labs.tensor_parallel.grid import Grid
from cai_labs.tensor_parallel.modes import TPMode, tp_mode

__all__ = ["check_block", "check_linear", "max_errors"]


def max_errors(full: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest absolute difference per name (shapes must agree)."""
    out = {}
    for name, t in ref.items():
        if full[name].shape != t.shape:
            raise ValueError(f"{name}: shape {tuple(full[name].shape)} != {tuple(t.shape)}")
        out[name] = (full[name] - t).abs().max().item()
    return out


def check_block(
    grid: Grid,
    cfg: GPTConfig,
    batch: int,
    seed: int = 0,
    block: Block | None = None,
    mode: TPMode | None = None,
) -> dict[str, Any]:
    """Serial vs parallel block on this rank; collective over ``grid`` (call on all its ranks).

    ``mode`` defaults to ``grid.mode``'s :class:`~cai_labs.tensor_parallel.modes.TPMode`; pass
    another (e.g. tensor + sequence parallelism on a 1D grid) to check that one.

    Returns ``{"out", "input_grad", "param_grads"}`` errors, ``"comm"`` (ledger totals of the
    parallel forward+backward), ``"param_bytes"`` and ``"peak_activation_bytes"`` of this rank.
    The loss is ``sum(y * w)`` for a fixed random ``w``, so every output element matters.
    """
    mode = mode or tp_mode(grid.mode)
    gen = torch.Generator().manual_seed(seed)
    if block is None:
        torch.manual_seed(seed)
        block = Block(cfg).to(device())
    x = torch.randn(batch, cfg.seq_len, cfg.d_model, generator=gen).to(device())
    w = torch.randn(batch, cfg.seq_len, cfg.d_model, generator=gen).to(device())

    xs = x.clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    ys = block(xs)
    (ys * w).sum().backward()
    ref = {n: p.grad.detach().clone() for n, p in block.named_parameters()}

    pblock = mode.parallelize_block(block, grid)
    xp = mode.split_input(x, grid).clone().requires_grad_()
    wp = mode.split_input(w, grid)
    with Ledger(model=pblock) as ledger:
        yp = pblock(xp)
        yp.backward(wp)  # the gradient of sum(y * w): no loss op in the measurement
        ledger.snapshot("after backward")
    report = ledger.report()
    y_full = mode.gather_output(yp.detach(), grid)
    dx_full = mode.gather_output(xp.grad, grid)
    grads = mode.gather_full(pblock, grads=True)
    errors = max_errors(grads, ref)
    return {
        "out": (y_full - ys.detach()).abs().max().item(),
        "input_grad": (dx_full - xs.grad).abs().max().item(),
        "param_grads": errors,
        "comm": comm_totals(report),
        "comm_bytes": sum(r["bytes"] for r in report["comm"]),
        "comm_calls": len(report["comm"]),
        "param_bytes": tensor_bytes(list(pblock.parameters())),
        "peak_activation_bytes": report["memory"]["peak_activations"],
    }


def check_linear(
    grid: Grid,
    in_features: int,
    out_features: int,
    batch: int,
    seq: int,
    kind: str = "column",
    seed: int = 0,
) -> dict[str, Any]:
    """One ``nn.Linear`` vs its parallel version in ``grid.mode`` on ``(batch, seq, K)``.

    ``kind`` picks column- or row-parallel for 1D (row-parallel takes the input split by
    features, as after a column-parallel layer). Returns the largest errors of the output, input
    gradient, weight and bias gradients, and what the ledger measured for the parallel
    forward+backward: ``comm_bytes``, ``comm_calls``, ``activation_bytes`` (peak saved),
    ``param_bytes``.
    """
    layers = tp_mode(grid.mode).layers
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_features, out_features).to(device())
    x = torch.randn(batch, seq, in_features, generator=gen).to(device())
    w = torch.randn(batch, seq, out_features, generator=gen).to(device())
    xs = x.clone().requires_grad_()
    (lin(xs) * w).sum().backward()

    if grid.mode == "1d":
        from cai_labs.comm import split_along

        if kind == "row":
            par = layers.RowParallelLinear.from_serial(lin, grid)
            xp = split_along(x, grid.group, -1)
        else:
            par = layers.ColumnParallelLinear.from_serial(lin, grid)
            wp = split_along(w, grid.group, -1)
            xp = x.clone()
        if kind == "row":
            wp = w
    else:
        cls = {"2d": "Linear2D", "2.5d": "Linear2p5D", "3d": "Linear3D"}[grid.mode]
        par = getattr(layers, cls).from_serial(lin, grid)
        xp, wp = layers.split_input(x, grid), layers.split_input(w, grid)
        if grid.mode == "3d":  # a 3D linear swaps the last two layout axes
            wp = layers.split_input(w, grid, layers.ODD)
    xp = xp.detach().clone().requires_grad_()
    with Ledger(model=par) as ledger:
        yp = par(xp)
        yp.backward(wp)
    report = ledger.report()
    if grid.mode == "1d":
        from cai_labs.tensor_parallel.sharding import gather_by_position

        y_full, dx_full = yp.detach(), xp.grad
        if kind == "row":
            dx_full = torch.cat(gather_by_position(xp.grad, grid), dim=-1)
        else:
            y_full = torch.cat(gather_by_position(yp.detach(), grid), dim=-1)
    elif grid.mode == "3d":
        y_full = layers.gather_output(yp.detach(), grid, layers.ODD)
        dx_full = layers.gather_output(xp.grad, grid)
    else:
        y_full = layers.gather_output(yp.detach(), grid)
        dx_full = layers.gather_output(xp.grad, grid)
    grads = par.serial_state(grads=True)
    return {
        "out": (y_full - lin(x).detach()).abs().max().item(),
        "input_grad": (dx_full - xs.grad).abs().max().item(),
        "param_grads": max_errors(grads, {"weight": lin.weight.grad, "bias": lin.bias.grad}),
        "comm_bytes": sum(r["bytes"] for r in report["comm"]),
        "comm_calls": len(report["comm"]),
        "activation_bytes": report["memory"]["peak_activations"],
        "param_bytes": tensor_bytes(list(par.parameters())),
    }
