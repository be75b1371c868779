"""Train a model whose parameters, gradients and Adam moments live in chunks under a budget.

:class:`ChunkedModel` packs the model's parameters, in registration order, into parameter
chunks of ``chunk_size`` elements (each parameter becomes a view into its chunk's device
buffer) and gives every parameter chunk a gradient chunk of the same layout. Hooks on every
module that owns parameters make the right chunks resident exactly when they are used:

* forward: before a module runs, its parameter chunks are fetched and pinned (and those of the
  next modules, in the order recorded during the first step, are *prefetched* into free space);
  after it, they are unpinned and may be evicted;
* backward: a hook on the module's outputs fetches and pins its parameter chunks again just
  before its backward runs; when a parameter's gradient is complete it is added into the
  gradient chunk (fetched for that) and the parameter chunk is unpinned.

:class:`ChunkedAdam` runs data parallel over ``N`` ranks with each chunk's Adam moments on one
*owner* rank (chunk ``i`` belongs to rank ``i mod N``), as Gemini shards chunks across ranks: per
chunk, ``dist.reduce`` the gradient chunk to its owner, the owner updates the parameter chunk
with its two moment chunks (four chunks resident at once: the minimum budget), then
``dist.broadcast`` of the parameter chunk brings every replica in line.

Memory (fp32): parameters ``4Ψ`` + gradients ``4Ψ`` per rank + Adam ``8Ψ/N``, spread over the
device pool (at most ``device_budget`` bytes, enforced) and host memory (the rest).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten

from cai_labs.devices import device
from cai_labs.offload.chunk import Chunk
from cai_labs.offload.manager import ChunkManager

__all__ = ["ChunkedModel", "ChunkedAdam"]

MIN_RESIDENT_CHUNKS = 4  # the optimizer step needs param, grad, exp_avg, exp_avg_sq at once


class ChunkedModel(nn.Module):
    """Wrap ``module`` so its parameters and gradients live in managed chunks.

    Args:
        module: the model (built identically on every rank; rank 0's values are broadcast).
        chunk_size: elements per chunk; at least the largest parameter's ``numel``.
        device_budget: bytes the device pool may hold (``None``: unlimited). It must fit
            ``MIN_RESIDENT_CHUNKS`` chunks, the most the optimizer step needs at once.
        prefetch: how many upcoming modules' chunks to prefetch in forward (0: none).
        group: the data-parallel process group (default: all ranks, if initialised).
    """

    def __init__(
        self,
        module: nn.Module,
        chunk_size: int,
        device_budget: int | None,
        prefetch: int = 2,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.module = module.to(device())  # buffers too; parameters become views of chunks
        self.group = group
        self.distributed = dist.is_initialized()
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        params = [p for p in module.parameters() if p.requires_grad]
        largest = max(p.numel() for p in params)
        if chunk_size < largest:
            raise ValueError(
                f"chunk_size={chunk_size} is smaller than the largest parameter ({largest} "
                "elements); a tensor never straddles chunks: raise chunk_size"
            )
        chunk_bytes = chunk_size * params[0].element_size()
        if device_budget is not None and chunk_bytes > device_budget:
            raise ValueError(
                f"the device budget of {device_budget:,} bytes cannot hold even one chunk "
                f"({chunk_bytes:,} bytes): raise the budget or lower chunk_size"
            )
        if device_budget is not None and device_budget < MIN_RESIDENT_CHUNKS * chunk_bytes:
            raise ValueError(
                f"the device budget of {device_budget:,} bytes holds fewer than "
                f"{MIN_RESIDENT_CHUNKS} chunks of {chunk_bytes:,} bytes; the Adam step needs a "
                "parameter, a gradient and two moment chunks resident at once: raise the budget "
                f"to at least {MIN_RESIDENT_CHUNKS * chunk_bytes:,} or lower chunk_size"
            )
        if self.distributed:
            with torch.no_grad():
                for t in params + list(module.buffers()):
                    dist.broadcast(t, src=0, group=group)
        self.chunk_size = chunk_size
        self.manager = ChunkManager(device_budget)
        self.param_chunks: list[Chunk] = []
        self.grad_chunks: list[Chunk] = []
        self.location: dict[int, tuple[int, int]] = {}  # id(param) -> (chunk index, offset)
        self.numel = sum(p.numel() for p in params)
        with torch.no_grad():
            for p in params:
                if not self.param_chunks or self.param_chunks[-1].used + p.numel() > chunk_size:
                    i = len(self.param_chunks)
                    self.param_chunks.append(self.manager.register(Chunk("param", i, chunk_size)))
                    self.grad_chunks.append(self.manager.register(Chunk("grad", i, chunk_size)))
                c = self.param_chunks[-1]
                off = c.used
                c.host[off : off + p.numel()].copy_(p.detach().reshape(-1))
                p.data = c.view(off, p.shape)
                c.used += p.numel()
                self.location[id(p)] = (c.index, off)
        self.params = params
        self.prefetch_depth = prefetch
        self._order: list[nn.Module] = []  # forward order of modules, recorded in step 1
        self._recording = True
        self._pending: dict[int, int] = defaultdict(int)  # param -> backward pins to release
        self._queued = False
        self._owners: dict[int, list[nn.Parameter]] = {}
        for m in module.modules():
            own = [p for p in m.parameters(recurse=False) if id(p) in self.location]
            if own:
                self._owners[id(m)] = own
                m.register_forward_pre_hook(self._pre_forward)
                m.register_forward_hook(self._post_forward)
        for p in params:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    # -- which chunks a module needs -------------------------------------------------------------
    def _chunks_of(self, m: nn.Module) -> list[Chunk]:
        idx = sorted({self.location[id(p)][0] for p in self._owners[id(m)]})
        return [self.param_chunks[i] for i in idx]

    def _pre_forward(self, m: nn.Module, args: tuple[Any, ...]) -> None:
        for c in self._chunks_of(m):
            self.manager.fetch(c)
        if self._recording:
            self._order.append(m)
        elif self.prefetch_depth:
            try:
                k = self._order.index(m)
            except ValueError:
                return
            ahead = self._order[k + 1 : k + 1 + self.prefetch_depth]
            self.manager.prefetch(c for n in ahead for c in self._chunks_of(n))

    def _post_forward(self, m: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        for c in self._chunks_of(m):
            self.manager.unpin(c)
        if torch.is_grad_enabled():
            for t in tree_flatten(output)[0]:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(self._pre_backward(m))

    def _pre_backward(self, m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            for p in self._owners[id(m)]:
                self.manager.fetch(self.param_chunks[self.location[id(p)][0]])
                self._pending[id(p)] += 1
            return grad

        return hook

    def _grad_ready(self, p: nn.Parameter) -> None:
        if not self._queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._queued = True
        i, off = self.location[id(p)]
        g = self.manager.fetch(self.grad_chunks[i])
        with torch.no_grad():
            g.data[off : off + p.numel()].add_(p.grad.reshape(-1))
        g.dirty = True
        self.manager.unpin(g)
        p.grad = None
        self._release(p)

    def _release(self, p: nn.Parameter) -> None:
        c = self.param_chunks[self.location[id(p)][0]]
        for _ in range(self._pending.pop(id(p), 0)):
            self.manager.unpin(c)

    def _end_of_backward(self) -> None:
        for p in self.params:
            self._release(p)
        self._queued = False
        self._recording = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    # -- results ---------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's ``state_dict`` with current values (copies, from host memory)."""
        self.manager.flush()
        out: dict[str, torch.Tensor] = {}
        for name, p in self.module.named_parameters(remove_duplicate=False):
            i, off = self.location[id(p)]
            out[name] = self.param_chunks[i].host[off : off + p.numel()].view(p.shape).clone()
        for name, b in self.module.named_buffers():
            out[name] = b.detach().clone()
        return out

    def state_bytes(self) -> dict[str, int]:
        """Bytes of model states by kind (param, grad, exp_avg, exp_avg_sq) in all chunks."""
        out: dict[str, int] = defaultdict(int)
        for c in self.manager.chunks:
            out[c.kind] += c.nbytes
        return dict(out)


class ChunkedAdam:
    """Adam (as ``torch.optim.Adam``, no weight decay) on the chunks of a :class:`ChunkedModel`.

    Chunk ``i``'s moments exist only on rank ``i mod N``, created zero on first use in host
    memory and moved like any chunk.
    """

    def __init__(
        self,
        model: ChunkedModel,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.model = model
        self.lr, self.betas, self.eps = lr, betas, eps
        self.t = 0
        m = model.manager
        self.moments: dict[int, tuple[Chunk, Chunk]] = {}
        for i in range(len(model.param_chunks)):
            if self.owner(i) == model.rank:
                self.moments[i] = (
                    m.register(Chunk("exp_avg", i, model.chunk_size)),
                    m.register(Chunk("exp_avg_sq", i, model.chunk_size)),
                )

    def owner(self, i: int) -> int:
        return i % self.model.world_size

    def _global(self, rank: int) -> int:
        g = self.model.group
        return dist.get_global_rank(g, rank) if g is not None else rank

    @torch.no_grad()
    def step(self) -> None:
        """Reduce each gradient chunk to its owner, update there, broadcast the parameters."""
        model, m = self.model, self.model.manager
        self.t += 1
        beta1, beta2 = self.betas
        bias1 = 1 - beta1**self.t
        bias2_sqrt = math.sqrt(1 - beta2**self.t)
        for i, (pc, gc) in enumerate(zip(model.param_chunks, model.grad_chunks)):
            owner = self.owner(i)
            m.fetch(gc)
            if model.world_size > 1:
                dist.reduce(gc.data, dst=self._global(owner), group=model.group)
            if owner == model.rank:
                grad = gc.data.div_(model.world_size)
                ea, eas = self.moments[i]
                for c in (pc, ea, eas):
                    m.fetch(c)
                ea.data.lerp_(grad, 1 - beta1)
                eas.data.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (eas.data.sqrt() / bias2_sqrt).add_(self.eps)
                pc.data.addcdiv_(ea.data, denom, value=-self.lr / bias1)
                for c in (ea, eas):
                    c.dirty = True
                    m.unpin(c)
                m.unpin(pc)
            m.unpin(gc)
            if model.world_size > 1:
                m.fetch(pc)
                dist.broadcast(pc.data, src=self._global(owner), group=model.group)
                m.unpin(pc)
            pc.dirty = True

    def zero_grad(self) -> None:
        for gc in self.model.grad_chunks:
            gc.host.zero_()
            if gc.resident:
                gc.data.zero_()
            gc.dirty = False
