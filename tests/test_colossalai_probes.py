"""What of Colossal-AI 0.5.0 runs on CPU ranks, each compared with its twin; the shim is needed.

Runs only in ``nox -s colossalai`` (transformers 4.51.3 there, as the release pins it).
Tolerances: the probes compute in float64 (except the optimizer step of HybridAdam); a sum of
``k`` terms in another order differs by at most about ``k`` epsilons of its magnitude, and
these tiny models sum at most 64 terms per output through two layers: 4096 epsilons bound it.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("colossalai")
from cai_labs import launch  # noqa: E402
from cai_labs.colossal import probes  # noqa: E402

pytestmark = pytest.mark.colossalai
TOL = 4096 * torch.finfo(torch.float64).eps


@pytest.fixture(scope="module")
def rows():
    return {r["feature"]: r for r in probes.probe_all(2)}


@pytest.mark.parametrize(
    "feature",
    [
        "Booster + TorchDDPPlugin",
        "Booster + HybridParallelPlugin (TP)",
        "ShardFormer: OPT, 1D tensor parallel",
        "LazyInitContext",
        "GeneralCheckpointIO (sharded)",
    ],
)
def test_runs_on_cpu_and_matches_its_twin(rows, feature):
    row = rows[feature]
    assert row["runs on CPU"] == "yes", row
    assert float(row["max abs difference"]) <= TOL, row


@pytest.mark.parametrize(
    "feature", ["Booster + LowLevelZeroPlugin", "Booster + GeminiPlugin", "HybridAdam"]
)
def test_needs_cuda_and_says_why(rows, feature):
    assert rows[feature]["runs on CPU"] == "no" and rows[feature]["error"], rows[feature]


def test_without_the_shim_shardformer_stops_at_the_rng_call():
    import colossalai.shardformer  # noqa: F401 -- imported before the fork

    with pytest.raises(Exception, match=r"get_rng_state\(\) takes 0 positional arguments"):
        launch(probes.shardformer_opt, 2, timeout=240)


def test_a_wrong_shard_offset_is_caught(monkeypatch):
    import colossalai.shardformer  # noqa: F401

    def first_block(full, shard):  # every rank compares with rank 0's block: a plausible bug
        for dim, (a, b) in enumerate(zip(full.shape, shard.shape)):
            if a != b:
                return full.narrow(dim, 0, b)
        return full

    monkeypatch.setattr(probes, "_rank_slice", first_block)
    assert launch(probes._shimmed, 2, probes.shardformer_opt, timeout=240) > 1e3 * TOL


def test_shardformer_matches_the_serial_model_on_4_ranks():
    import colossalai.shardformer  # noqa: F401

    assert launch(probes._shimmed, 4, probes.shardformer_opt, timeout=240) <= TOL
