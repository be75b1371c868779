"""2D (SUMMA, 4 ranks) and 2.5D (Tesseract, q=2 d=2, 8 ranks) equal the serial layer and block."""

from __future__ import annotations

import pytest
from _tp_cases import (
    assert_equal_to_serial,
    assert_gpt_trains_like_serial,
    assert_matches_formulas,
    run_mode,
)

from cai_labs import launch


def test_2d_linear_and_block_equal_serial_and_formulas():
    out = launch(run_mode, 4, "2d")
    assert_equal_to_serial(out["linear"])
    assert_equal_to_serial(out["block"])
    assert_gpt_trains_like_serial(out["gpt"])
    assert_matches_formulas(out, "2d")


def _skip_depth_reduce() -> None:
    """Forget to sum the weight gradients over the depth layers."""
    from cai_labs.tensor_parallel import layers_2d

    layers_2d.all_reduce = lambda x, group: x


def test_2p5d_equals_serial_and_a_missing_depth_reduce_is_caught():
    out = launch(run_mode, 8, "2.5d", 2, _skip_depth_reduce)
    assert_equal_to_serial(out["linear"])
    assert_equal_to_serial(out["block"])
    assert_gpt_trains_like_serial(out["gpt"])
    assert_matches_formulas(out, "2.5d", depth=2)
    broken = out["broken"]
    assert broken["out"] < 1e-4  # forward unaffected
    assert broken["param_grads"]["mlp.fc1.weight"] > 1e-3  # only half the batch's gradient


# -- deliberate breaks: each 2D check fails on a plausible bug -----------------------------------


def _block_with_local_layernorm() -> dict:
    """2D block whose layer norm takes its statistics over the local shard of the row only."""
    from _tp_cases import BATCH, CFG, check_block, make_grid

    from cai_labs.tensor_parallel import layers_2d

    layers_2d.all_reduce_both = lambda x, group: x
    return check_block(make_grid("2d"), CFG, BATCH)


def test_2d_layernorm_without_its_row_reduce_is_caught():
    broken = launch(_block_with_local_layernorm, 4)
    with pytest.raises(AssertionError):
        assert_equal_to_serial(broken)
