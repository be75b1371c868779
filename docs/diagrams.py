"""Schematic figures for the concept pages, drawn with matplotlib when the site is built.

These are diagrams of *layouts* (which tensor each parallel mode splits), not measurements; the
measured figures live on the tutorial pages.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


REPLICATED = -1


def _grid(ax, x0, y0, w, h, rows, cols, owner, label):
    """A w x h matrix cut into rows x cols tiles; ``owner(r, c)`` gives the rank holding a tile
    (its colour and number), ``REPLICATED`` for a tile every rank holds, or a text label."""
    for r in range(rows):
        for c in range(cols):
            who = owner(r, c)
            if who == REPLICATED:
                color, text = "#8C8C8C", "every rank"
            elif isinstance(who, str):  # "0,4": several ranks; "micro-batch 1": not a rank
                head = who.split(",")[0]
                color = COLORS[int(head) % len(COLORS)] if head.isdigit() else "#8C8C8C"
                text = who
            else:
                color, text = COLORS[who % len(COLORS)], str(who)
            ax.add_patch(
                Rectangle(
                    (x0 + c * w / cols, y0 + (rows - 1 - r) * h / rows),
                    w / cols,
                    h / rows,
                    facecolor=color,
                    edgecolor="white",
                    lw=1.5,
                    alpha=0.85,
                )
            )
            ax.text(
                x0 + (c + 0.5) * w / cols,
                y0 + (rows - 0.5 - r) * h / rows,
                text,
                ha="center",
                va="center",
                color="white",
                fontsize=7,
            )
    ax.text(x0 + w / 2, y0 - 0.12, label, ha="center", va="top", fontsize=8)


def parallelism_zoo(path: Path) -> None:
    """One row per mode: how activations X (batch x hidden) and weights W are split over ranks."""
    modes = [
        (
            "Data parallel (4 ranks)",
            (4, 1, lambda r, c: r),
            (1, 1, lambda r, c: REPLICATED),
            "X split by batch;\nW replicated on every rank",
        ),
        (
            "Tensor 1D, column then row (4)",
            (1, 1, lambda r, c: REPLICATED),
            (1, 4, lambda r, c: c),
            "X replicated;\nW split by output columns",
        ),
        (
            "Tensor 2D, SUMMA (2 x 2)",
            (2, 2, lambda r, c: 2 * r + c),
            (2, 2, lambda r, c: 2 * r + c),
            "X and W both\nsplit on a q x q grid",
        ),
        (
            "Tensor 2.5D (2 x 2 x 2)",
            (4, 2, lambda r, c: 2 * r + c),
            (2, 2, lambda r, c: f"{2 * r + c},{2 * r + c + 4}"),
            "X split over d stacked q x q\ngrids; W split per grid, d copies",
        ),
        (
            "Tensor 3D (2 x 2 x 2)",
            (2, 4, lambda r, c: 4 * r + c),
            (4, 2, lambda r, c: 2 * r + c),
            "X and W split over\na q x q x q cube",
        ),
        (
            "Sequence parallel (4)",
            (1, 4, lambda r, c: c),
            (1, 1, lambda r, c: REPLICATED),
            "X split by sequence;\nattention over a ring",
        ),
        (
            "Pipeline (4 stages)",
            (4, 1, lambda r, c: f"micro-batch {r}"),
            (4, 1, lambda r, c: r),
            "layers split into stages; each\nmicro-batch visits every stage",
        ),
        (
            "ZeRO-3 (4 ranks)",
            (4, 1, lambda r, c: r),
            (4, 1, lambda r, c: r),
            "X split by batch; W, grads, optim.\nstate sharded, gathered on use",
        ),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(12, 5.4))
    for ax, (title, xs, ws, note) in zip(axes.flat, modes):
        ax.set_xlim(-0.1, 2.3)
        ax.set_ylim(-0.75, 1.1)
        ax.axis("off")
        ax.set_title(title, fontsize=9)
        _grid(ax, 0.0, 0.0, 0.9, 1.0, *xs, "activations X")
        _grid(ax, 1.3, 0.0, 0.9, 1.0, *ws, "weights W")
        ax.text(1.1, -0.55, note, ha="center", va="center", fontsize=7.5, style="italic")
    fig.suptitle("Which tensor each mode splits (number = the rank(s) holding a tile)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_all(static_dir: Path) -> None:
    parallelism_zoo(static_dir / "generated" / "parallelism_zoo.png")
