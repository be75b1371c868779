"""What every ZeRO stage shares: units, flat buffers, the initial broadcast, checkpoints.

:class:`ZeroModel` wraps an ordinary ``nn.Module`` (the same on every rank) for data-parallel
training in which rank ``r`` of ``N`` keeps the optimizer state of only ``1/N`` of every flat
parameter buffer (:mod:`cai_labs.zero.flat`). The stages differ in what else is partitioned:

=====  ==========  =========  ===============  ===================================
stage  parameters  gradients  optimizer state  collectives per step
=====  ==========  =========  ===============  ===================================
DDP    full        full       full             all-reduce (2(N-1)/N Ψ)
1      full        full       1/N              reduce-scatter + all-gather
2      full        1/N        1/N              reduce-scatter + all-gather
3      1/N         1/N        1/N              2 all-gathers + reduce-scatter
=====  ==========  =========  ===============  ===================================

Subclasses: :class:`~cai_labs.zero.stage1.Zero1`, :class:`~cai_labs.zero.stage2.Zero2`,
:class:`~cai_labs.zero.stage3.Zero3`. They are driven by
:class:`~cai_labs.zero.optimizer.ZeroOptimizer`, whose ``step`` calls :meth:`reduce_gradients`,
the inner optimizer on the shards, then :meth:`after_step`.

Mixed precision (``param_dtype=torch.bfloat16`` or ``torch.float16``): the module is cast to that
dtype, so forward, backward, the gradients and both collectives run in 2-byte elements, while each
rank's shard of the weights, the one the optimizer updates, is an fp32 *master* copy ``(S,)``; the
optimizer's state lives beside it in fp32 (``K = 12`` bytes per parameter: master, momentum,
variance). After the step the master is rounded into the low-precision parameters (stages 1/2
all-gather it in the low dtype, stage 3 copies it into its low-precision shard). Without a master,
an update smaller than half a bf16 ulp of the weight would be rounded away.

Units: by default each element of the model's largest ``nn.ModuleList`` (the transformer
layers) is one unit and all remaining parameters (embeddings, final norm, a tied LM head) form
the root unit. A parameter shared by two modules (tied embeddings) belongs to exactly one unit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cai_labs.devices import device
from cai_labs.ledger import Ledger
from cai_labs.zero.collectives import all_gather_flat
from cai_labs.zero.flat import FlatParamUnit

__all__ = ["ZeroModel", "default_units", "LOW_PRECISION"]

LOW_PRECISION: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)


def default_units(module: nn.Module) -> list[nn.Module]:
    """The elements of ``module``'s largest ``nn.ModuleList`` (its layers), or ``[]``."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    best = max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters()))
    return [m for m in best if any(True for _ in m.parameters())]


