"""The build environment line names torch, the CPU, the cores and the ranks per core."""

from __future__ import annotations

import torch

from cai_labs import build_env


def test_describe_names_versions_cpu_cores_and_ranks_per_core():
    env = build_env.environment()
    assert env["libraries"]["torch"] == torch.__version__
    assert env["cores"] >= 1 and env["cpu"]
    line = build_env.describe(ranks=2 * env["cores"])
    assert f"torch {env['libraries']['torch']}" in line
    assert f"{env['cores']} cores, {2 * env['cores']} ranks = 2 per core" in line
    assert env["date"] in line and "/" not in line.split(";")[0]  # no paths of the machine
