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
ROW_K, ROW_N = 32, 16  # the 1D row-parallel linear

#: What the ledger measured for these cases, (mode, ranks, depth) -> layer -> (parameter bytes,
#: saved activation bytes, communication bytes, collective calls). The multi-rank tests assert
#: that the ledger still measures these numbers; ``test_tp_formulas_measured.py`` checks the
#: formulas against them in one process, fast enough to run for every mutant of ``nox -s
#: mutants``.
MEASURED = {
    ("1d", 2, 1): {"linear": (1088, 2048, 2048, 1), "block": (6752, 23104, 8192, 4),
                   "row": (1088, 2048, 2048, 1)},
    ("1d", 4, 1): {"linear": (544, 2048, 2048, 1), "block": (3568, 15936, 8192, 4),
                   "row": (576, 1024, 2048, 1)},
    ("2d", 4, 1): {"linear": (576, 512, 6208, 13), "block": (3488, 10432, 40864, 64)},
    ("2.5d", 8, 2): {"linear": (576, 256, 5248, 15), "block": (3488, 5248, 33344, 76)},
    ("3d", 8, 1): {"linear": (320, 256, 5248, 10), "block": (1952, 5248, 30272, 56)},
}  # fmt: skip


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


def ledger_row(res: dict, activations: str = "activation_bytes") -> tuple[int, ...]:
    """One layer's measured numbers in :data:`MEASURED`'s order."""
    return tuple(res[k] for k in ("param_bytes", activations, "comm_bytes", "comm_calls"))


def assert_matches_formulas(out: dict, mode: str, depth: int = 1) -> None:
    """Measured ledger bytes == the formulas of :mod:`cai_labs.tensor_parallel.formulas`, and
    == the numbers recorded in :data:`MEASURED`."""
    n = out["size"]
    recorded = MEASURED[(mode, n, depth)]
    assert ledger_row(out["linear"]) == recorded["linear"]
    assert ledger_row(out["block"], "peak_activation_bytes") == recorded["block"]
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
