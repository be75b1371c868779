"""ZeRO 1/2/3 in mixed precision (bf16/fp16 parameters, fp32 masters) equal their serial twin.

The serial twin is the same tiny OPT in the low dtype on one process, with an fp32 master copy of
every parameter that ``torch.optim.Adam`` updates and that is rounded back into the model after each
step (in fp16 with the same :class:`~cai_labs.zero.DynamicLossScaler`). It computes each rank's
micro-batch gradient in turn and averages them in the low dtype, the operations the ranks perform.
On 2 ranks the reduce-scatter's sum is one rounded addition, as in the twin, so the parallel run
must equal the twin bit for bit. On 4 ranks gloo adds the four terms in another order; that gradient
is checked against the rounding bound of a 4-term bf16 sum (:mod:`cai_labs.testing`), and the
weights against the most Adam can move a weight whose near-zero gradient changed sign by that
rounding (:func:`_adam_move_bound`): a weak check, the 2-rank one is the strict one.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _opt_cases import STEPS, batches, model

from cai_labs import Ledger, comm_totals, launch
from cai_labs.errors import RankFailed
from cai_labs.testing import rounding_bound
from cai_labs.zero import STAGES, DynamicLossScaler, ZeroOptimizer, memory_by_kind, zero_wrap
from cai_labs.zero.formulas import zero_memory_formula, zero_step_comm, zero_unit_memory

LR = 1e-3
SMALL_LR = 1e-5  # below half a bf16 ulp of most weights: an update a bf16 master loses
# The first step overflows fp16 at 2**16 and is skipped; the scale halves, then grows each step.
FP16_SCALE = dict(init_scale=2.0**16, growth_interval=1)


def _twin(rank: int, world: int, dtype: torch.dtype, lr: float, scaler: dict | None) -> dict:
    """The serial mixed-precision run: every rank's micro-batch, averaged in ``dtype``."""
    net = model(seed=0).to(dtype)
    params = list(net.parameters())
    master = [p.detach().float() for p in params]
    opt = torch.optim.Adam(master, lr=lr)
    scale = DynamicLossScaler(**scaler, sync=False) if scaler else None
    first_grad = None
    for step in range(STEPS):
        total = None
        for r in range(world):
            x, y = list(batches(r, world))[step]
            net.zero_grad(set_to_none=True)
            loss = net(input_ids=x, labels=y).loss
            (scale.scale(loss) if scale else loss).backward()
            g = torch.cat([p.grad.reshape(-1) for p in params])
            total = g if total is None else total + g
        avg = total / world
        first_grad = avg.float() if first_grad is None else first_grad
        offset = 0
        for m in master:
            m.grad = avg[offset : offset + m.numel()].view(m.shape).float()
            offset += m.numel()
        if scale:
            scale.step(opt)
        else:
            opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for p, m in zip(params, master):
                p.copy_(m)
    return {
        "params": torch.cat([p.detach().reshape(-1) for p in params]),
        "master": torch.cat([m.detach().reshape(-1) for m in master]),
        "first_grad": first_grad,
        "scale": scale.scale_value if scale else None,
    }


def _local_grads(rank: int, world: int, dtype: torch.dtype) -> torch.Tensor:
    """Every rank's first-step gradient (to bound the 4-term sum's rounding)."""
    net = model(seed=0).to(dtype)
    x, y = next(batches(rank, world))
    net(input_ids=x, labels=y).loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()]).float()


def _flat_master(wrapped) -> torch.Tensor:
    """The fp32 master weights in the module's parameter order, gathered from the shards."""
    parts = []
    for u in wrapped.units:
        every = [torch.empty_like(u.shard) for _ in range(wrapped.world_size)]
        dist.all_gather(every, u.shard.detach())
        parts.append(torch.cat(every)[: u.numel])
    by_param = {}
    for u, flat in zip(wrapped.units, parts):
        for p, off in zip(u.params, u.offsets):
            by_param[id(p)] = flat[off : off + p.numel()]
    return torch.cat([by_param[id(p)] for p in wrapped.module.parameters()])


