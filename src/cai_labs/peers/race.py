"""cai_labs against PyTorch's engines on the same model, step by step, on the same ranks.

Each function runs *both* engines inside one launch, on the same batches, alternating their
steps (a cai_labs step, then a PyTorch step, ...) so that whatever else the machine is doing
slows both alike. It returns both loss curves (they must agree: same weights, same data) and
the median step time of each, from which the step-time ratio cai_labs / PyTorch follows.
Call them inside a worker started by :func:`cai_labs.launch`; models and batches go on
:func:`cai_labs.device`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from cai_labs.devices import device
from cai_labs.layouts import Layout
from cai_labs.models.gpt import GPTConfig
from cai_labs.peers.dtensor_tp import dtensor_tp_gpt
from cai_labs.peers.torch_pipelining import TorchPipeline
from cai_labs.unified import ParallelGPT, lm_loss

__all__ = ["race_tensor_parallel", "race_pipeline"]

Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def _summary(losses: list[float], times: list[float], warmup: int) -> dict:
    return {"losses": losses, "step_s": statistics.median(times[warmup:] or times)}


def _global_loss(loss: torch.Tensor | None) -> float:
    """The loss held by the last pipeline rank, on every rank (not part of the timed step)."""
    buf = torch.zeros((), device=device())
    if loss is not None:
        buf += float(loss)
    dist.all_reduce(buf)
    return float(buf)


Engine = tuple[Callable[[torch.Tensor, torch.Tensor], object], Callable[[object], float]]


def _race(engines: dict[str, Engine], batches: Batches, steps: int, warmup: int) -> dict[str, dict]:
    """Alternate one timed step of each engine per batch. An engine is ``(step, loss_of)``:
    ``step(x, y)`` trains one step (timed, behind a barrier so no rank starts early) and
    ``loss_of(result)`` turns what it returned into the global loss (not timed)."""
    rec: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in engines}
    for i in range(steps):
        x, y = (t.to(device()) for t in batches(i))
        for name, (step, loss_of) in engines.items():
            dist.barrier()
            t0 = time.perf_counter()
            out = step(x, y)
            rec[name][1].append(time.perf_counter() - t0)
            rec[name][0].append(loss_of(out))
    return {name: _summary(losses, times, warmup) for name, (losses, times) in rec.items()}


def _ours(model: ParallelGPT, lr: float) -> Engine:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    return (lambda x, y: model.train_step(x, y, opt, report_loss=False)), model.global_loss


def race_tensor_parallel(
    cfg: GPTConfig, batches: Batches, steps: int, lr: float, seed: int = 0, warmup: int = 1
) -> dict[str, dict]:
    """cai_labs 1D tensor parallel vs DTensor ``ColwiseParallel``/``RowwiseParallel`` over all
    ranks. Returns ``{"cai_labs": {...}, "pytorch": {...}}`` with ``losses`` and ``step_s``."""
    ours = ParallelGPT(cfg, Layout(tp=dist.get_world_size(), tp_mode="1d"), seed=seed)
    theirs = dtensor_tp_gpt(cfg, seed=seed)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=lr)

    def step_theirs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt_theirs.zero_grad(set_to_none=True)
        out = lm_loss(theirs(x), y)
        out.backward()
        opt_theirs.step()
        return out

    return _race(
        {"cai_labs": _ours(ours, lr), "pytorch": (step_theirs, lambda out: out.item())},
        batches,
        steps,
        warmup,
    )


def race_pipeline(
    cfg: GPTConfig,
    batches: Batches,
    steps: int,
    lr: float,
    n_micro: int,
    schedule: str = "1f1b",
    seed: int = 0,
    warmup: int = 1,
) -> dict[str, dict]:
    """cai_labs pipeline vs ``torch.distributed.pipelining``, one stage per rank, same schedule.
    Returns ``{"cai_labs": {...}, "pytorch": {...}}`` with ``losses`` and ``step_s``."""
    n = dist.get_world_size()
    ours = ParallelGPT(cfg, Layout(pp=n, n_micro=n_micro, schedule=schedule), seed=seed)
    theirs = TorchPipeline(cfg, n_micro, schedule, lm_loss, seed=seed)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=lr)

    def step_theirs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        opt_theirs.zero_grad(set_to_none=True)
        out = theirs.step(x, y)
        opt_theirs.step()
        return out

    return _race(
        {"cai_labs": _ours(ours, lr), "pytorch": (step_theirs, _global_loss)},
        batches,
        steps,
        warmup,
    )
