"""3D tensor parallelism (q=2, 8 ranks) equals the serial layer and block."""

from __future__ import annotations

from _tp_cases import (
    assert_equal_to_serial,
    assert_gpt_trains_like_serial,
    assert_matches_formulas,
    run_mode,
)

from cai_labs import launch


def _no_dx_reduce_scatter() -> None:
    """Keep the local partial dX instead of reduce-scattering it (a classic 3D bug)."""
    from cai_labs import comm
    from cai_labs.tensor_parallel import layers_3d

    def wrong(x, group, dim):
        return comm.split_along(x, group, dim)

    layers_3d.reduce_scatter = wrong


def test_3d_linear_and_block_equal_serial_and_formulas():
    out = launch(run_mode, 8, "3d", 1, _no_dx_reduce_scatter)
    assert_equal_to_serial(out["linear"])
    assert_equal_to_serial(out["block"])
    assert_gpt_trains_like_serial(out["gpt"])
    assert_matches_formulas(out, "3d")
    assert out["broken"]["out"] > 1e-3