def _worker(
    stage: int,
    dtype: torch.dtype = torch.bfloat16,
    lr: float = LR,
    scaler: dict | None = None,
    master_dtype: str = "fp32",
) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    twin = _twin(rank, world, dtype, lr, scaler)
    if master_dtype == "fp32":
        wrapped, opt = zero_wrap(
            model(seed=rank), torch.optim.Adam, stage, param_dtype=dtype, lr=lr
        )
    else:  # broken: the model cast to low precision, Adam (and its "master") in that dtype
        wrapped = STAGES[stage](model(seed=rank).to(dtype))
        opt = ZeroOptimizer(wrapped, torch.optim.Adam, lr=lr)
    scale = DynamicLossScaler(**scaler) if scaler else None
    first_grad, stepped = None, []
    with Ledger(track_activations=False) as ledger:
        wrapped.watch(ledger, opt)
        for x, y in batches(rank, world):
            loss = wrapped(input_ids=x, labels=y).loss
            (scale.scale(loss) if scale else loss).backward()
            if first_grad is None:
                wrapped.reduce_gradients()
                first_grad = [s.grad.detach().float().clone() for s in wrapped.shards]
            if scale:
                stepped.append(scale.step(opt))
            else:
                opt.step()
                stepped.append(True)
            mem = ledger.snapshot("after step")  # before zero_grad: stage 1 holds every p.grad
            opt.zero_grad()
    full = wrapped.full_state_dict()
    names = [n for n, _ in wrapped.module.named_parameters()]
    low = torch.cat([full[n].reshape(-1) for n in names])
    master = _flat_master(wrapped) if master_dtype == "fp32" else low.float()
    every = [None] * world
    dist.all_gather_object(every, {"low": low, "master": master, "stepped": stepped})
    units = [u.numel for u in wrapped.units]
    root = len(units) - 1 if stage == 3 and wrapped.root is not None else None
    grad_gap, grad_bound = (  # (a scaled first gradient may hold the overflow)
        (None, None)
        if scaler
        else _first_grad_check(wrapped, first_grad, twin["first_grad"], world, dtype)
    )
    return {
        "every": every,
        "twin": twin,
        "dtype": low.dtype,
        "mem": memory_by_kind(mem),
        "units": units,
        "root": root,
        "comm": comm_totals(ledger.report()),
        "grad_gap": grad_gap,
        "grad_bound": grad_bound,
        "scale": scale.scale_value if scale else None,
    }


def _in_units(wrapped, vec: torch.Tensor) -> list[torch.Tensor]:
    """A vector in the module's parameter order, laid out as the units' padded flat buffers."""
    starts, acc = {}, 0
    for p in wrapped.module.parameters():
        starts[id(p)] = acc
        acc += p.numel()
    out = []
    for u in wrapped.units:
        flat = vec.new_zeros(u.padded_numel)
        for p, off in zip(u.params, u.offsets):
            flat[off : off + p.numel()] = vec[starts[id(p)] : starts[id(p)] + p.numel()]
        out.append(flat)
    return out


def _first_grad_check(wrapped, first_grad, twin_grad, world, dtype) -> tuple[float, float]:
    """Largest gap of this rank's first averaged gradient shard to the twin's, and the bound of
    rounding in an N-term sum in ``dtype`` (largest entry of sum_r |g_r| / N)."""
    grads = torch.stack([_local_grads(r, world, dtype) for r in range(world)])
    magnitude = (grads.abs().sum(0) / world).max().item()
    gap = max(
        (g - want[u.lo : u.hi]).abs().max().item()
        for u, g, want in zip(wrapped.units, first_grad, _in_units(wrapped, twin_grad))
    )
    return gap, rounding_bound(dtype, world, magnitude)


