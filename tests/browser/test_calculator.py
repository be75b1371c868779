"""The calculator page in Chromium gives the Python scale model's numbers.

The build writes ``_static/generated/scale_expected.json``: random configurations with the
Python answers (:func:`docs.scale_pages.expected`). Here the page's own ``caiScale.predict``
runs on each, in the browser, and must agree to a few ulps.
"""

from __future__ import annotations

import json

import pytest
from test_site_in_browser import SITE, browser, serve  # noqa: F401 (fixture)

pytestmark = pytest.mark.browser
N_MIN, REL = 200, 1e-9

COMPARE = """(cases) => cases.map((c) => {
  const P = window.caiScalePresets;
  try { return window.caiScale.predict(P.models[c.model], P.gpus[c.gpu], c.layout); }
  catch (e) { return {error: e.message}; }
})"""


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= REL * max(abs(a), abs(b)) + 1e-6


def test_calculator_equals_python_on_random_configs(browser):  # noqa: F811
    cases = json.loads((SITE / "_static" / "generated" / "scale_expected.json").read_text())
    assert len(cases) >= N_MIN
    with serve(SITE) as base:
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{base}/scale/calculator.html")
        assert "GiB" in page.inner_text("#cai-calc-out"), "the calculator drew nothing"
        got = page.evaluate(COMPARE, cases)
        page.close()
    assert not errors, errors
    bad = []
    for c, js in zip(cases, got):
        py = c["python"]
        keys = ["step_time_s", "tokens_per_s_per_gpu", "mfu"]
        ok = "error" not in js and all(_close(py[k], js[k]) for k in keys)
        ok = ok and all(
            _close(v, js["memory_per_gpu_bytes"][k]) for k, v in py["memory_per_gpu_bytes"].items()
        )
        if not ok or py["bound"] != js["bound"]:
            bad.append((c["model"], c["layout"], js))
    assert not bad, bad[:3]
