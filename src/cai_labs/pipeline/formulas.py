"""Pipeline parallelism's costs: the bubble, the micro-batches a stage holds, the p2p bytes.

``p`` stages, ``m`` micro-batches, ``v`` model chunks per stage (interleaved 1F1B, Narayanan et
al. 2021, section 2.2.2). ZB-H1 (Qi et al. 2023) splits each backward into an input-gradient pass
``B`` and a weight-gradient pass ``W``. All four schedules run in
:mod:`~cai_labs.pipeline.schedules`; the bubbles are stated for equal stages, and the tests
check them against the idle time of each schedule's order played on an ideal pipeline.
"""

from __future__ import annotations

__all__ = [
    "PIPELINE_SCHEDULES",
    "bubble_formula",
    "bubble_fraction",
    "zb_h1_bubble",
    "in_flight_microbatches",
    "p2p_sent_bytes",
    "P2P_HEADER_BYTES",
]

#: Schedules these formulas know (all run in :mod:`~cai_labs.pipeline.schedules`).
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")


def bubble_formula(n_stages: int, n_micro: int) -> float:
    """``(p - 1) / (m + p - 1)``: the idle fraction of a GPipe or 1F1B step."""
    return (n_stages - 1) / (n_micro + n_stages - 1)


def bubble_fraction(schedule: str, n_stages: int, n_micro: int, chunks: int = 1) -> float:
    """Idle fraction of a step (idle time over the step's span, mean over stages).

    * GPipe, 1F1B: ``(p-1) / (m + p - 1)``.
    * interleaved, ``v`` chunks per stage of ``1/v`` the work each: ``(p-1) / (v m + p - 1)``;
      the bubble *time* relative to the ideal step is ``(p-1) / (v m)``, ``v`` times smaller
      than 1F1B's (Narayanan et al. 2021, eq. after Figure 4). Needs ``m`` divisible by ``p``.
    * zb-h1, with ``T_F = T_B = T_W`` (forward, input gradient, weight gradient): each stage
      computes ``3 m`` units and idles ``p - 1`` (1F1B idles ``3 (p - 1)``: a third, Qi et al.
      2023, section 3.1): ``(p-1) / (3 m + p - 1)``. Needs ``m >= p``.
    """
    _check(schedule, n_stages, n_micro, chunks)
    p, m = n_stages, n_micro
    if schedule == "zb-h1":
        return zb_h1_bubble(p, m)
    v = chunks if schedule == "interleaved" else 1
    return (p - 1) / (v * m + p - 1)


def zb_h1_bubble(
    n_stages: int, n_micro: int, t_f: float = 1.0, t_b: float = 1.0, t_w: float = 1.0
) -> float:
    """ZB-H1's idle fraction for forward, input-gradient and weight-gradient times ``t_f``,
    ``t_b``, ``t_w`` (per micro-batch and stage): each stage is busy ``m (t_f + t_b + t_w)``
    and idles ``(p - 1) (t_f + t_b - t_w)`` (Qi et al. 2023, section 3.1) while ``t_w <=
    min(t_f, t_b)``; a longer ``W`` no longer fits the gaps and the idle time is
    ``(p - 1) max(t_f, t_b)``. Needs ``m >= p``."""
    p, m = n_stages, n_micro
    if m < p:
        raise ValueError(
            f"the zb-h1 bubble formula needs at least as many micro-batches ({m}) as "
            f"stages ({p}), so that every stage reaches its steady state; raise --microbatches"
        )
    if min(t_f, t_b, t_w) <= 0:
        raise ValueError(f"op times must be positive; got {t_f}, {t_b}, {t_w}")
    idle = (p - 1) * max(t_f + t_b - t_w, t_f, t_b)
    return idle / (m * (t_f + t_b + t_w) + idle)


def in_flight_microbatches(
    schedule: str, stage: int, n_stages: int, n_micro: int, chunks: int = 1
) -> float:
    """Micro-batches whose activations stage ``stage`` holds at its peak, counted in units of
    one micro-batch through the stage's whole share of the layers.

    GPipe runs every forward first: ``m``. 1F1B starts backward after ``p - s`` forwards:
    ``min(p - s, m)``. ZB-H1 delays stage ``s``'s weight passes by ``s`` micro-batches, so
    every stage holds 1F1B's first-stage peak ``min(p, m)``. Interleaved 1F1B runs
    ``2 (p - s - 1) + (v - 1) p`` warm-up forwards of ``1/v`` of the stage each, then one more
    before its first backward: on the first stage ``p (1 + (p-1)/(p v))`` (Korthikanti et al.
    2022, section 4.2.3); at most ``m``."""
    _check(schedule, n_stages, n_micro, chunks)
    if not 0 <= stage < n_stages:
        raise ValueError(f"stage must be in 0..{n_stages - 1}; got {stage}")
    if schedule == "gpipe":
        return n_micro
    if schedule == "1f1b":
        return min(n_stages - stage, n_micro)
    if schedule == "zb-h1":
        return min(n_stages, n_micro)
    p, v = n_stages, chunks
    return min(2 * (p - stage - 1) + (v - 1) * p + 1, n_micro * v) / v


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
