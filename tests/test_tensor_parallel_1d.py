"""1D (Megatron) tensor parallelism equals the serial block; bad layouts fail clearly."""

from __future__ import annotations

import pytest
import torch

from cai_labs import launch
from cai_labs.models.gpt import GPTConfig
from cai_labs.tensor_parallel import layers_1d as L
from cai_labs.tensor_parallel import make_grid
from cai_labs.tensor_parallel.check import check_block
from cai_labs.tensor_parallel.formulas import block_cost, linear_cost
from cai_labs.tensor_parallel.grid import grid_shape

CFG = GPTConfig(d_model=16, n_heads=4, seq_len=8, mlp_ratio=4)
BATCH, TOL = 2, 1e-5


def _worker(broken: bool = False) -> dict:
    if broken:  # forget the all-reduce of dX in the column-parallel backward
        L.copy_to_group = lambda x, group: x
    grid = make_grid("1d")
    out = {"block": check_block(grid, CFG, BATCH)}
    # A column -> row pair on its own (the MLP of Megatron) with the ledger.
    from cai_labs import Ledger, comm_totals

    torch.manual_seed(1)
    fc1, fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
    x = torch.randn(BATCH * 8, 16)
    xs = x.clone().requires_grad_()
    fc2(torch.relu(fc1(xs))).sum().backward()
    col, row = L.ColumnParallelLinear.from_serial(fc1, grid), L.RowParallelLinear.from_serial(
        fc2, grid
    )
    xp = x.clone().requires_grad_()
    with Ledger() as ledger:
        y = row(torch.relu(col(xp)))
        y.sum().backward()
    gcol, grow = col.serial_state(grads=True), row.serial_state(grads=True)
    out["pair"] = {
        "comm": comm_totals(ledger.report()),
        "err": max(
            (gcol["weight"] - fc1.weight.grad).abs().max().item(),
            (gcol["bias"] - fc1.bias.grad).abs().max().item(),
            (grow["weight"] - fc2.weight.grad).abs().max().item(),
            (grow["bias"] - fc2.bias.grad).abs().max().item(),
            (xp.grad - xs.grad).abs().max().item(),
        ),
    }
    # gather_output=True and input_is_parallel=False give whole tensors on both sides.
    cg = L.ColumnParallelLinear.from_serial(fc1, grid, gather_output=True)
    rs = L.RowParallelLinear.from_serial(fc2, grid, input_is_parallel=False)
    out["whole"] = (rs(cg(x)) - fc2(fc1(x))).abs().max().item()
    return out


@pytest.mark.parametrize("n", [2, 4])
def test_1d_block_and_linears_equal_serial_and_formula(n):
    out = launch(_worker, n)
    blk = out["block"]
    assert blk["out"] < TOL and blk["input_grad"] < TOL
    assert max(blk["param_grads"].values()) < TOL, blk["param_grads"]
    cost = block_cost("1d", n, BATCH, CFG.seq_len, CFG.d_model, CFG.mlp_ratio)
    assert blk["comm_bytes"] == cost.comm_bytes == 4 * BATCH * 8 * 16 * 4
    assert blk["comm_calls"] == cost.comm_calls
    assert blk["param_bytes"] == cost.param_bytes
    assert out["pair"]["err"] < TOL and out["whole"] < TOL
    M = BATCH * 8
    pair = linear_cost("1d", n, M, 16, 32, kind="column").comm_bytes + linear_cost(
        "1d", n, M, 32, 16, kind="row"
    ).comm_bytes
    assert out["pair"]["comm"]["all_reduce"]["bytes"] == pair


def test_missing_backward_all_reduce_is_caught():
    """Without the all-reduce of dX the input and layer-norm gradients are partial sums."""
    blk = launch(_worker, 2, True)["block"]
    assert blk["out"] < TOL  # forward is still right...
    assert blk["input_grad"] > 1e-3  # ...but the gradients are not
    assert blk["param_grads"]["ln1.weight"] > 1e-3


@pytest.mark.parametrize(
    "mode,size,depth,message",
    [
        ("2d", 6, 1, "2D tensor parallelism needs a square world size (q*q ranks); got 6"),
        ("2.5d", 8, 3, "2.5D tensor parallelism needs q*q*d ranks; got 8"),
        ("2.5d", 12, 2, "2.5D tensor parallelism needs q*q*d ranks; got 12"),
        ("3d", 4, 1, "3D tensor parallelism needs a cube world size (q*q*q ranks); got 4"),
        ("4d", 4, 1, "unknown tensor parallel mode"),
    ],
)
def test_bad_layouts_raise_clear_errors(mode, size, depth, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("*", r"\*")):
        grid_shape(mode, size, depth)


def test_good_layouts():
    assert grid_shape("1d", 3) == (3,)
    assert grid_shape("2d", 4) == (2, 2)
    assert grid_shape("2.5d", 8, 2) == (2, 2, 2)
    assert grid_shape("3d", 8) == (2, 2, 2)
