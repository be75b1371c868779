"""1D (Megatron) tensor parallelism equals the serial block; bad layouts fail clearly."""

from __future__ import annotations

import pytest
import torch
from _tp_cases import (
    BATCH,
    CFG,
    MEASURED,
    ROW_K,
    ROW_N,
    TOL,
    assert_equal_to_serial,
    assert_gpt_trains_like_serial,
    assert_matches_formulas,
    ledger_row,
    run_mode,
)

from cai_labs import launch
from cai_labs.tensor_parallel import layers_1d as L
from cai_labs.tensor_parallel import make_grid
from cai_labs.tensor_parallel.check import check_block, check_linear
from cai_labs.tensor_parallel.formulas import linear_cost


def _worker(broken: bool = False) -> dict:
    if broken:  # forget the all-reduce of dX in the column-parallel backward
        L.copy_to_group = lambda x, group: x
    grid = make_grid("1d")
    out = run_mode("1d") if not broken else {"block": check_block(grid, CFG, BATCH)}
    out["row"] = check_linear(grid, ROW_K, ROW_N, BATCH, CFG.seq_len, kind="row")
    # A column -> row pair on its own (the MLP of Megatron) with the ledger.
    from cai_labs import Ledger, comm_totals

    torch.manual_seed(1)
    fc1, fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
    x = torch.randn(BATCH * CFG.seq_len, 16)
    xs = x.clone().requires_grad_()
    fc2(torch.relu(fc1(xs))).sum().backward()
    col, row = (
        L.ColumnParallelLinear.from_serial(fc1, grid),
        L.RowParallelLinear.from_serial(fc2, grid),
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
    for key in ("block", "linear", "row"):
        assert_equal_to_serial(out[key])
    assert_gpt_trains_like_serial(out["gpt"])
    assert_matches_formulas(out, "1d")  # column-parallel linear and block
    assert ledger_row(out["row"]) == MEASURED[("1d", n, 1)]["row"]
    row = linear_cost("1d", n, BATCH * CFG.seq_len, ROW_K, ROW_N, kind="row")
    assert out["row"]["comm_bytes"] == row.comm_bytes
    assert out["row"]["activation_bytes"] == row.activation_bytes
    assert out["row"]["param_bytes"] == row.param_bytes
    # Megatron's count: 2 all-reduces of the (b, s, d) activation in forward, 2 in backward.
    assert out["block"]["comm_bytes"] == 4 * BATCH * CFG.seq_len * CFG.d_model * 4
    assert out["pair"]["err"] < TOL and out["whole"] < TOL
    M = BATCH * 8
    pair = (
        linear_cost("1d", n, M, 16, 32, kind="column").comm_bytes
        + linear_cost("1d", n, M, 32, 16, kind="row").comm_bytes
    )
    assert out["pair"]["comm"]["all_reduce"]["bytes"] == pair


def test_missing_backward_all_reduce_is_caught():
    """Without the all-reduce of dX the input and layer-norm gradients are partial sums."""
    blk = launch(_worker, 2, True)["block"]
    assert blk["out"] < TOL  # forward is still right...
    assert blk["input_grad"] > 1e-3  # ...but the gradients are not
    assert blk["param_grads"]["ln1.weight"] > 1e-3


def test_serial_block_activation_formula():
    """The activation formula with one rank is the serial block's measured saved bytes."""
    from cai_labs import Ledger
    from cai_labs.models.gpt import Block
    from cai_labs.tensor_parallel.formulas import block_cost, serial_block_params

    torch.manual_seed(0)
    block = Block(CFG)
    x = torch.randn(BATCH, CFG.seq_len, CFG.d_model, requires_grad=True)
    with Ledger(model=block) as ledger:
        block(x).sum().backward()
    cost = block_cost("1d", 1, BATCH, CFG.seq_len, CFG.d_model, CFG.mlp_ratio, n_heads=CFG.n_heads)
    assert ledger.report()["memory"]["peak_activations"] == cost.activation_bytes
    assert cost.param_bytes == serial_block_params(CFG.d_model, CFG.mlp_ratio)
    assert cost.comm_bytes == 0
