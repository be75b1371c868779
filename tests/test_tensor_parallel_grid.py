"""Process grids: impossible layouts fail with a clear ValueError; hybrid grids on subsets work."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
from _tp_cases import BATCH, CFG, assert_equal_to_serial

from cai_labs import launch
from cai_labs.models.gpt import Block, GPTConfig
from cai_labs.tensor_parallel.check import check_block
from cai_labs.tensor_parallel.grid import Grid, build_grids, grid_shape
from cai_labs.tensor_parallel.layers_1d import ColumnParallelLinear
from cai_labs.tensor_parallel.layers_2d import Block2D, split_input
from cai_labs.tensor_parallel.layers_3d import Linear3D


@pytest.mark.parametrize(
    "mode,size,depth,message",
    [
        ("2d", 6, 1, "2D tensor parallelism needs a square world size (q*q ranks); got 6"),
        ("2.5d", 8, 3, "2.5D tensor parallelism needs q*q*d ranks; got 8"),
        ("2.5d", 12, 2, "2.5D tensor parallelism needs q*q*d ranks; got 12"),
        ("3d", 4, 1, "3D tensor parallelism needs a cube world size (q*q*q ranks); got 4"),
        ("4d", 4, 1, "unknown tensor parallel mode"),
        ("1d", 0, 1, "tensor parallel size must be a positive integer"),
    ],
)
def test_bad_layouts_raise_clear_errors(mode, size, depth, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        grid_shape(mode, size, depth)


def test_good_layouts():
    assert grid_shape("1d", 3) == (3,)
    assert grid_shape("2d", 4) == (2, 2)
    assert grid_shape("2.5d", 8, 2) == (2, 2, 2)
    assert grid_shape("3d", 8) == (2, 2, 2)
    assert grid_shape("3d", 27) == (3, 3, 3)


def _fake(mode: str, shape: tuple[int, ...]) -> Grid:
    """A grid object without process groups: enough for the shape checks done at build time."""
    n = 1
    for s in shape:
        n *= s
    return Grid(
        mode,
        shape,
        tuple(range(n)),
        (0,) * len(shape),
        None,
        (None,) * len(shape),
        ((0,),) * len(shape),
    )


def test_sizes_not_divisible_by_the_grid_raise():
    with pytest.raises(ValueError, match="2D tensor parallelism splits d_model into 3 parts"):
        Block2D(Block(GPTConfig(d_model=16, n_heads=4, seq_len=8)), _fake("2d", (3, 3)))
    with pytest.raises(ValueError, match="1D tensor parallelism splits out_features into 3"):
        ColumnParallelLinear.from_serial(torch.nn.Linear(8, 8), _fake("1d", (3,)))
    with pytest.raises(ValueError, match="3D tensor parallelism splits out_features into 4"):
        Linear3D(8, 6, _fake("3d", (2, 2, 2)))
    with pytest.raises(ValueError, match="splits n_heads into 4 parts"):
        Block2D(Block(GPTConfig(d_model=16, n_heads=2, seq_len=8)), _fake("2d", (4, 4)))
    with pytest.raises(ValueError, match="2.5D tensor parallelism splits the batch into 4 parts"):
        split_input(torch.zeros(6, 8, 16), _fake("2.5d", (2, 2, 2)))


def _hybrid() -> list:
    """DP2 x TP2 on 4 ranks: two 1D grids {0,1} and {2,3}, built collectively."""
    grid = build_grids("1d", [[0, 1], [2, 3]])
    res = check_block(grid, CFG, BATCH)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, (grid.ranks, res))
    with pytest.raises(ValueError, match="increasing order"):
        build_grids("1d", [[1, 0], [2, 3]])
    try:
        split_input(torch.zeros(2, 8, 16), grid)
    except ValueError as e:
        errors.append(str(e))
    return errors


def test_hybrid_grids_on_subsets_of_ranks():
    out = launch(_hybrid, 4)
    assert [r[0] for r in out[:4]] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    for _, res in out[:4]:
        assert_equal_to_serial(res)
    assert "cannot run 2D/2.5D layers" in out[4]


def test_linear_cost_refuses_sizes_that_do_not_divide():
    from cai_labs.tensor_parallel.formulas import linear_cost

    with pytest.raises(ValueError, match=r"2d on 9 ranks \(q=3, depth=1\) cannot split"):
        linear_cost("2d", 9, 6, 64, 64)  # 64 features do not split 3 ways
    with pytest.raises(ValueError, match="out_features=10 by 4"):
        linear_cost("1d", 4, 8, 16, 10, kind="column")
    assert linear_cost("2d", 9, 6, 63, 63).comm_bytes > 0  # 63 = 3 * 21 does
