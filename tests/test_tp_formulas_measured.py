"""The tensor-parallel formulas against the bytes the ledger measured on 2, 4 and 8 ranks.

The multi-rank tests (``test_tensor_parallel_{1d,2d,3d}.py``) measure these numbers and assert
that they are still :data:`_tp_cases.MEASURED`; here the formulas are held to them in one process,
so that a mutant of :mod:`cai_labs.tensor_parallel.formulas` is caught in milliseconds.
"""

from __future__ import annotations

import pytest
from _tp_cases import BATCH, CFG, MEASURED, ROW_K, ROW_N, K, N

from cai_labs.tensor_parallel.formulas import Cost, block_cost, linear_cost


def _row(cost: Cost) -> tuple[int, int, int, int]:
    return (cost.param_bytes, cost.activation_bytes, cost.comm_bytes, cost.comm_calls)


@pytest.mark.parametrize("case", sorted(MEASURED), ids=lambda c: f"{c[0]}-{c[1]}ranks-d{c[2]}")
def test_formulas_equal_the_measured_bytes(case):
    mode, n, depth = case
    rows = BATCH * CFG.seq_len
    recorded = MEASURED[case]
    assert _row(linear_cost(mode, n, rows, K, N, depth=depth)) == recorded["linear"]
    block = block_cost(
        mode, n, BATCH, CFG.seq_len, CFG.d_model, CFG.mlp_ratio, n_heads=CFG.n_heads, depth=depth
    )
    assert _row(block) == recorded["block"]
    if "row" in recorded:
        assert _row(linear_cost(mode, n, rows, ROW_K, ROW_N, kind="row")) == recorded["row"]
