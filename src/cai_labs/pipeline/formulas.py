"""Pipeline parallelism's costs: the bubble, the micro-batches a stage holds, the p2p bytes.

``p`` stages, ``m`` micro-batches, ``v`` model chunks per stage (interleaved 1F1B, Narayanan et
al. 2021, section 2.2.2). GPipe and 1F1B (:mod:`~cai_labs.pipeline.schedules`) are checked
against the ledger; the interleaved schedule is not implemented here and its two formulas are the
paper's, used by :mod:`cai_labs.scale`.
"""

from __future__ import annotations

__all__ = [
    "PIPELINE_SCHEDULES",
    "bubble_formula",
    "bubble_fraction",
    "in_flight_microbatches",
    "p2p_sent_bytes",
    "P2P_HEADER_BYTES",
]

#: Schedules these formulas know: the two run here, and Megatron's interleaved 1F1B.
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved")


def bubble_formula(n_stages: int, n_micro: int) -> float:
    """``(p - 1) / (m + p - 1)``: the idle fraction of a GPipe or 1F1B step."""
    return (n_stages - 1) / (n_micro + n_stages - 1)


def bubble_fraction(schedule: str, n_stages: int, n_micro: int, chunks: int = 1) -> float:
    """Idle fraction of a step: ``(p-1) / (v m + p - 1)`` (``v = 1`` for GPipe and 1F1B).

    Interleaving ``v`` chunks per stage divides the bubble *time* ``(p-1)/(v m)`` of the ideal
    step by ``v`` (Narayanan et al. 2021, eq. after Figure 4)."""
    _check(schedule, n_stages, n_micro, chunks)
    v = chunks if schedule == "interleaved" else 1
    return (n_stages - 1) / (v * n_micro + n_stages - 1)


def in_flight_microbatches(
    schedule: str, stage: int, n_stages: int, n_micro: int, chunks: int = 1
) -> float:
    """Micro-batches whose activations stage ``stage`` holds at its peak, counted in units of
    one micro-batch through the stage's whole share of the layers.

    GPipe runs every forward first: ``m``. 1F1B starts backward after ``p - s`` forwards:
    ``min(p - s, m)``. Interleaved 1F1B on the first stage holds ``p (1 + (p-1)/(p v))``
    (Korthikanti et al. 2022, section 4.2.3), at most ``m``."""
    _check(schedule, n_stages, n_micro, chunks)
    if not 0 <= stage < n_stages:
        raise ValueError(f"stage must be in 0..{n_stages - 1}; got {stage}")
    if schedule == "gpipe":
        return n_micro
    if schedule == "1f1b":
        return min(n_stages - stage, n_micro)
    p, v = n_stages, chunks
    return min(p * (1 + (p - 1) / (p * v)) - stage, n_micro)


#: Bytes of the shape header :class:`~cai_labs.pipeline.p2p.StageLinks` sends once per link and
#: direction before the first tensor (8 int64).
P2P_HEADER_BYTES = 64


def p2p_sent_bytes(activation_bytes: int, stage: int, n_stages: int, header: int = 0) -> int:
    """Bytes stage ``stage`` sends in one step, for ``activation_bytes`` of boundary activation
    over the whole step (all micro-batches together): the activation forward (not from the last
    stage) and its gradient back (not from the first), each after ``header`` bytes (the first
    step's :data:`P2P_HEADER_BYTES`; 0 afterwards)."""
    if not 0 <= stage < n_stages:
        raise ValueError(f"stage must be in 0..{n_stages - 1}; got {stage}")
    return (activation_bytes + header) * ((stage < n_stages - 1) + (stage > 0))


def _check(schedule: str, n_stages: int, n_micro: int, chunks: int) -> None:
    if schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"schedule must be one of {PIPELINE_SCHEDULES}; got {schedule!r}")
    if n_stages < 1 or n_micro < 1 or chunks < 1:
        raise ValueError(
            f"stages, micro-batches and chunks must be >= 1; got {n_stages}, {n_micro}, {chunks}"
        )
    if schedule == "interleaved" and n_micro % n_stages:
        raise ValueError(
            f"the interleaved schedule needs micro-batches ({n_micro}) divisible by the "
            f"pipeline size ({n_stages}); change --microbatches"
        )
