"""Shared worker and assertions for the tensor-parallel tests (imported by test files)."""

from __future__ import annotations

from cai_labs.hybrid.check import check_gpt
from cai_labs.models.gpt import GPTConfig
from cai_labs.tensor_parallel import make_grid
from cai_labs.tensor_parallel.check import check_block, check_linear
from cai_labs.tensor_parallel.formulas import block_cost, linear_cost

CFG = GPTConfig(d_model=16, n_heads=4, seq_len=8, mlp_ratio=4)
BATCH, TOL = 4, 1e-4
K, N = 16, 32  # the lone linear layer
GPT_CFG = GPTConfig(vocab_size=64, seq_len=8, d_model=16, n_heads=4, n_layers=2)


def run_mode(mode: str, depth: int = 1, break_it=None) -> dict:
    """On every rank: the lone linear and the full block vs serial; then, if ``break_it`` is
    given, break the code with it and check the block again (the comparison must fail)."""
    grid = make_grid(mode, depth=depth)
    out = {
        "size": grid.size,
        "linear": check_linear(grid, K, N, BATCH, CFG.seq_len),
        "block": check_block(grid, CFG, BATCH),
        "gpt": check_gpt(grid, GPT_CFG, BATCH, steps=2),
    }
    if break_it is not None:
        break_it()
        out["broken"] = check_block(grid, CFG, BATCH)
    return out


def assert_equal_to_serial(res: dict) -> None:
    assert res["out"] < TOL, res["out"]
    assert res["input_grad"] < TOL, res["input_grad"]
    assert max(res["param_grads"].values()) < TOL, res["param_grads"]


def assert_gpt_trains_like_serial(res: dict) -> None:
    """Whole model: same loss at each SGD step, same gradients, same weights after."""
    for a, b in zip(res["serial_losses"], res["parallel_losses"]):
        assert abs(a - b) < 1e-5, (res["serial_losses"], res["parallel_losses"])
    assert res["grad_err"] < TOL and res["param_err"] < TOL


def assert_matches_formulas(out: dict, mode: str, depth: int = 1) -> None:
    """Measured ledger bytes == the formulas of :mod:`cai_labs.tensor_parallel.formulas`."""
    n = out["size"]
    lc = linear_cost(mode, n, BATCH * CFG.seq_len, K, N, depth=depth)
    lin = out["linear"]
    assert (lin["comm_bytes"], lin["comm_calls"]) == (lc.comm_bytes, lc.comm_calls)
    assert lin["param_bytes"] == lc.param_bytes
    assert lin["activation_bytes"] == lc.activation_bytes
    bc = block_cost(
        mode, n, BATCH, CFG.seq_len, CFG.d_model, CFG.mlp_ratio, n_heads=CFG.n_heads, depth=depth
    )
    blk = out["block"]
    assert (blk["comm_bytes"], blk["comm_calls"]) == (bc.comm_bytes, bc.comm_calls)
    assert blk["param_bytes"] == bc.param_bytes
    assert blk["peak_activation_bytes"] == bc.activation_bytes
