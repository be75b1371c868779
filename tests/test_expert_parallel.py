"""Expert parallelism: the router's capacity, dropping and auxiliary loss by hand; the
expert-parallel layer equals the serial one (outputs and gradients) on 2 and 4 ranks, sends what
its formula says, and three broken variants fail the same check."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from cai_labs import Ledger, comm, comm_totals, device, launch
from cai_labs.moe import ExpertParallelMoE, MoELayer, TopKRouter, expert_parallel, formulas
from cai_labs.report import from_every_rank
from cai_labs.wire import gloo_headers

D, HIDDEN, E, S = 8, 12, 4, 12  # model width, expert width, experts, tokens per rank
F64 = torch.float64
AUX_WEIGHT = 0.1
#: Every output and gradient is a sum of at most N * S products of O(1) terms (the router's
#: gradient sums over every token): a thousandfold margin on N * S float64 roundings.
TOL = 1e3 * 4 * S * torch.finfo(F64).eps


def _layer(k: int, capacity_factor: float = 1.0) -> MoELayer:
    return MoELayer(D, HIDDEN, E, k=k, capacity_factor=capacity_factor, seed=0).double()


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(n * S, D, generator=g, dtype=F64) for _ in range(2))


def _router(weight: list[list[float]], k: int, capacity_factor: float) -> TopKRouter:
    router = TopKRouter(len(weight[0]), len(weight), k, capacity_factor).double()
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor(weight, dtype=F64))
    return router


# -- the router ------------------------------------------------------------------------------
def test_capacity_is_the_ceiling_of_the_factor_times_the_fair_share():
    assert formulas.capacity(16, 4, 1, 1.0) == 4
    assert formulas.capacity(16, 4, 2, 1.25) == 10
    assert formulas.capacity(10, 4, 1, 1.0) == 3  # 2.5 slots round up
    assert formulas.capacity(10, 11, 1, 1.1) == 1  # 1.1 * 10 / 11 is 1, not 1.0000000000000002
    assert _router([[1.0, 0.0], [0.0, 1.0]], 1, 1.5)(torch.zeros(1, 6, 2, dtype=F64)).capacity == 5


def test_tokens_beyond_capacity_are_dropped_in_token_order():
    # every token prefers expert 0: the first C = 2 keep their slot, the other four are dropped
    router = _router([[1.0, 0.0], [0.0, 0.0]], k=1, capacity_factor=1.0)
    r = router(torch.tensor([[[1.0, 0.0]] * 4], dtype=F64))
    assert r.capacity == 2
    assert r.expert.flatten().tolist() == [0, 0, 0, 0]
    assert r.slot.flatten().tolist() == [0, 1, 2, 3]
    assert r.kept.flatten().tolist() == [True, True, False, False] and r.dropped == 2
    assert r.tokens_per_expert.tolist() == [[4, 0]]  # counted before dropping


def test_first_choices_take_their_slots_before_second_choices():
    # tokens 0, 1 prefer expert 0 and tokens 2, 3 expert 1; C = ceil(0.5 * 4 * 2 / 2) = 2.
    # First choices fill both experts; every second choice finds them full. (Taking slots token
    # by token instead would give token 0's second choice expert 1's first slot, and drop token
    # 2's first choice.)
    router = _router([[1.0, -1.0], [-1.0, 1.0]], k=2, capacity_factor=0.5)
    x = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 2.0]]], dtype=F64)
    r = router(x)
    assert r.capacity == 2
    assert r.expert[0].tolist() == [[0, 1], [0, 1], [1, 0], [1, 0]]
    assert r.slot[0].tolist() == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert r.kept[0, :, 0].all() and not r.kept[0, :, 1].any()
    assert torch.allclose(r.gate.sum(-1), torch.ones(1, 4, dtype=F64))  # k = 2: normalised


def test_aux_loss_against_a_hand_computation():
    # logits = x; three tokens over two experts, k = 1
    x = [[2.0, 0.0], [0.0, 1.0], [1.0, 0.5]]
    router = _router([[1.0, 0.0], [0.0, 1.0]], k=1, capacity_factor=2.0)
    r = router(torch.tensor([x], dtype=F64))
    p0 = [math.exp(a) / (math.exp(a) + math.exp(b)) for a, b in x]  # P(expert 0) per token
    probs = [(p, 1 - p) for p in p0]
    choice = [0 if p > 0.5 else 1 for p in p0]  # [0, 1, 0]
    f = [choice.count(e) / 3 for e in (0, 1)]
    mean_p = [sum(p[e] for p in probs) / 3 for e in (0, 1)]
    want = 2 * sum(fe * pe for fe, pe in zip(f, mean_p))
    assert r.expert.flatten().tolist() == choice
    assert abs(r.aux_loss.item() - want) < 1e-15
    assert torch.allclose(
        r.gate.flatten(), torch.tensor([probs[t][c] for t, c in enumerate(choice)], dtype=F64)
    )
    # a uniform router (all logits equal) gives exactly 1, whatever the ties pick
    flat = _router([[0.0, 0.0], [0.0, 0.0]], k=1, capacity_factor=1.0)
    assert flat(torch.randn(1, 5, 2, dtype=F64)).aux_loss.item() == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("k", [1, 2])
def test_serial_layer_is_the_sum_of_gated_expert_outputs(k):
    layer = _layer(k)
    x, _ = _data(2)
    y, r = layer(x, groups=2)
    assert r.dropped > 0  # the check covers dropped tokens
    want = torch.zeros_like(x)
    xs = x.view(2, S, D)
    for g, s, j in zip(*torch.nonzero(r.kept, as_tuple=True)):
        expert = layer.experts[int(r.expert[g, s, j])]
        want[g * S + s] += r.gate[g, s, j] * expert(xs[g, s])
    assert (y - want).abs().max().item() <= TOL


def test_bad_input_says_what_to_change():
    with pytest.raises(ValueError, match="multiple of 4, or an ep that divides 6"):
        formulas.experts_per_rank(6, 4)
    with pytest.raises(ValueError, match="must be 1 .Switch. or 2 .GShard."):
        TopKRouter(D, E, k=3)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        TopKRouter(D, E, capacity_factor=0)
    with pytest.raises(ValueError, match="at least 2 experts"):
        TopKRouter(D, 1, k=2)
    with pytest.raises(ValueError, match="multiple of groups=2"):
        _layer(1)(torch.zeros(5, D, dtype=F64), groups=2)
    with pytest.raises(ValueError, match=r"\[groups, tokens, 8\]"):
        TopKRouter(D, E)(torch.zeros(1, 3, D + 1))
    layer = _layer(1)
    with pytest.raises(ValueError, match="give each rank num_experts / ep experts"):
        ExpertParallelMoE(layer.router, layer.experts[:3], None)
    with pytest.raises(ValueError, match=r"this rank's tokens \[S, d\]"):
        ExpertParallelMoE.from_serial(layer, None)(torch.zeros(1, S, D, dtype=F64))


# -- the all-to-all mapping ------------------------------------------------------------------
def _all_to_all_worker() -> dict:
    rank, n = dist.get_rank(), dist.get_world_size()
    # piece j of rank r holds 10 r + j: after the all-to-all, piece i of rank r holds 10 i + r
    x = (10 * rank + torch.arange(n, dtype=F64)).repeat_interleave(2).to(device())
    x.requires_grad_()
    y = comm.all_to_all_group(x, None)
    g = torch.randn(2 * n, dtype=F64, generator=torch.Generator().manual_seed(rank)).to(device())
    y.backward(g)
    # the backward is the transpose: sum over ranks of <y, g> == sum over ranks of <x, dx>
    inner = torch.tensor([(y * g).sum().item(), (x * x.grad).sum().item()], dtype=F64)
    dist.all_reduce(inner)
    along_1 = comm.all_to_all(x.detach().view(1, 2 * n), None, dim=1)
    return {"y": y.detach().cpu(), "inner": inner, "along_1": along_1.cpu()}


def test_all_to_all_mapping_sends_piece_i_to_rank_i_and_is_its_own_transpose():
    got = launch(_all_to_all_worker, 4, timeout=120)
    assert got["y"].tolist() == [float(10 * i) for i in range(4) for _ in range(2)]
    assert got["inner"][0].item() == pytest.approx(got["inner"][1].item(), abs=1e-12)
    assert got["along_1"].flatten().tolist() == got["y"].tolist()


# -- expert parallel against serial ----------------------------------------------------------
def _wrong_rank(buf: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Dispatch with every piece sent one rank too far."""
    return comm.all_to_all_group(buf.roll(buf.shape[0] // comm.size(group), 0), group)


def _no_dispatch_twin(buf: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Dispatch right in forward, but the gradient kept in place instead of sent back."""
    return comm.conjugate(buf, comm.all_to_all, lambda g, grp, dim: g, group, 0)


BREAKS = {
    "combine all-to-all is the identity": ("from_experts", lambda x, group: x),
    "tokens routed to the wrong rank": ("to_experts", _wrong_rank),
    "dispatch backward is the identity": ("to_experts", _no_dispatch_twin),
}


def _ep_worker(k: int, broken: str | None = None) -> dict:
    """One forward and backward of the expert-parallel layer on this rank's tokens, each pass
    under its own ledger; every rank's results gathered."""
    rank, n = dist.get_rank(), dist.get_world_size()
    serial = _layer(k).to(device())
    layer = ExpertParallelMoE.from_serial(serial, None)
    x, dy = (t.chunk(n)[rank].to(device()) for t in _data(n))
    x.requires_grad_()
    name, fake = BREAKS[broken] if broken else ("to_experts", expert_parallel.to_experts)
    with mock.patch.object(expert_parallel, name, fake):
        with Ledger(track_activations=False) as fwd:
            y, r = layer(x)
        loss = (y * dy).sum() + AUX_WEIGHT * r.aux_loss / n  # serial: the mean over groups
        with Ledger(track_activations=False) as bwd:
            loss.backward()
    router_grad = layer.router.gate.weight.grad.clone()
    dist.all_reduce(router_grad)  # the router is replicated: data parallelism sums it
    mine = [[p.grad.cpu() for p in e.parameters()] for e in layer.experts]
    return {
        "y": from_every_rank(y.detach().cpu()),
        "dx": from_every_rank(x.grad.cpu()),
        "aux": from_every_rank(r.aux_loss.item()),
        "router_grad": router_grad.cpu(),
        "expert_grads": from_every_rank(mine),
        "capacity": r.capacity,
        "dropped": from_every_rank(r.dropped),
        "bytes": [comm_totals(led.report())["all_to_all_single"] for led in (fwd, bwd)],
    }


def _serial(k: int, n: int) -> dict:
    layer = _layer(k)
    x, dy = _data(n)
    x.requires_grad_()
    y, r = layer(x, groups=n)
    ((y * dy).sum() + AUX_WEIGHT * r.aux_loss).backward()
    per_rank = [[p.grad for p in e.parameters()] for e in layer.experts]
    aux = [layer.router(x.detach().view(n, S, D)[i : i + 1]).aux_loss.item() for i in range(n)]
    return {"y": y.detach(), "dx": x.grad, "router_grad": layer.router.gate.weight.grad,
            "experts": per_rank, "aux": aux, "aux_mean": r.aux_loss.item()}  # fmt: skip


def _gap(got: dict, want: dict, n: int) -> float:
    """Largest difference over outputs, input, router and owned experts' gradients, aux loss."""
    per = E // n
    owned = [g for rank in got["expert_grads"] for e in rank for g in e]
    pairs = [
        (torch.cat(got["y"]), want["y"]),
        (torch.cat(got["dx"]), want["dx"]),
        (got["router_grad"], want["router_grad"]),
        *zip(owned, [g for e in want["experts"][: per * n] for g in e]),
        (torch.tensor(got["aux"], dtype=F64), torch.tensor(want["aux"], dtype=F64)),
    ]
    return max((a - b).abs().max().item() for a, b in pairs)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("n", [2, 4])
def test_expert_parallel_equals_serial(n, k):
    got = launch(_ep_worker, n, k, timeout=120)
    want = _serial(k, n)
    assert sum(got["dropped"]) > 0  # capacity factor 1.0 drops some tokens: covered too
    gap = _gap(got, want, n)
    assert gap <= TOL, f"expert parallel differs from serial by {gap:.3e} > {TOL:.3e}"
    assert sum(got["aux"]) / n == pytest.approx(want["aux_mean"], abs=TOL)
    # ledger buffer bytes == formula, exactly: two all-to-alls per pass
    assert got["capacity"] == formulas.capacity(S, E, k, 1.0)
    model = formulas.all_to_all_bytes(E, got["capacity"], D, 8)
    fwd, bwd = got["bytes"]
    assert (fwd["calls"], fwd["bytes"]) == (2, model["forward"])
    assert (bwd["calls"], bwd["bytes"]) == (2, model["backward"])
    # the sockets sent (N-1)/N of each buffer plus whole gloo headers
    for measured, name in ((fwd, "forward"), (bwd, "backward")):
        payload = int(formulas.all_to_all_sent_bytes(model[name], n))
        assert measured["wire_sent"] is None or gloo_headers(measured["wire_sent"], payload)


@pytest.mark.parametrize("broken", list(BREAKS))
def test_a_broken_expert_parallel_layer_fails_the_check(broken):
    got = launch(_ep_worker, 2, 2, broken, timeout=120)
    gap = _gap(got, _serial(2, 2), 2)
    assert gap > 1e6 * TOL, f"{broken}: the check did not see it ({gap:.3e})"


def test_expert_parameters_per_rank():
    layer = _layer(1)
    one = sum(p.numel() for p in layer.experts[0].parameters())
    assert one == formulas.expert_params(D, HIDDEN) == 2 * D * HIDDEN + HIDDEN + D
    for n in (1, 2, 4):
        assert formulas.expert_params_per_rank(E, n, D, HIDDEN) == E // n * one
    assert formulas.expert_params(4096, 14336, bias=False, gated=True) == 3 * 4096 * 14336
