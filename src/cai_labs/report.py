"""The tables and plots the pages repeat, so that a page's cell shows the technique.

* :func:`table` — rows of measurements (and formulas) as a styled table, each column formatted
  by its name (bytes with thousands separators, errors in scientific notation, ratios with two
  decimals, times with one);
* :func:`from_every_rank` — this rank's result gathered to every rank (rank bookkeeping);
* :func:`loss_curves`, :func:`pipeline_timeline`, :func:`bar_times` — the recurring figures.

Formatting only: nothing here computes a number a page reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from pandas.io.formats.style import Styler

__all__ = [
    "column_format",
    "table",
    "from_every_rank",
    "loss_curves",
    "pipeline_timeline",
    "bar_times",
    "predicted_vs_measured",
]

_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("error", "err", "gap", "|loss"), "{:.1e}"),
    (("(ms)", " ms", "(s)", "seconds"), "{:.1f}"),
    (("ratio", " / ", "fraction", "bubble", "share"), "{:.2f}"),
    (("(B)", "bytes", "formula", "params", "elements", "(GB)"), "{:,.0f}"),
)


def column_format(name: str, values: Iterable[Any] = ()) -> str | None:
    """The format of a column called ``name``: by its name, else ``{:.4g}`` for floats."""
    low = str(name).lower()
    for keys, fmt in _RULES:
        if any(k.lower() in low for k in keys):
            return fmt
    if any(isinstance(v, float) for v in values):
        return "{:.4g}"
    return None


def _format_or_text(fmt: str) -> Callable[[Any], str]:
    def f(v: Any) -> str:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return "" if v is None else str(v)
        return "" if v != v else fmt.format(v)  # NaN: a cell the row does not have

    return f


def table(
    rows: Sequence[Mapping[str, Any]] | Any,
    index: str | list[str] | None = None,
    formats: Mapping[str, str] | None = None,
    caption: str | None = None,
) -> Styler:
    """``rows`` (dicts, or a DataFrame) as a pandas ``Styler``: the last expression of a page's
    cell, which sphinx-gallery shows as an HTML table. ``formats`` overrides the format of
    named columns; text cells (and ``None``) are shown as they are."""
    import pandas as pd

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if index is not None:
        frame = frame.set_index(index)
    chosen = {}
    for col in frame.columns:
        fmt = (formats or {}).get(col) or column_format(col, frame[col])
        if fmt is not None:
            chosen[col] = _format_or_text(fmt)
    styler = frame.style.format(chosen)
    return styler.set_caption(caption) if caption else styler


def from_every_rank(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (one ``all_gather_object``)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def loss_curves(
    reference: Sequence[float],
    runs: Mapping[str, Sequence[float]],
    title: str,
    ylabel: str = "training loss",
    reference_label: str = "serial",
) -> Figure:
    """Every run's losses drawn over a thick reference curve; returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(reference, lw=6, alpha=0.3, color="black", label=reference_label)
    for i, (name, losses) in enumerate(runs.items()):
        ax.plot(losses, lw=1.2, ls=["-", "--", ":"][i % 3], marker=".", label=name)
    ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    return fig


def pipeline_timeline(schedules: Mapping[str, list[dict]], titles: Mapping[str, str]) -> Figure:
    """One Gantt chart per schedule of a step's ``F``/``B`` events (``stage``, ``start``,
    ``end``, ``microbatch`` each); returns the figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(schedules), 1, figsize=(11, 2.75 * len(schedules)), sharex=True)
    axes = [axes] if len(schedules) == 1 else list(axes)
    for ax, (name, events) in zip(axes, schedules.items()):
        t0 = min(e["start"] for e in events)
        for e in events:
            left, width = 1e3 * (e["start"] - t0), 1e3 * (e["end"] - e["start"])
            color = "C0" if e["name"] == "F" else "C1"
            ax.barh(e["stage"], width, left=left, color=color, edgecolor="white", height=0.8)
            label = str(e["microbatch"])
            ax.text(left + width / 2, e["stage"], label, ha="center", va="center", fontsize=7)
        stages = sorted({e["stage"] for e in events})
        ax.set(ylabel="stage", title=titles.get(name, name), yticks=stages)
        ax.invert_yaxis()
    axes[-1].set_xlabel("time in the step (ms); blue = forward, orange = backward, label = micro")
    fig.tight_layout()
    return fig


def bar_times(times_ms: Mapping[str, float], xlabel: str, title: str) -> Figure:
    """Horizontal bars, one per name, in the given order; returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.3 * len(times_ms) + 1.2))
    names = list(times_ms)
    ax.barh(names, [times_ms[n] for n in names], color=[f"C{i}" for i in range(len(names))])
    ax.invert_yaxis()
    ax.set(xlabel=xlabel, title=title)
    fig.tight_layout()
    return fig


def predicted_vs_measured(
    frame: Any,
    panels: Sequence[tuple[str, str, str, bool]],
    group: str,
    label: str | None = None,
) -> Figure:
    """One scatter per ``(x column, y column, title, log axes)`` panel of ``frame``, a marker
    per value of ``group``, the line ``y = x``, and the first panel's points labelled by the
    ``label`` column; returns the figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    axes = [axes] if len(panels) == 1 else list(axes)
    for i, (ax, (x, y, title, log)) in enumerate(zip(axes, panels)):
        for (name, part), marker in zip(frame.groupby(group, sort=False), "os^v"):
            ax.scatter(part[x], part[y], marker=marker, label=name)
            for _, row in part.iterrows() if (i == 0 and label) else ():
                ax.annotate(row[label], (row[x], row[y]), fontsize=7)
        both = frame[[x, y]]
        lo, hi = (
            (both.min().min() * 0.8, both.max().max() * 1.2) if log else (0, both.max().max() * 1.1)
        )
        ax.plot([lo, hi], [lo, hi], "k:", lw=1)
        scale = "log" if log else "linear"
        ax.set(xscale=scale, yscale=scale, xlabel=x, ylabel=y, title=title)
    axes[0].legend()
    fig.tight_layout()
    return fig
