"""Train a serial GPT and its parallel twin from the same weights and compare them."""

from __future__ import annotations

import copy
from typing import Any

import torch

from cai_labs.devices import device
from cai_labs.hybrid.apply import parallelize
from cai_labs.hybrid.layout import Layout
from cai_labs.models.gpt import GPT, GPTConfig
from cai_labs.tensor_parallel.check import max_errors
from cai_labs.tensor_parallel.grid import Grid

__all__ = ["check_gpt"]


def check_gpt(
    grid: Grid, cfg: GPTConfig, batch: int, steps: int = 2, lr: float = 0.1, seed: int = 0
) -> dict[str, Any]:
    """Train the serial GPT and ``parallelize(gpt, Layout(tp=grid's size and mode))``
    ``steps`` SGD steps from the same weights on the same random tokens; return both loss
    curves, the largest gradient error at the first step and the largest parameter error at
    the end. Collective over ``grid``'s ranks (the whole world)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(cfg.vocab_size, (steps, batch, cfg.seq_len), generator=gen).to(device())
    tgt = torch.randint(cfg.vocab_size, (steps, batch, cfg.seq_len), generator=gen).to(device())
    serial = GPT(cfg, seed=seed).to(device())
    layout = Layout(tp=grid.size, tp_mode=grid.mode, tp_depth=grid.depth)
    par = parallelize(copy.deepcopy(serial), layout)
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
