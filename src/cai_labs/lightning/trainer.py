"""Build a Lightning ``Trainer`` for the rank this process is, by strategy name.

Inside a worker started by :func:`cai_labs.launch` (or under ``torchrun``), every rank builds the
same Trainer with ``devices=1, num_nodes=world_size`` and a
:class:`~cai_labs.lightning.environment.ProcessGroupEnvironment`, so Lightning joins the existing
process group instead of starting processes of its own.

Strategy names: ``"ddp"`` (Lightning's ``DDPStrategy``: PyTorch ``DistributedDataParallel``),
``"zero1"``, ``"zero2"``, ``"zero3"`` (:class:`~cai_labs.lightning.zero_strategy.ZeroStrategy`;
``options`` such as ``offload=True, device_budget=...`` go to it).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from cai_labs.devices import device
from cai_labs.lightning.ddp import ExistingRanksDDPStrategy
from cai_labs.lightning.environment import ProcessGroupEnvironment
from cai_labs.lightning.zero_strategy import ZeroStrategy

__all__ = ["STRATEGIES", "make_strategy", "rank_trainer"]

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")


def make_strategy(name: str, **options: Any) -> ExistingRanksDDPStrategy:
    """The strategy called ``name`` (see the module docstring), on the existing process group."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {name!r}")
    if name == "ddp" and options:
        raise ValueError(f"strategy options {sorted(options)} need a ZeRO strategy, not ddp")
    backend = dist.get_backend() if dist.is_initialized() else "gloo"
    common = {"cluster_environment": ProcessGroupEnvironment(), "process_group_backend": backend}
    if name == "ddp":
        return ExistingRanksDDPStrategy(**common)
    return ZeroStrategy(stage=int(name[-1]), **options, **common)


def rank_trainer(
    strategy: str = "ddp",
    quiet: bool = True,
    strategy_options: dict[str, Any] | None = None,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """A Trainer for this rank on :func:`cai_labs.device` (Lightning's ``"gpu"`` accelerator on
    the rank's own GPU when the group carries CUDA tensors, else ``"cpu"``): no logger,
    checkpoint callback, progress bar or summary (tutorial output stays readable);
    ``strategy_options`` go to :func:`make_strategy`; ``trainer_kwargs`` override
    (``max_steps``, ``precision``, ``callbacks``, ...)."""
    if quiet:
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # Lightning's DDP launcher sets torch's intra-op threads to (cores / processes per node) unless
    # OMP_NUM_THREADS is set. Each rank here is its own "node" of one process, so every rank
    # would take all the machine's cores: oversubscribed, many times slower, and a forked rank
    # that asks OpenMP for more threads than it started with can hang (see cai_labs.launcher).
    # Pin Lightning to the thread count the rank already has.
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    world = dist.get_world_size() if dist.is_initialized() else 1
    here = device()
    gpu = here.type == "cuda"
    kwargs: dict[str, Any] = {
        # One device per rank ("node"): on a GPU, this rank's own (``devices=[index]``), since
        # every rank's local rank is 0 to Lightning and ``devices=1`` would put all on cuda:0.
        "accelerator": "gpu" if gpu else "cpu",
        "devices": [here.index] if gpu else 1,
        "num_nodes": world,
        "strategy": make_strategy(strategy, **(strategy_options or {})),
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    kwargs.update(trainer_kwargs)
    return pl.Trainer(**kwargs)
