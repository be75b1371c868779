"""The pipeline bubble, predicted and measured from the ledger's timeline.

**Formula.** With ``p`` stages and ``m`` micro-batches, if every stage takes the same time ``t``
for a micro-batch's forward plus backward, a step lasts ``(m + p - 1) t`` (the last micro-batch
enters stage ``p-1`` after ``p-1`` slots) while each stage computes for ``m t``. The idle fraction
is ``(p - 1) / (m + p - 1)`` for GPipe and 1F1B alike; interleaved 1F1B and ZB-H1 shrink it
(:func:`~cai_labs.pipeline.formulas.bubble_fraction`).

**Measurement.** Take each stage's ``F``/``B`` (and ``W``) events of one step. The step's span
runs from the earliest start to the latest end over all stages; a stage's busy time is the sum of
its event durations; its bubble is ``1 - busy / span``; the pipeline's is the mean over stages.
That counts as idle everything a stage does between ops besides computing (Python, sends).
The formula's model has none of it; :func:`waiting_bubble` counts only the time a stage waits:
blocked in a receive (``R`` events) or before its first and after its last op of the step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from cai_labs.pipeline.formulas import bubble_formula  # noqa: F401 (old import path)

# bubble_formula: see pipeline.formulas
__all__ = ["measured_bubble", "step_events", "waiting_bubble"]


def step_events(timelines: Iterable[list[dict]], step: int, waits: bool = False) -> list[dict]:
    """The ``F``/``B``/``W`` events tagged ``step=step`` from every rank's timeline; with
    ``waits``, the receive waits ``R`` too."""
    ops = ("F", "B", "W", "R") if waits else ("F", "B", "W")
    return [e for tl in timelines for e in tl if e.get("step") == step and e["name"] in ops]


def measured_bubble(events: list[dict]) -> dict[str, float]:
    """Bubble fraction of one step from its events (each with ``stage``, ``start``, ``end``).

    Returns ``{"bubble": mean over stages, "span": seconds, "stage<s>": that stage's bubble}``.
    Events of several ranks of the same stage (data or tensor parallel copies) are averaged.
    Receive waits (``R``) are not ops: they are left out.
    """
    events = [e for e in events if e["name"] != "R"]
    if not events:
        raise ValueError("no F/B events given: record the step with a Ledger")
    span = max(e["end"] for e in events) - min(e["start"] for e in events)
    busy: dict[tuple[int, int], float] = defaultdict(float)
    for e in events:
        busy[(e["stage"], e.get("rank", 0))] += e["end"] - e["start"]
    per_stage: dict[int, list[float]] = defaultdict(list)
    for (stage, _), b in busy.items():
        per_stage[stage].append(1.0 - b / span)
    return _by_stage(per_stage, span)


def waiting_bubble(events: list[dict]) -> dict[str, float]:
    """Share of one step each stage spends waiting for the pipeline, from events with ``R``.

    The span is :func:`measured_bubble`'s (first op to last op over all stages). A rank waits
    while blocked in a receive (its ``R`` events, within the span) and outside its own ops
    (before its first op, after its last); the rest of the span counts as working, whether
    computing or not. Returns the same keys as :func:`measured_bubble`.
    """
    if not any(e["name"] == "R" for e in events):
        raise ValueError("no R events: pass step_events(timelines, step, waits=True)")
    ops = [e for e in events if e["name"] != "R"]
    lo, hi = min(e["start"] for e in ops), max(e["end"] for e in ops)
    span = hi - lo
    ranks: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for e in events:
        ranks[(e["stage"], e.get("rank", 0))].append(e)
    per_stage: dict[int, list[float]] = defaultdict(list)
    for (stage, _), own in ranks.items():
        mine = [e for e in own if e["name"] != "R"]
        first, last = min(e["start"] for e in mine), max(e["end"] for e in mine)
        blocked = sum(
            max(0.0, min(e["end"], last) - max(e["start"], first)) for e in own if e["name"] == "R"
        )
        per_stage[stage].append((blocked + (first - lo) + (hi - last)) / span)
    return _by_stage(per_stage, span)


def _by_stage(per_stage: dict[int, list[float]], span: float) -> dict[str, float]:
    """Each stage's share (the mean over its ranks), their mean, and the span."""
    out = {f"stage{s}": sum(v) / len(v) for s, v in sorted(per_stage.items())}
    out["bubble"] = sum(out.values()) / len(out)
    out["span"] = span
    return out