class ZeroModel(nn.Module):
    """Base of the ZeRO stages. Use :func:`cai_labs.zero.zero_wrap` or a stage class.

    Args:
        module: the model, constructed identically on every rank (rank 0's values are broadcast).
        units: modules whose parameters form one flat unit each (default :func:`default_units`);
            pass ``[]`` for a single unit holding the whole model.
        group: the data-parallel process group (default: all ranks).
        param_dtype: ``None`` (train in the module's dtype) or ``torch.bfloat16`` /
            ``torch.float16``: low-precision parameters and gradients, fp32 master shards.

    Attributes:
        module: the wrapped model (its parameters are views into the flat buffers).
        units: the :class:`~cai_labs.zero.flat.FlatParamUnit` list, root unit last.
        shards: this rank's shard of each unit, the parameters the sharded optimizer owns
            (fp32 masters under mixed precision).
    """

    stage: int = 0

    def __init__(
        self,
        module: nn.Module,
        units: list[nn.Module] | None = None,
        group: dist.ProcessGroup | None = None,
        param_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise ValueError("ZeRO needs a process group: run inside cai_labs.launch or torchrun")
        if param_dtype not in LOW_PRECISION + (None,):
            raise ValueError(
                f"param_dtype must be None, torch.bfloat16 or torch.float16; got {param_dtype!r}"
            )
        self.param_dtype = param_dtype
        if param_dtype is not None:
            module.to(param_dtype)
        self.module = module
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        unit_modules = default_units(module) if units is None else list(units)
        names = {id(m): n for n, m in module.named_modules()}
        taken: set[int] = set()
        self.units: list[FlatParamUnit] = []
        self.unit_modules: list[nn.Module] = []
        for m in unit_modules:
            if id(m) not in names:
                raise ValueError("every unit must be a submodule of the wrapped module")
            params = [p for p in m.parameters() if p.requires_grad and id(p) not in taken]
            if not params:
                continue
            taken.update(id(p) for p in params)
            self.units.append(
                FlatParamUnit(names[id(m)], params, self.rank, self.world_size, group)
            )
            self.unit_modules.append(m)
        rest = [p for p in module.parameters() if p.requires_grad and id(p) not in taken]
        if rest:
            self.units.append(FlatParamUnit("", rest, self.rank, self.world_size, group))
            self.unit_modules.append(module)
        if not self.units:
            raise ValueError("the module has no trainable parameters")
        with torch.no_grad():  # identical replicas: rank 0's values everywhere
            src = dist.get_global_rank(group, 0) if group is not None else 0
            for u in self.units:
                dist.broadcast(u.full, src=src, group=group)
            for b in module.buffers():
                dist.broadcast(b, src=src, group=group)
        self.shards: list[nn.Parameter] = [self._make_shard(u) for u in self.units]

    # -- what the stages override -------------------------------------------------------------
    @property
    def mixed(self) -> bool:
        """True when parameters are low precision and the shards fp32 masters."""
        return self.param_dtype is not None

    def _make_shard(self, unit: FlatParamUnit) -> nn.Parameter:
        """ZeRO-1/2: the shard is a view of the full buffer, so updating it updates the model;
        under mixed precision it is an fp32 master copy of that slice instead."""
        own = unit.full_slice().to(torch.float32, copy=True) if self.mixed else unit.full_slice()
        unit.shard = nn.Parameter(own, requires_grad=False)
        return unit.shard

    def _master_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient as the shard's optimizer reads it: an fp32 copy of a low-precision one."""
        return grad.to(torch.float32) if self.mixed else grad

    def reduce_gradients(self) -> None:
        """Make ``shard.grad`` hold this rank's slice of the averaged gradient (before a step)."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Bring the replicas back in line after the shards were updated."""
        with torch.no_grad():
            for u in self.units:  # (a copy: the shard may be a view of ``full``)
                all_gather_flat(u.full, u.shard.detach().to(u.full.dtype, copy=True), self.group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.module.zero_grad(set_to_none=True)
        for s in self.shards:
            s.grad = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the sharded gradients so their global L2 norm is at most ``max_norm``.

        Each rank sums the squares of its gradient shard; one all-reduce of that scalar gives
        the norm of the full gradient (padding is zero). Same coefficient as
        ``torch.nn.utils.clip_grad_norm_``: ``min(1, max_norm / (norm + 1e-6))``. Call it after
        :meth:`reduce_gradients` (``ZeroOptimizer.clip_grad_norm_`` does both). Returns the norm
        before clipping.
        """
        with torch.no_grad():
            grads = [s.grad for s in self.shards if s.grad is not None]
            sq = torch.zeros((), dtype=torch.float64, device=device())
            for g in grads:
                sq += g.double().pow(2).sum()
            if self.world_size > 1:
                dist.all_reduce(sq, group=self.group)
            norm = sq.sqrt().to(grads[0].dtype if grads else torch.float32)
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef)
        return norm

    # -- averaging -------------------------------------------------------------------------------
    def _average(self, reduced: torch.Tensor) -> torch.Tensor:
        """The reduce-scatter sums; divide by ``N`` for the mean of the ranks' gradients."""
        return reduced.div_(self.world_size)

    # -- checkpoints and accounts ----------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded ``state_dict`` of the wrapped module, on every rank (a collective).

        Load it into a fresh copy of the model, e.g. to ``save_pretrained`` a checkpoint.
        """
        self._gather_all()
        try:
            return {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        finally:
            self._release_all()

    def _gather_all(self) -> None:
        """ZeRO-3 re-gathers here; the other stages always hold full parameters."""

    def _release_all(self) -> None:
        """ZeRO-3 frees here."""

    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Tensors this stage keeps *besides* the module's parameters/grads and optimizer state.

        Register them with ``ledger.watch(**zero_model.memory_tensors())`` (see :meth:`watch`).
        Under mixed precision the fp32 master shards are ``master_shards`` (optimizer state).
        """
        return {"master_shards": list(self.shards)} if self.mixed else {}

    def watch(self, ledger: Ledger, optimizer: torch.optim.Optimizer | None = None) -> Ledger:
        """Account this rank's memory in ``ledger``: the module's parameters and gradients, the
        sharded optimizer's state, and the stage's own shards (``param_shards``, ``grad_shards``).
        Storage shared between categories (a ZeRO-1/2 shard is a view of the full buffer) is
        counted in one category only."""
        ledger.watch(model=self.module, optimizer=optimizer)
        ledger.watch(**self.memory_tensors())
        return ledger
