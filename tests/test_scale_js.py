"""The calculator's JavaScript gives the Python scale model's numbers (run with node; the
browser test checks the same in Chromium on the built page)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from cai_labs.scale import predict
from cai_labs.scale.random_configs import presets, random_configs

JS = Path(__file__).parents[1] / "docs" / "_static" / "scale_model.js"
N_CONFIGS = 200
#: float64 on both sides, the same operations in a few different orders: a few ulps.
REL = 1e-9

DRIVER = """
const api = require(process.argv[1]);
const input = JSON.parse(require("fs").readFileSync(0, "utf8"));
const out = input.configs.map(([m, g, L]) => {
  try { return api.predict(input.presets.models[m], input.presets.gpus[g], L); }
  catch (e) { return { error: String(e.message) }; }
});
process.stdout.write(JSON.stringify(out));
"""


def run_js(configs: list, js: Path = JS) -> list[dict]:
    payload = json.dumps({"presets": presets(), "configs": configs})
    res = subprocess.run(
        ["node", "-e", DRIVER, str(js)], input=payload, capture_output=True, text=True, check=True
    )
    return json.loads(res.stdout)


def compare(py: dict, js: dict) -> list[str]:
    """Field names where the two answers differ by more than ``REL``."""
    bad = []
    for key in ("step_time_s", "tokens_per_s_per_gpu", "mfu"):
        a, b = py[key], js[key]
        if (a is None) != (b is None) or (a is not None and not math.isclose(a, b, rel_tol=REL)):
            bad.append(key)
    for k, a in py["memory_per_gpu_bytes"].items():
        if not math.isclose(a, js["memory_per_gpu_bytes"][k], rel_tol=REL, abs_tol=1e-6):
            bad.append(k)
    if py["bound"] != js["bound"]:
        bad.append("bound")
    return bad


needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


def _cases(n: int, seed: int = 0) -> tuple[list, list[dict]]:
    configs = random_configs(n, seed)
    wire = [[m, g, dataclasses.asdict(L)] for m, g, L in configs]
    return wire, [predict(m, g, L).to_dict() for m, g, L in configs]


@needs_node
def test_js_equals_python_on_random_configs():
    wire, want = _cases(N_CONFIGS)
    got = run_js(wire)
    assert len({(c[0], c[2]["tp_mode"]) for c in wire}) > 20  # the draw covers the space
    mismatches = [
        (i, compare(p, j))
        for i, (p, j) in enumerate(zip(want, got))
        if "error" in j or compare(p, j)
    ]
    assert not mismatches, (mismatches[:5], [got[i] for i, _ in mismatches[:2]])


@needs_node
def test_js_refuses_impossible_layouts():
    layout = dataclasses.asdict(
        __import__("cai_labs.scale", fromlist=["ScaleLayout"]).ScaleLayout(tp=8, tp_mode="2d")
    )
    (out,) = run_js([["gpt-3-175b", "h100", layout]])
    assert "square" in out["error"]


@needs_node
def test_a_broken_js_port_is_caught(tmp_path):
    """The same JS with the pipeline bubble dropped must fail the comparison."""
    broken = tmp_path / "broken.js"
    src = JS.read_text().replace("(c * m + p - 1)", "(c * m + p - 1) * 0 + 1e9")
    assert src != JS.read_text()
    broken.write_text(src)
    wire, want = _cases(40, seed=1)
    got = run_js(wire, broken)
    assert any(compare(p, j) for p, j in zip(want, got))
