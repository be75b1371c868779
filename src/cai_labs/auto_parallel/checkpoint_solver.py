"""Step 6: automatic activation checkpointing of a chain of stages under a memory budget.

Backward needs the activations that forward saved. Checkpointing a stage keeps only its input
during forward and recomputes the stage's forward just before its backward: memory for time.
Which stages to checkpoint is an optimisation problem over the chain (Chen et al. 2016's
sqrt(n) rule is a special case; Checkmate solves it as an integer program, rotor by dynamic
programming). This module solves the single-level version exactly by dynamic programming.

Model (per stage ``i``, measured by :func:`profile_chain` with the :class:`~cai_labs.Ledger`):
``m_i`` bytes saved for backward inside the stage, ``in_i`` bytes of its input, ``t_i`` seconds
of its forward. With ``S`` the set of checkpointed stages and ``k_j = in_j if j in S else m_j``
the bytes stage ``j`` keeps after forward, the activation peak is

    peak = max( sum_j k_j ,  max_{i in S} ( sum_{j < i} k_j + m_i ) )

(the end of forward, and the moment stage ``i`` is recomputed: stages before it still hold their
activations, stages after it are done), and the extra time is ``sum_{i in S} t_i``. The DP walks
the chain keeping, for every prefix memory ``sum_{j < i} k_j`` (in units of ``budget / grain``,
rounded up, so the answer is never optimistic), the least recompute time that reaches it; both
terms of the peak are checked as it goes. ``O(n * grain)`` time.

Not modelled: rotor's multi-level schedules (recomputing a checkpointed segment in pieces),
memory of gradients flowing between stages, and the optimizer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cai_labs.ledger import Ledger

__all__ = [
    "StageProfile",
    "profile_chain",
    "CheckpointPlan",
    "solve_checkpoint",
    "CheckpointedChain",
    "measure_peak",
    "minimum_budget",
    "predicted_peak",
]


@dataclass
class StageProfile:
    """Measured facts about one stage of the chain (see the module docstring)."""

    name: str
    saved_bytes: int  # m_i
    input_bytes: int  # in_i
    fwd_seconds: float  # t_i
    checkpointable: bool = True

    def scaled(self, factor: float) -> StageProfile:
        """Activations grow linearly with the batch: the profile at ``factor`` x the batch."""
        return StageProfile(
            self.name,
            math.ceil(self.saved_bytes * factor),
            math.ceil(self.input_bytes * factor),
            self.fwd_seconds * factor,
            self.checkpointable,
        )


def profile_chain(stages: list[nn.Module], x: torch.Tensor, reps: int = 3) -> list[StageProfile]:
    """Run the chain once, stage by stage, measuring ``m_i``, ``in_i`` and ``t_i``.

    The first stage is marked not checkpointable: its input is the data, which needs no
    gradient, and the re-entrant checkpoint would cut the parameters' gradients off.
    """
    out = []
    for i, stage in enumerate(stages):
        with Ledger(model=stage) as ledger:
            y = stage(x)
        saved = ledger.peak_activations
        times = []
        with torch.no_grad():
            for _ in range(reps):
                start = time.perf_counter()
                stage(x)
                times.append(time.perf_counter() - start)
        out.append(
            StageProfile(
                f"{i}:{type(stage).__name__}",
                saved,
                x.numel() * x.element_size(),
                sorted(times)[len(times) // 2],
                checkpointable=i > 0,
            )
        )
        x = y.detach().requires_grad_()
    return out


@dataclass
class CheckpointPlan:
    """Which stages to checkpoint, and the model's predicted peak and extra forward time."""

    checkpointed: list[bool]
    predicted_peak: int
    recompute_seconds: float
    budget: float


def predicted_peak(profiles: list[StageProfile], ckpt: list[bool]) -> int:
    """The peak formula of the module docstring for a given choice."""
    prefix, peak = 0, 0
    for p, c in zip(profiles, ckpt):
        if c:
            peak = max(peak, prefix + p.saved_bytes)
        prefix += p.input_bytes if c else p.saved_bytes
    return max(peak, prefix)


def _dp(profiles: list[StageProfile], budget: float, grain: int) -> list[bool] | None:
    unit = budget / grain
    cap = grain
    best: dict[int, tuple[float, list[bool]]] = {0: (0.0, [])}
    for p in profiles:
        m = math.ceil(p.saved_bytes / unit)
        k_in = math.ceil(p.input_bytes / unit)
        nxt: dict[int, tuple[float, list[bool]]] = {}
        for prefix, (t, choice) in best.items():
            options = [(prefix + m, t, False)]
            if p.checkpointable and prefix + m <= cap:
                options.append((prefix + k_in, t + p.fwd_seconds, True))
            for new, tt, c in options:
                if new <= cap and (new not in nxt or tt < nxt[new][0]):
                    nxt[new] = (tt, choice + [c])
        best = nxt
        if not best:
            return None
    return min(best.values(), key=lambda v: v[0])[1]


def solve_checkpoint(
    profiles: list[StageProfile], budget: float, grain: int = 400
) -> CheckpointPlan:
    """Least recompute time whose predicted activation peak fits ``budget`` bytes.

    Raises:
        ValueError: no choice fits; the message gives the smallest budget that does.
    """
    if budget <= 0:
        raise ValueError(f"budget must be a positive number of bytes; got {budget}")
    choice = _dp(profiles, budget, grain)
    if choice is None:
        raise ValueError(
            f"no checkpointing plan keeps activations under {budget / 2**20:.2f} MiB: the chain "
            f"needs at least about {minimum_budget(profiles, grain) / 2**20:.2f} MiB. Raise "
            "the budget or lower the batch."
        )
    return CheckpointPlan(
        choice,
        predicted_peak(profiles, choice),
        sum(p.fwd_seconds for p, c in zip(profiles, choice) if c),
        budget,
    )


def minimum_budget(profiles: list[StageProfile], grain: int = 400) -> float:
    """The smallest budget (within 0.1 %) for which :func:`solve_checkpoint` finds a plan."""
    lo, hi = 0.0, float(sum(p.saved_bytes for p in profiles)) * 2 + 1
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _dp(profiles, mid, grain) is not None else (mid, hi)
    return hi


class CheckpointedChain(nn.Module):
    """Run ``stages`` in order; the ones marked in ``checkpointed`` through
    ``torch.utils.checkpoint`` (re-entrant: it keeps the stage input as a tensor saved for
    backward, which the ledger sees, and recomputes under autograd during backward)."""

    def __init__(self, stages: list[nn.Module], checkpointed: list[bool]) -> None:
        super().__init__()
        if len(stages) != len(checkpointed):
            raise ValueError(f"{len(stages)} stages but {len(checkpointed)} checkpoint flags")
        self.stages = nn.ModuleList(stages)
        self.checkpointed = list(checkpointed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage, c in zip(self.stages, self.checkpointed):
            x = checkpoint(stage, x, use_reentrant=True) if c else stage(x)
        return x


def measure_peak(chain: nn.Module, x: torch.Tensor, reps: int = 1) -> dict[str, float]:
    """Forward + backward of ``chain`` under a ledger: peak saved activations, step seconds."""
    times, peak = [], 0
    for _ in range(reps):
        chain.zero_grad(set_to_none=True)
        with Ledger(model=chain) as ledger:
            start = time.perf_counter()
            chain(x).square().mean().backward()
            times.append(time.perf_counter() - start)
        peak = max(peak, ledger.peak_activations)
    return {"peak_activations": peak, "seconds": min(times)}
