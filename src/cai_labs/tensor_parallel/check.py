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

from cai_labs.ledger import Ledger, comm_totals, tensor_bytes
from cai_labs.models.gpt import Block, GPTConfig
from cai_labs.tensor_parallel.grid import Grid

__all__ = ["mode_module", "check_block", "max_errors"]

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
        block = Block(cfg)
    x = torch.randn(batch, cfg.seq_len, cfg.d_model, generator=gen)
    w = torch.randn(batch, cfg.seq_len, cfg.d_model, generator=gen)

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
        (yp * wp).sum().backward()
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
