"""Context parallelism: the online-softmax ring equals serial causal attention, sends what its
formula says, and saves far less for backward than the seed's ring."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.functional import scaled_dot_product_attention

from cai_labs import Ledger, comm_totals, device, launch
from cai_labs.sequence_parallel import formulas, split_sequence
from cai_labs.sequence_parallel import ring_flash as flash_module  # patched by the breaks
from cai_labs.sequence_parallel.ring_attention import ring_attention
from cai_labs.sequence_parallel.ring_flash import (
    blocks_per_rank,
    local_positions,
    ring_flash_attention,
    split_layout,
)

B, H, L, D = 2, 3, 16, 4
F64 = torch.float64
#: Each output and gradient sums O(L) products of O(1) terms: rounding is a few L * eps; a
#: hundredfold margin on that still sits orders of magnitude below any of the breaks below.
TOL = 100 * L * torch.finfo(F64).eps


def _data(length: int = L, b: int = B, h: int = H) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, length, D, generator=g, dtype=F64) for _ in range(4)]


def _serial(causal: bool = True) -> list[torch.Tensor]:
    q, k, v, d_out = _data()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = scaled_dot_product_attention(*leaves, is_causal=causal)
    return [out.detach(), *torch.autograd.grad(out, leaves, d_out)]


def _counting(fn, counter: list[int]):
    """``fn`` that counts its calls in ``counter[0]`` and the largest result's bytes in
    ``counter[1]``."""

    def counted(*args, **kwargs):
        out = fn(*args, **kwargs)
        counter[0] += 1
        counter[1] = max(counter[1], out.numel() * out.element_size())
        return out

    return counted


def _flash_worker(layout: str, causal: bool = True) -> dict:
    """Forward and backward on this rank's pieces, each pass under its own ledger; rank 0
    returns the whole output and gradients, put back in sequence order."""
    rank, n = dist.get_rank(), dist.get_world_size()
    q, k, v, d_out = _data()
    q, k, v, d_out = (t.to(device()) for t in (q, k, v, d_out))
    local = [split_layout(t, rank, n, 2, layout).requires_grad_() for t in (q, k, v)]
    blocks = [0, 0]  # score blocks made in forward, and the largest one's bytes
    flash_module._block_scores = _counting(flash_module._block_scores, blocks)
    with Ledger(track_activations=False) as fwd:
        out = ring_flash_attention(*local, layout=layout, causal=causal)
    forward_blocks = list(blocks)
    with Ledger(track_activations=False) as bwd:
        out.backward(split_layout(d_out, rank, n, 2, layout))
    every = [None] * n
    dist.all_gather_object(every, [t.cpu() for t in [out.detach()] + [t.grad for t in local]])
    full = [torch.empty(B, H, L, D, dtype=F64) for _ in range(4)]
    for j, tensors in enumerate(every):
        for whole, part in zip(full, tensors):
            whole[:, :, local_positions(j, n, L, layout)] = part
    sent = [comm_totals(ledger.report()).get("isend", {}) for ledger in (fwd, bwd)]
    counts = [None] * n
    dist.all_gather_object(counts, forward_blocks)
    return {"full": full, "sent": sent, "blocks": counts}


def _assert_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        err = (g - w).abs().max().item()
        assert err <= TOL, f"{name} differs from serial attention by {err:.3g} > {TOL:.3g}"


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("n", [2, 4])
def test_ring_flash_equals_serial_causal_attention(n, layout):
    got = launch(_flash_worker, n, layout, timeout=120)
    _assert_equal(got["full"], _serial())
    # bytes each rank sends, per pass (ledger buffer bytes of its isends) == the formula
    chunk = B * H * (L // n) * D * 8
    want = formulas.ring_flash_sent_bytes(n, chunk)
    fwd, bwd = got["sent"]
    assert (fwd["calls"], fwd["bytes"]) == (n - 1, want["forward"])
    assert (bwd["calls"], bwd["bytes"]) == (2 * (n - 1), want["backward"])
    # per training step the same as the seed's ring: the saving is memory, not traffic
    assert want["forward"] + want["backward"] == formulas.attention_sent_bytes("ring", n, chunk)
    # half-chunk score blocks each rank computed (counted) == the causal layout's count
    assert [c for c, _ in got["blocks"]] == [blocks_per_rank(r, n, layout) for r in range(n)]
    # the largest score tensor any rank made: one [B, H, C/2, C/2] block, not [B, H, C, L]
    assert {b for _, b in got["blocks"]} == {formulas.score_bytes("flash", B, H, L, n, 8)}


def test_zigzag_balances_the_causal_work():
    for n in (2, 4, 8):
        zigzag = [blocks_per_rank(r, n, "zigzag") for r in range(n)]
        contiguous = [blocks_per_rank(r, n, "contiguous") for r in range(n)]
        assert zigzag == [2 * n + 1] * n  # 3 on its own chunk, 2 on each other one
        assert contiguous == [4 * r + 3 for r in range(n)]  # the last rank waits for none
        assert sum(zigzag) == sum(contiguous) == n * (2 * n + 1)  # the causal half, both ways


def test_ring_flash_without_mask_equals_full_attention():
    got = launch(_flash_worker, 2, "zigzag", False, timeout=120)
    _assert_equal(got["full"], _serial(causal=False))


def _no_rescale(state, s, v):
    """The online update that forgets to rescale the old sum and output by exp(m_old - m_new)."""
    m, total, acc = state
    m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
    p = torch.exp(s - m_new)
    return [m_new, total + p.sum(dim=-1, keepdim=True), acc + p @ v]


def _transposed_diagonal(size, device):
    """A diagonal-block mask that hides the earlier keys instead of the later ones."""
    return torch.ones(size, size, dtype=torch.bool, device=device).tril(-1)


@pytest.mark.parametrize(
    "name, broken", [("online_update", _no_rescale), ("diagonal_mask", _transposed_diagonal)]
)
def test_broken_ring_flash_is_caught(monkeypatch, name, broken):
    monkeypatch.setattr(flash_module, name, broken)
    got = launch(_flash_worker, 2, "zigzag", timeout=120)
    with pytest.raises(AssertionError, match="out differs"):
        _assert_equal(got["full"], _serial())


def test_backward_without_the_row_sum_term_is_caught(monkeypatch):
    # dS = P * dP forgets that a probability's gradient also moves every other one in its row
    monkeypatch.setattr(flash_module, "softmax_grad", lambda p, dp, delta: p * dp)
    got = launch(_flash_worker, 2, "zigzag", timeout=120)
    want = _serial()
    _assert_equal(got["full"][:1], want[:1])  # the forward is untouched
    with pytest.raises(AssertionError, match="dq differs"):
        _assert_equal(got["full"], want)


# -- memory: what each ring saves for backward ---------------------------------------------------
MB, MH = 1, 2  # one sequence, two heads: the score matrix dominates from short lengths on


def _peak_worker(kind: str, length: int) -> int:
    """Peak bytes saved for backward on this rank (the ledger's count), forward + backward."""
    rank, n = dist.get_rank(), dist.get_world_size()
    q, k, v, d_out = (t.to(device()) for t in _data(length, MB, MH))
    if kind == "seed":
        local = [split_sequence(t, rank, n, dim=2).clone().requires_grad_() for t in (q, k, v)]
    else:
        local = [split_layout(t, rank, n, 2).requires_grad_() for t in (q, k, v)]
    with Ledger() as ledger:
        if kind == "seed":
            out = ring_attention(*local, causal=True)
        else:
            out = ring_flash_attention(*local)
        out.backward(torch.ones_like(out))
    peaks = [None] * n
    dist.all_gather_object(peaks, ledger.report()["memory"]["peak_activations"])
    return max(peaks)


def _measured(kind: str, n: int, length: int) -> int:
    return launch(_peak_worker, n, kind, length, timeout=120)


def _model(kind: str, n: int, length: int) -> int:
    return formulas.saved_activation_bytes(kind, MB, MH, length, D, n, 8)


@pytest.mark.parametrize("n", [2, 4])
def test_ring_flash_saves_less_than_the_seed_ring_by_the_scores(n):
    length = 64
    seed, flash = _measured("seed", n, length), _measured("flash", n, length)
    assert (seed, flash) == (_model("seed", n, length), _model("flash", n, length))
    scores = formulas.score_bytes("seed", MB, MH, length, n, 8)
    saved = seed - flash
    print(
        f"N={n}, L={length}: peak saved activations per rank (measured) seed ring {seed} B, "
        f"online-softmax ring {flash} B; {saved} B less, the seed's [B,H,L/N,L] scores are "
        f"{scores} B"
    )
    assert 0.9 * scores <= saved <= 1.1 * scores  # less by about the score matrix


def test_longest_sequence_under_the_seed_rings_budget():
    n, length = 2, 64
    budget = _measured("seed", n, length)  # what the seed's ring saves at L = 64
    longest = {k: formulas.longest_sequence(k, budget, MB, MH, D, n, 8) for k in ("seed", "flash")}
    print(f"budget {budget} B per rank, N={n}: longest sequence {longest} (modeled)")
    assert longest["seed"] == length
    # measured at the online ring's longest length: it fits; the seed's ring there does not
    flash, seed = _measured("flash", n, longest["flash"]), _measured("seed", n, longest["flash"])
    assert flash <= budget < seed, (flash, budget, seed)
    assert _model("flash", n, longest["flash"] + 2 * n) > budget  # one step longer does not fit
    assert longest["flash"] > 4 * longest["seed"]


def test_memory_formulas_reject_what_they_do_not_model():
    with pytest.raises(ValueError, match="multiple of 2N = 4"):
        formulas.saved_activation_bytes("flash", 1, 1, 30, 8, 2, 4)
    with pytest.raises(ValueError, match="ring kind must be one of"):
        formulas.score_bytes("ulysses", 1, 1, 32, 2, 4)
    with pytest.raises(ValueError, match="at least one rank"):
        formulas.ring_flash_sent_bytes(0, 1024)


# -- bad input ----------------------------------------------------------------------------------
def test_sequence_that_does_not_cut_into_2n_pieces_raises():
    with pytest.raises(ValueError, match="2N = 8 equal pieces .* pad the sequence to 24"):
        split_layout(torch.zeros(1, 1, 20, 2), rank=0, n=4)
    with pytest.raises(ValueError, match="must be even.* pad it to 6"):
        ring_flash_attention(*(torch.zeros(1, 1, 5, 2) for _ in range(3)))


def test_mismatched_shapes_and_unknown_layout_raise():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"one shape \[B, H, C, D\]"):
        ring_flash_attention(q, torch.zeros(1, 2, 6, 8), q)
    with pytest.raises(ValueError, match=r"one shape \[B, H, C, D\]"):
        ring_flash_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_flash_attention(q, q, q, layout="striped")
