"""AdamW whose moments live in host memory and visit a budgeted device pool only to be updated.

ZeRO-Offload's idea for optimizer state: the Adam moments are ``8 Psi`` bytes in fp32 (``8 Psi/N``
per rank under ZeRO), twice the weights, and they are touched once per step. So keep them in host
memory, and bring each piece to the device only for its update. Here the pieces are chunks of a
:class:`~cai_labs.offload.manager.ChunkManager`: every parameter (under ZeRO: every flat shard
``(S,)``) gets an ``exp_avg`` and an ``exp_avg_sq`` chunk of its size, registered in the host
pool. ``step`` fetches the two chunks of one parameter (evicting least-recently-used chunks when
the device pool is full; a dirty chunk is copied back to host first), updates, marks them dirty
and unpins them. Between steps at most ``device_budget`` bytes of moments are resident.

The update is torch's AdamW, element for element (decoupled weight decay, bias correction):

    p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^k) * m / (sqrt(v) / sqrt(1 - b2^k) + eps)

so a model trained with it equals one trained with ``torch.optim.AdamW`` (tested through the
Lightning :class:`~cai_labs.lightning.zero_strategy.ZeroStrategy` against Lightning DDP).

Checkpoints: :meth:`state_dict` flushes the device copies and exposes the host copies as the usual
``exp_avg`` / ``exp_avg_sq`` entries; :meth:`load_state_dict` copies them back into the chunks.
Between those calls ``state`` holds only the step counts, so a memory ledger watching
``state`` sees no moments; :meth:`memory_tensors` gives the resident device copies instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from cai_labs.offload.chunk import Chunk
from cai_labs.offload.manager import ChunkManager

__all__ = ["OffloadedAdamW"]


class OffloadedAdamW(torch.optim.Optimizer):
    """AdamW with its moments in a :class:`ChunkManager` (host pool + ``device_budget`` bytes).

    Args:
        params: the parameters (one group).
        device_budget: bytes of moments that may be resident "on the device" at once; at least
            the two moment chunks of the largest parameter. ``None``: unlimited (no eviction).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        device_budget: int | None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )
        if len(self.param_groups) != 1:
            raise ValueError("OffloadedAdamW supports one parameter group")
        self.manager = ChunkManager(device_budget)
        self.chunks: dict[int, tuple[Chunk, Chunk]] = {}
        largest = 0
        for i, p in enumerate(self.param_groups[0]["params"]):
            pair = (
                Chunk("exp_avg", i, p.numel(), p.dtype, p.device),
                Chunk("exp_avg_sq", i, p.numel(), p.dtype, p.device),
            )
            largest = max(largest, 2 * pair[0].nbytes)
            self.chunks[id(p)] = pair
        if device_budget is not None and device_budget < largest:
            raise ValueError(
                f"device_budget={device_budget:,} bytes cannot hold the two moment "
                f"chunks of the largest parameter ({largest:,} bytes): raise it"
            )
        for pair in self.chunks.values():
            for c in pair:
                self.manager.register(c)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            state["step"] = state.get("step", torch.tensor(0.0)) + 1
            k = state["step"].item()
            m_chunk, v_chunk = (self.manager.fetch(c) for c in self.chunks[id(p)])
            m, v, g = m_chunk.data, v_chunk.data, p.grad.view(-1)
            p.mul_(1 - lr * wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / (1 - b2**k) ** 0.5).add_(eps)
            p.view(-1).addcdiv_(m, denom, value=-lr / (1 - b1**k))
            for c in (m_chunk, v_chunk):
                c.dirty = True
                self.manager.unpin(c)
        return loss

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The AdamW layout: host copies (made current) as ``exp_avg`` / ``exp_avg_sq``."""
        self.manager.flush()
        sd = super().state_dict()
        params = self.param_groups[0]["params"]
        for i, p in enumerate(params):
            if i in sd["state"]:
                m, v = self.chunks[id(p)]
                sd["state"][i] = {
                    **sd["state"][i],
                    "exp_avg": m.host.clone(),
                    "exp_avg_sq": v.host.clone(),
                }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Copy saved moments into the host chunks (resident device copies are dropped)."""
        super().load_state_dict(state_dict)
        for p in self.param_groups[0]["params"]:
            entry = self.state.get(p, {})
            for c, key in zip(self.chunks[id(p)], ("exp_avg", "exp_avg_sq")):
                if key in entry:
                    c.host.copy_(entry.pop(key).view(-1))
                    c.dirty = False
                    self.manager.evict(c)

    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Ledger categories: the moments resident on the device (``0`` bytes when evicted)."""
        return {"optimizer_resident": [c.data for pair in self.chunks.values() for c in pair]}
