"""Write the scale model's generated pages at build time: published vs predicted rows.

Called from ``conf.py`` (``builder-inited``); the tables are computed by
:mod:`cai_labs.scale.published` in this build, never typed in.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from cai_labs.scale.hardware import GPUS
from cai_labs.scale.predict import predict
from cai_labs.scale.published import all_rows
from cai_labs.scale.random_configs import presets, random_configs

INTRO = """# Published runs next to the scale model

Each row is a number a paper or a benchmark report published, next to what
{mod}`cai_labs.scale` predicts for the same model, GPU count and layout, computed when this page
was built. The memory rows use the same formula functions the tests check against the ledger on
CPU ranks; the throughput rows add one efficiency constant per GPU type
({efficiency}), the same for every row of that GPU. All values are **modeled**; the published
column is **measured** by the cited authors. Assumptions about what a table leaves out are in
the last column. Rows that are not modeled say why.

Where the published numbers come from: the torchtitan rows from that repository's benchmark
file; the ZeRO, Korthikanti and Narayanan rows were typed in by hand from the papers' tables
(cited per section). The Narayanan rows agree entry by entry with an independent transcription
of that table (the MLCarbon project's `data/megatron_table.csv`); each ZeRO entry is checked
against the paper's closed form to the digits it shows; the Korthikanti rows have not yet been
checked against a second copy. Korthikanti Table 2 is a closed form, not a measurement: its rows
compare two ways of writing one formula.
"""


def _fmt(x: float | None) -> str:
    if x is None:
        return "not modeled"
    return f"{x:,.3g}" if abs(x) < 100 else f"{x:,.0f}"


def published_page() -> str:
    eff = ", ".join(
        f"{name} {g.efficiency:.2f}" for name, g in GPUS.items() if name in ("a100-80gb", "h100")
    )
    out = [INTRO.format(mod="{mod}", efficiency=eff)]
    rows = all_rows()
    for source in dict.fromkeys(r.source for r in rows):
        group = [r for r in rows if r.source == source]
        out.append(f"\n## {source}\n")
        out.append(f"{group[0].quantity}.\n")
        out.append("| config | published | predicted | ratio | note |")
        out.append("| --- | ---: | ---: | ---: | --- |")
        for r in group:
            ratio = "" if r.ratio is None else f"{r.ratio:.3f}"
            note = r.why or r.assumed
            out.append(
                f"| {r.config} | {_fmt(r.published)} | {_fmt(r.predicted)} | {ratio} | {note} |"
            )
    return "\n".join(out) + "\n"


def presets_js() -> str:
    """The presets of :mod:`cai_labs.scale` for the calculator's JavaScript."""
    return "window.caiScalePresets = " + json.dumps(presets(), indent=1) + ";\n"


def write_all(srcdir: Path) -> None:
    target = srcdir / "scale" / "published.md"
    target.parent.mkdir(exist_ok=True)
    target.write_text(published_page(), encoding="utf-8")
    generated = srcdir / "_static" / "generated"
    generated.mkdir(parents=True, exist_ok=True)
    (generated / "scale_presets.js").write_text(presets_js(), encoding="utf-8")
    (generated / "scale_expected.json").write_text(json.dumps(expected()), encoding="utf-8")


def expected(n: int = 250, seed: int = 0) -> list[dict]:
    """Random configurations with the Python model's answers, for the browser test."""
    out = []
    for model, gpu, layout in random_configs(n, seed):
        answer = predict(model, gpu, layout).to_dict()
        out.append(
            {"model": model, "gpu": gpu, "layout": dataclasses.asdict(layout), "python": answer}
        )
    return out
