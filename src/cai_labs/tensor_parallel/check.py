"""Check a tensor-parallel block against its serial twin, and measure it, on every rank.

Used by the tests and the tutorial alike: run the serial :class:`~cai_labs.models.gpt.Block`
and its parallel version from the same weights on the same input, compare outputs, the input
gradient and every parameter gradient (gathered back to full shape), and record with the
:class:`~cai_labs.Ledger` what the parallel forward+backward communicated and saved.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch

from cai_labs.devices import device
from cai_labs.ledger import Ledger, comm_totals, tensor_bytes
from cai_labs.models.gpt import Block, GPTConfig
from cai_labs.tensor_parallel.grid import Grid

__all__ = ["mode_module", "check_block", "check_linear", "check_gpt", "max_errors"]

_MODULES = {"1d": "layers_1d", "2d": "layers_2d", "2.5d": "layers_2p5d", "3d": "layers_3d"}


def mode_module(mode: str) -> ModuleType:
    """The layers module of ``mode`` (``"1d"``, ``"2d"``, ``"2.5d"``, ``"3d"``).

    Each has ``parallelize_block``, ``split_input``, ``gather_output`` and ``gather_full``.
    """
    if mode not in _MODULES:
        raise ValueError(f"unknown tensor parallel mode {mode!r}; choose one of {list(_MODULES)}")
    return importlib.import_module(f"cai_labs.tensor_parallel.{_MODULES[mode]}")


def max_errors(full: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest absolute difference per name (shapes must agree)."""
    out = {}
    for name, t in ref.items():
        if full[name].shape != t.shape:
            raise ValueError(f"{name}: shape {tuple(full[name].shape)} != {tuple(t.shape)}")
        out[name] = (full[name] - t).abs().max().item()
    return out


def check_block(
    grid: Grid, cfg: GPTConfig, batch: int, seed: int = 0, block: Block | None = None
) -> dict[str, Any]:
    """Serial vs parallel block on this rank; collective over ``grid`` (call on all its ranks).

    Returns ``{"out", "input_grad", "param_grads"}`` errors, ``"comm"`` (ledger totals of the
    parallel forward+backward), ``"param_bytes"`` and ``"peak_activation_bytes"`` of this rank.
    The loss is ``sum(y * w)`` for a fixed random ``w``, so every output element matters.
    """
    layers = mode_module(grid.mode)
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

    pblock = layers.parallelize_block(block, grid)
    xp = layers.split_input(x, grid).clone().requires_grad_()
    wp = layers.split_input(w, grid)
    with Ledger(model=pblock) as ledger:
        yp = pblock(xp)
        yp.backward(wp)  # the gradient of sum(y * w): no loss op in the measurement
        ledger.snapshot("after backward")
    report = ledger.report()
    y_full = layers.gather_output(yp.detach(), grid)
    dx_full = layers.gather_output(xp.grad, grid)
    grads = layers.gather_full(pblock, grads=True)
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
    layers = mode_module(grid.mode)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_features, out_features).to(device())
    x = torch.randn(batch, seq, in_features, generator=gen).to(device())
    w = torch.randn(batch, seq, out_features, generator=gen).to(device())
    xs = x.clone().requires_grad_()
    (lin(xs) * w).sum().backward()

    if grid.mode == "1d":
        from cai_labs.tensor_parallel.mappings import split_along

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


def check_gpt(
    grid: Grid, cfg: GPTConfig, batch: int, steps: int = 2, lr: float = 0.1, seed: int = 0
) -> dict[str, Any]:
    """Train the serial GPT and its :class:`~.model.TensorParallelGPT` ``steps`` SGD steps from
    the same weights on the same random tokens; return both loss curves, the largest gradient
    error at the first step and the largest parameter error at the end."""
    from cai_labs.models.gpt import GPT
    from cai_labs.tensor_parallel.model import TensorParallelGPT

    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(cfg.vocab_size, (steps, batch, cfg.seq_len), generator=gen).to(device())
    tgt = torch.randint(cfg.vocab_size, (steps, batch, cfg.seq_len), generator=gen).to(device())
    serial = GPT(cfg, seed=seed).to(device())
    par = TensorParallelGPT(serial, grid)
    opt_s = torch.optim.SGD(serial.parameters(), lr=lr)
    opt_p = torch.optim.SGD(par.parameters(), lr=lr)
    losses_s, losses_p, grad_err = [], [], None
    for step in range(steps):
        opt_s.zero_grad()
        loss_s = torch.nn.functional.cross_entropy(
            serial(idx[step]).flatten(0, 1), tgt[step].flatten()
        )
        loss_s.backward()
        opt_p.zero_grad()
        loss_p = par.loss(idx[step], tgt[step])
        loss_p.backward()
        if step == 0:
            ref = {n: p.grad for n, p in serial.named_parameters()}
            grad_err = max(max_errors(par.serial_state(grads=True), ref).values())
        opt_s.step()
        opt_p.step()
        losses_s.append(loss_s.item())
        losses_p.append(loss_p.item())
    ref = {n: p.detach() for n, p in serial.named_parameters()}
    return {
        "serial_losses": losses_s,
        "parallel_losses": losses_p,
        "grad_err": grad_err,
        "param_err": max(max_errors(par.serial_state(), ref).values()),
    }
