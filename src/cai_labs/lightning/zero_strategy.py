"""A Lightning ``Strategy`` that trains with cai_labs ZeRO, the way lightning-colossalai did.

Lightning separates *what* a step computes (the ``LightningModule``) from *how* it is distributed
(the ``Strategy``). Colossal-AI reached Lightning users through such a strategy
(``lightning_colossalai.ColossalAIStrategy``): a subclass of ``DDPStrategy`` that, in ``setup``,
wraps the module in Colossal-AI's ZeRO/Gemini model and the user's optimizer in its ZeRO optimizer,
and translates checkpoints between the sharded and the full layout. :class:`ZeroStrategy` is the
same design on :mod:`cai_labs.zero`:

* ``setup``: instead of wrapping the module in ``DistributedDataParallel``, wrap it in
  :class:`~cai_labs.zero.Zero1` / :class:`~cai_labs.zero.Zero2` / :class:`~cai_labs.zero.Zero3`
  (parameters become views into flat per-unit buffers) and replace the optimizer returned by
  ``configure_optimizers`` by a :class:`~cai_labs.zero.ZeroOptimizer` of the same class and
  hyper-parameters, whose state covers only this rank's ``1/N`` shard.
* the step: Lightning's own loop runs unchanged. ``loss.backward()`` reduce-scatters gradients
  (stages 2, 3, during backward); ``optimizer.step()`` reduce-scatters (stage 1), updates the
  shard, and all-gathers the parameters (stages 1, 2).
* checkpoints: ``optimizer_state`` gathers every rank's optimizer shards into full flat tensors
  (padding stripped) so rank 0 writes an ordinary, world-size independent checkpoint, and
  ``load_optimizer_state_dict`` cuts each rank's shard back out of it. Model weights are always
  saved unsharded (ZeRO-3 gathers them for the save).

Precision plugins compose with it: ``precision="bf16-mixed"`` runs forward and backward under
CPU/GPU autocast while parameters, gradients and optimizer state stay fp32 in the flat buffers.

Units (what becomes one flat buffer, one collective) come from ``units=`` or, if absent, from a
``zero_units()`` method of the LightningModule, else :func:`cai_labs.zero.default_units`.

Offload (``offload=True``), the part of Colossal-AI's strategy that places model state between
GPU and CPU memory: the sharded optimizer's Adam moments live in the host pool of a
:class:`~cai_labs.offload.manager.ChunkManager` and visit a device pool of ``device_budget`` bytes
only to be updated (:class:`~cai_labs.offload.offloaded_adamw.OffloadedAdamW`, ZeRO-Offload's
placement of optimizer state). Parameters and gradients stay where the ZeRO stage puts them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from cai_labs.lightning.ddp import ExistingRanksDDPStrategy
from cai_labs.offload.offloaded_adamw import OffloadedAdamW
from cai_labs.zero import STAGES, ZeroModel, ZeroOptimizer

__all__ = ["ZeroStrategy"]


class ZeroStrategy(ExistingRanksDDPStrategy):
    """Data-parallel training with ZeRO ``stage`` 1, 2 or 3 from :mod:`cai_labs.zero`.

    Args:
        stage: 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters).
        units: ``fn(lightning_module) -> [modules]``, each module one flat unit.
        offload: keep the optimizer's moments in host memory (needs ``AdamW``, or ``Adam`` without
            weight decay, from ``configure_optimizers``).
        device_budget: with ``offload``, bytes of moments that may be on the device at once
            (``None``: no limit, the moments are still homed in host memory).
        **kwargs: passed to ``DDPStrategy`` (``cluster_environment``, ``process_group_backend``).
    """

    strategy_name = "cai_labs_zero"

    def __init__(
        self,
        stage: int = 2,
        units: Callable[[pl.LightningModule], list[nn.Module]] | None = None,
        offload: bool = False,
        device_budget: int | None = None,
        **kwargs: Any,
    ) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be 1, 2 or 3; got {stage!r}")
        if device_budget is not None and not offload:
            raise ValueError("device_budget only applies with offload=True")
        super().__init__(**kwargs)
        self.stage = stage
        self.offload, self.device_budget = offload, device_budget
        self._units_fn = units
        self.zero_model: ZeroModel | None = None

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        """True: checkpoints are loaded after ``setup`` has sharded the optimizer."""
        # The optimizer must be sharded before its state is loaded into it.
        return True

    @property
    def handles_gradient_clipping(self) -> bool:
        """False: clipping is refused in :meth:`setup` (each rank holds a gradient shard)."""
        return False

    def _units(self, module: pl.LightningModule) -> list[nn.Module] | None:
        if self._units_fn is not None:
            return self._units_fn(module)
        if hasattr(module, "zero_units"):
            return module.zero_units()
        return None

    def setup(self, trainer: pl.Trainer) -> None:
        """Wrap the module in the ZeRO stage and its optimizer in a ``ZeroOptimizer``."""
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            if trainer.accumulate_grad_batches != 1:
                raise ValueError("ZeroStrategy steps on every batch: set accumulate_grad_batches=1")
            if trainer.gradient_clip_val:
                raise ValueError(
                    "ZeroStrategy does not clip gradients (each rank holds a shard): "
                    "remove gradient_clip_val"
                )
            self.setup_optimizers(trainer)
            if len(self.optimizers) != 1 or self.lr_scheduler_configs:
                raise ValueError(
                    "ZeroStrategy supports one optimizer and no LR scheduler; "
                    "configure_optimizers returned more"
                )
            module = self.lightning_module
            assert module is not None
            self.zero_model = STAGES[self.stage](module, units=self._units(module))
            self.model = self.zero_model
            self.optimizers = [self._sharded_optimizer(self.optimizers[0])]
        self.setup_precision_plugin()

    def _sharded_optimizer(self, optimizer: torch.optim.Optimizer) -> ZeroOptimizer:
        """The user's optimizer over this rank's shards (moments offloaded if asked)."""
        assert self.zero_model is not None
        if not self.offload:
            return ZeroOptimizer.from_optimizer(self.zero_model, optimizer)
        group = optimizer.param_groups[0]
        is_adamw = type(optimizer) is torch.optim.AdamW
        plain_adam = type(optimizer) is torch.optim.Adam and group["weight_decay"] == 0
        if not (is_adamw or plain_adam) or group.get("amsgrad") or group.get("maximize"):
            raise ValueError(
                "offload=True supports torch.optim.AdamW (or Adam without weight "
                f"decay), no amsgrad/maximize; configure_optimizers returned "
                f"{type(optimizer).__name__}"
            )
        return ZeroOptimizer(
            self.zero_model,
            OffloadedAdamW,
            device_budget=self.device_budget,
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )

    # -- checkpoints ---------------------------------------------------------------------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Full weights (ZeRO-3 gathers them: a collective, every rank must call it)."""
        if self.zero_model is None:
            return super().lightning_module_state_dict()
        return self.zero_model.full_state_dict()

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Load full weights into the flat buffers (ZeRO-3: gathered, then re-sharded)."""
        zm = self.zero_model
        if zm is None:
            return super().load_model_state_dict(checkpoint, strict=strict)
        zm._gather_all()
        try:
            self.lightning_module.load_state_dict(checkpoint["state_dict"], strict=strict)
            with torch.no_grad():
                for u in zm.units:
                    if u.shard.untyped_storage().data_ptr() != u.full.untyped_storage().data_ptr():
                        u.shard.copy_(u.full_slice())  # ZeRO-3 shards own their storage
        finally:
            zm._release_all()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The optimizer state with every shard gathered into full flat tensors (collective)."""
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        if not isinstance(optimizer, ZeroOptimizer):
            return super().optimizer_state(optimizer)
        zm = optimizer.zero_model
        state = optimizer.inner.state_dict()
        full: dict[int, dict[str, Any]] = {}
        for i, u in enumerate(zm.units):
            entry = {}
            for key, value in state["state"].get(i, {}).items():
                if torch.is_tensor(value) and value.shape == (u.shard_numel,):
                    gathered = value.new_empty(u.padded_numel)
                    dist.all_gather_into_tensor(gathered, value.contiguous(), group=zm.group)
                    value = gathered[: u.numel].clone()
                entry[key] = value
            full[i] = entry
        return {"state": full, "param_groups": state["param_groups"], "zero_sharded": False}

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Cut this rank's shard out of each full flat state tensor and load it."""
        optimizer = self.optimizers[0]
        if not isinstance(optimizer, ZeroOptimizer):
            return super().load_optimizer_state_dict(checkpoint)
        zm = optimizer.zero_model
        saved = checkpoint["optimizer_states"][0]
        local: dict[int, dict[str, Any]] = {}
        for i, entry in saved["state"].items():
            u = zm.units[int(i)]
            local[int(i)] = {}
            for key, value in entry.items():
                if torch.is_tensor(value) and value.shape == (u.numel,):
                    padded = value.new_zeros(u.padded_numel)
                    padded[: u.numel] = value
                    value = padded[u.lo : u.hi].clone()
                local[int(i)][key] = value
        optimizer.inner.load_state_dict({"state": local, "param_groups": saved["param_groups"]})

    def teardown(self) -> None:
        """Leave the LightningModule usable after ``fit`` (ZeRO-3: full parameters again)."""
        if self.zero_model is not None:
            self.zero_model._gather_all()
        self.model = self.lightning_module
        super().teardown()
