"""cai_labs.report formats by column name and gathers every rank's result; nothing it shows
is computed there."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import torch.distributed as dist  # noqa: E402

from cai_labs import launch, report  # noqa: E402


def test_columns_are_formatted_by_name():
    assert report.column_format("TP bytes/step") == "{:,.0f}"
    assert report.column_format("params formula") == "{:,.0f}"
    assert report.column_format("grad error") == "{:.1e}"
    assert report.column_format("step (ms)") == "{:.1f}"
    assert report.column_format("ratio ours / theirs") == "{:.2f}"
    assert report.column_format("name", ["a"]) is None
    assert report.column_format("value", [0.5]) == "{:.4g}"


def test_table_shows_numbers_and_text():
    rows = [
        {"layout": "DP2", "params (B)": 1234567, "loss error": 3e-7, "ok": "yes"},
        {"layout": "TP2", "params (B)": 7, "loss error": None, "ok": "no"},
    ]
    html = report.table(rows, index="layout", caption="c").to_html()
    assert "1,234,567" in html and "3.0e-07" in html and "yes" in html and ">c<" in html


def _rank_worker() -> list:
    return report.from_every_rank({"rank": dist.get_rank()})


def test_from_every_rank_is_in_rank_order():
    assert launch(_rank_worker, 2) == [{"rank": 0}, {"rank": 1}]


def test_figures_draw():
    events = [
        {"name": n, "stage": s, "start": t, "end": t + 1.0, "microbatch": 0}
        for s, (n, t) in enumerate([("F", 0.0), ("B", 1.0)])
    ]
    fig = report.pipeline_timeline({"gpipe": events}, {"gpipe": "GPipe"})
    assert fig.axes[0].get_title() == "GPipe"
    assert report.loss_curves([3.0, 2.0], {"DP2": [3.0, 2.0]}, "t").axes
    assert report.bar_times({"serial": 1.0, "DP2": 2.0}, "ms", "t").axes[0].get_title() == "t"


def test_predicted_vs_measured_draws_one_panel_per_pair():
    import pandas as pd

    frame = pd.DataFrame(
        {"model": ["a", "a", "b"], "plan": ["x", "y", "x"], "p": [1.0, 2.0, 3.0], "m": [1.1, 2, 3]}
    )
    fig = report.predicted_vs_measured(
        frame, [("p", "m", "time", True), ("p", "m", "memory", False)], group="model", label="plan"
    )
    assert [ax.get_title() for ax in fig.axes] == ["time", "memory"]
    assert len(fig.axes[0].texts) == 3 and not fig.axes[1].texts


def test_missing_cells_are_blank():
    html = report.table([{"a": 1, "bytes": 5.0}, {"a": 2}], index="a").to_html()
    assert "nan" not in html and "5" in html