def _adam_move_bound(lr: float, steps: int, betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """Most that ``steps`` Adam steps can move one weight: by Cauchy-Schwarz,
    ``|m_hat_t| <= c_t sqrt(v_hat_t)`` with ``c_t`` from the moment weights, whatever the
    gradients. Two runs whose near-zero gradients differ in sign by rounding can move a weight
    apart by twice that, which is what the 4-rank parameter check allows."""
    b1, b2 = betas
    total = 0.0
    for t in range(1, steps + 1):
        w1 = [(1 - b1) * b1 ** (t - i) / (1 - b1**t) for i in range(1, t + 1)]
        w2 = [(1 - b2) * b2 ** (t - i) / (1 - b2**t) for i in range(1, t + 1)]
        total += sum(a * a / b for a, b in zip(w1, w2)) ** 0.5
    return 2 * lr * total


def _assert_equals_twin(out: dict, n: int) -> None:
    twin = out["twin"]
    for r in out["every"]:  # every replica holds the same weights (they were all-gathered)
        assert torch.equal(r["low"], out["every"][0]["low"])
        assert torch.equal(r["master"], out["every"][0]["master"])
    got = out["every"][0]
    assert got["low"].dtype == twin["params"].dtype == out["dtype"]
    if n == 2:  # the same operations in the same order: bit for bit
        assert out["grad_gap"] in (0.0, None)
        assert torch.equal(got["master"], twin["master"])
        assert torch.equal(got["low"], twin["params"])
        return
    # 4 ranks: the 4-term gradient sum is rounded in gloo's order, within the bf16 bound ...
    assert 0 < out["grad_gap"] <= out["grad_bound"]
    # ... and Adam can turn that into at most its largest move of a weight, in opposite signs.
    bound = _adam_move_bound(LR, STEPS)
    assert (got["master"] - twin["master"]).abs().max().item() <= bound
    ulp = torch.finfo(out["dtype"]).eps * twin["master"].abs().max().item()  # one final rounding
    assert (got["low"].float() - twin["params"].float()).abs().max().item() <= bound + ulp


def _assert_bytes_match_formula(out: dict, stage: int, n: int) -> None:
    """Measured model-state bytes per rank == the formula for 2-byte parameters and gradients,
    K = 12 (+ Adam's 4-byte step count per unit); ledger bytes == the formula, 2-byte elements."""
    want = zero_unit_memory(out["units"], stage, n, 2, 2, 12, counter_bytes=4)
    assert out["mem"] == want, (out["mem"], want)
    comm = zero_step_comm(out["units"], stage, n, elem=2, root=out["root"])
    assert out["comm"]["reduce_scatter_single"]["bytes"] == STEPS * comm["reduce_scatter"]
    assert out["comm"]["all_gather_single"]["bytes"] == STEPS * comm["all_gather"]


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_zero_equals_serial_mixed_precision_twin(stage, n):
    out = launch(_worker, n, stage)
    _assert_equals_twin(out, n)
    _assert_bytes_match_formula(out, stage, n)


def test_formula_is_the_papers_per_parameter_bytes():
    """Without padding the exact account is the paper's 2 + 2 + 12/N, 2 + 14/N, 16/N bytes."""
    n, units = 4, [4000, 8000]
    psi = sum(units)
    for stage, per_param in {1: 2 + 2 + 12 / n, 2: 2 + 14 / n, 3: 16 / n}.items():
        got = zero_unit_memory(units, stage, n, 2, 2, 12)["total"]
        paper = zero_memory_formula(psi, stage, n, param_bytes=2, grad_bytes=2, optimizer_bytes=12)
        assert got == paper["total"] == per_param * psi


def test_bf16_master_kept_in_low_precision_is_caught():
    """Broken: Adam updates bf16 weights (no fp32 master). With a small lr most updates are
    rounded away, so the weights drift from the fp32-master twin, which is still equal."""
    good = launch(_worker, 2, 2, torch.bfloat16, SMALL_LR)
    _assert_equals_twin(good, 2)
    bad = launch(_worker, 2, 2, torch.bfloat16, SMALL_LR, None, "bf16")
    start = model(seed=0).to(torch.bfloat16)
    start = torch.cat([p.detach().reshape(-1) for p in start.parameters()])
    lost = (bad["every"][0]["master"] == start.float()).float().mean().item()
    kept = (good["every"][0]["master"] != start.float()).float().mean().item()
    assert lost > 0.75 and kept > 0.95, (lost, kept)  # updates lost vs. accumulated in fp32
    with pytest.raises(AssertionError):
        _assert_equals_twin(bad, 2)


def test_zero2_keeping_full_bf16_gradients_is_caught_by_the_byte_check(monkeypatch):
    from test_zero import _reduce_keeping_full_gradients

    from cai_labs.zero import Zero2

    monkeypatch.setattr(Zero2, "_reduce_unit", _reduce_keeping_full_gradients(Zero2._reduce_unit))
    out = launch(_worker, 2, 2)
    with pytest.raises(AssertionError):
        _assert_bytes_match_formula(out, 2, 2)
    assert out["mem"]["grads"] > zero_unit_memory(out["units"], 2, 2, 2, 2, 12)["grads"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp16_with_loss_scaler_equals_serial_twin(stage):
    out = launch(_worker, 2, stage, torch.float16, LR, FP16_SCALE)
    stepped = [r["stepped"] for r in out["every"]]
    assert stepped == [[False, True, True]] * 2  # every rank skips the overflowing first step
    assert out["scale"] == 2.0**16 / 2 * 2 * 2
    assert out["scale"] == out["twin"]["scale"]
    _assert_equals_twin(out, 2)


# -- the loss scaler alone -------------------------------------------------------------------


def _overflow_worker(sync: bool) -> dict:
    """ZeRO-3 in fp16; rank 0's gradient shard gets an inf, rank 1's stays finite."""
    rank, world = dist.get_rank(), dist.get_world_size()
    wrapped, opt = zero_wrap(model(seed=0), torch.optim.Adam, 3, param_dtype=torch.float16, lr=LR)
    scaler = DynamicLossScaler(init_scale=2.0**8, sync=sync)
    x, y = next(batches(rank, world))
    scaler.scale(wrapped(input_ids=x, labels=y).loss).backward()
    if rank == 0:
        wrapped.units[0].grad_shard[0] = float("inf")
    before = [s.detach().clone() for s in wrapped.shards]
    stepped = scaler.step(opt)
    same = all(torch.equal(a, s) for a, s in zip(before, wrapped.shards))
    every = [None] * world
    dist.all_gather_object(every, (stepped, scaler.scale_value, same))
    return {"every": every}


def test_overflow_on_one_rank_skips_the_step_on_every_rank_and_halves_the_scale():
    every = launch(_overflow_worker, 2, True)["every"]
    assert every == [(False, 2.0**7, True)] * 2


def test_overflow_flag_not_all_reduced_is_caught():
    """Broken: each rank checks only its own shard; rank 1 steps while rank 0 skips."""
    every = launch(_overflow_worker, 2, False)["every"]
    assert every[0] == (False, 2.0**7, True)
    assert every[1] == (True, 2.0**8, False)  # the replicas now disagree


def test_scale_grows_after_the_interval_and_an_overflow_resets_the_count():
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=3, sync=False)
    for found, want in [(False, 8), (False, 8), (False, 16), (False, 16), (True, 8)]:
        scaler.update(found)
        assert scaler.scale_value == want
    for _ in range(2):
        scaler.update(False)
    assert scaler.scale_value == 8 and scaler.clean_steps == 2
    scaler.update(False)
    assert scaler.scale_value == 16 and scaler.skipped == 1


def _grads(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in net.parameters()]


def _scaled_then_unscaled(scaler: DynamicLossScaler) -> tuple[list, list]:
    net = model(seed=0)
    x, y = next(batches(0, 1))
    net(input_ids=x, labels=y).loss.backward()
    plain = _grads(net)
    net.zero_grad()
    scaler.scale(net(input_ids=x, labels=y).loss).backward()
    grads = [p.grad for p in net.parameters()]
    assert not scaler.unscale_(grads)
    return plain, grads


def test_unscaled_gradients_equal_the_unscaled_loss_gradients():
    """In fp32 a power-of-two scale is exact: unscaling gives back the very same gradients."""
    plain, unscaled = _scaled_then_unscaled(DynamicLossScaler(init_scale=2.0**10, sync=False))
    assert all(torch.equal(a, b) for a, b in zip(plain, unscaled))


def test_scaler_that_does_not_unscale_is_caught(monkeypatch):
    def check_only(self, grads):  # broken: finds overflows but leaves the gradients scaled
        return any(not bool(torch.isfinite(g).all()) for g in grads)

    monkeypatch.setattr(DynamicLossScaler, "unscale_", check_only)
    plain, unscaled = _scaled_then_unscaled(DynamicLossScaler(init_scale=2.0**10, sync=False))
    assert not all(torch.equal(a, b) for a, b in zip(plain, unscaled))


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="backoff_factor"):
        DynamicLossScaler(backoff_factor=2.0)
    with pytest.raises(ValueError, match="growth_interval"):
        DynamicLossScaler(growth_interval=0)
    with pytest.raises(RankFailed, match="param_dtype must be None, torch.bfloat16 or"):
        launch(_bad_dtype, 1)


def _bad_dtype() -> None:
    zero_wrap(torch.nn.Linear(2, 2), param_dtype=torch.float64)
