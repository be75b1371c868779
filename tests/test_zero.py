"""ZeRO stages 1/2/3 equal plain data parallel, and their memory matches the paper's formula."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _opt_cases import LR, STEPS, batches, data_parallel_reference, flat_state, model

from cai_labs import Ledger, comm_totals, launch
from cai_labs.zero import Zero2, memory_by_kind, zero_memory_formula, zero_wrap


def _optimizer(kind: str):
    if kind == "adam":
        return torch.optim.Adam, {"lr": LR}
    return torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}


def _worker(stage: int, broken: bool = False, optim: str = "adam") -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    cls, kwargs = _optimizer(optim)
    # Reference: plain data parallel (all-reduce of gradients, full Adam on every rank).
    ref, ref_opt, _ = data_parallel_reference(rank, world, cls, **kwargs)
    ref_flat = flat_state(ref)
    numel = sum(p.numel() for p in ref.parameters())
    ddp_mem = Ledger(model=ref, optimizer=ref_opt).memory()

    # ZeRO: every rank starts from different weights; the wrapper must broadcast rank 0's.
    module = model(seed=rank)
    if broken:  # a variant that never reduces: each rank steps on its own local gradient slice
        from cai_labs.zero import ZeroOptimizer

        class Broken(Zero2):
            def _reduce_unit(self, u):
                with torch.no_grad():
                    u.grad_shard.add_(u.flat_grad()[u.lo : u.hi])
                    for p in u.params:
                        p.grad = None
                u.reduced = True

        wrapped = Broken(module)
        opt = ZeroOptimizer(wrapped, cls, **kwargs)
    else:
        wrapped, opt = zero_wrap(module, cls, stage=stage, **kwargs)
    with Ledger(track_activations=False) as ledger:
        wrapped.watch(ledger, opt)
        for x, y in batches(rank, world):
            opt.zero_grad()
            wrapped(input_ids=x, labels=y).loss.backward()
            opt.step()
        mem = ledger.snapshot("after step")
    report = ledger.report()
    with torch.no_grad():  # evaluation through the wrapper (ZeRO-3 gathers and frees per call)
        x, _ = next(batches(rank, world))
        eval_gap = (wrapped(input_ids=x).logits - ref(input_ids=x).logits).abs().max().item()
    full = wrapped.full_state_dict()
    zero_flat = torch.cat([v.reshape(-1) for v in full.values()])
    every = [None] * world
    dist.all_gather_object(every, zero_flat)
    return {
        "ref": ref_flat,
        "zero": every,
        "numel": numel,
        "mem": memory_by_kind(mem),
        "eval_gap": eval_gap,
        "ddp_mem": ddp_mem,
        "comm": comm_totals(report),
    }


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_equals_data_parallel_after_three_steps(stage, n):
    out = launch(_worker, n, stage)
    # Adam divides by sqrt(v): for entries whose gradient is ~0, the rounding difference between
    # reduce-scatter and all-reduce summation orders is amplified up to ~1e-3 of a step (lr).
    # So the tolerance here is 1% of one step; the SGD test below checks to 1e-6.
    for flat in out["zero"]:  # every rank's (gathered) parameters
        err = (flat - out["ref"]).abs().max().item()
        assert err < 1e-2 * LR, f"ZeRO-{stage} on {n} ranks differs from data parallel by {err}"
    assert out["eval_gap"] < 1e-3
    _assert_memory_matches_formula(out, stage, n)
    # Data parallel itself matches the stage-0 formula.
    base = zero_memory_formula(out["numel"], 0, n)
    for kind in ("params", "grads", "optimizer"):
        assert abs(out["ddp_mem"][kind] - base[kind]) <= 0.05 * base[kind]
    # The collectives of each stage: reduce-scatter always; all-gather of params per step.
    ops = out["comm"]
    rs = ops.get("reduce_scatter_single", ops.get("reduce_scatter_tensor"))
    ag = ops.get("all_gather_single", ops.get("all_gather_into_tensor"))
    assert rs["calls"] > 0 and ag["calls"] > 0
    # Bytes: every step reduce-scatters the (padded) gradient once; stages 1/2 all-gather the
    # parameters once (after the step); stage 3 gathers each layer twice (forward, backward)
    # and the root unit (embeddings) once, as it stays gathered from forward into backward.
    psi = 4 * out["numel"]
    assert STEPS * psi <= rs["bytes"] <= STEPS * (psi + 256)
    if stage == 3:
        assert STEPS * psi < ag["bytes"] <= 2 * STEPS * (psi + 256)
    else:
        assert STEPS * psi <= ag["bytes"] <= STEPS * (psi + 256)


def _assert_memory_matches_formula(out: dict, stage: int, n: int) -> None:
    # Memory per rank after a step: within 5% of the paper's formula (fp32, Adam: K = 8).
    want = zero_memory_formula(out["numel"], stage, n)
    for kind in ("params", "grads", "optimizer"):
        got = out["mem"][kind]
        assert abs(got - want[kind]) <= 0.05 * want[kind], (stage, n, kind, got, want[kind])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_equals_data_parallel_sgd_tight(stage):
    out = launch(_worker, 2, stage, False, "sgd")
    err = max((flat - out["ref"]).abs().max().item() for flat in out["zero"])
    assert err < 1e-6, err


def test_missing_gradient_reduction_is_caught():
    out = launch(_worker, 2, 2, True)
    err = max((flat - out["ref"]).abs().max().item() for flat in out["zero"])
    assert err > 1e-1 * LR


def _reduce_keeping_full_gradients(real):
    """ZeRO-2 that reduce-scatters but keeps every parameter's full gradient as well."""

    def reduce_unit(self, u):
        kept = [p.grad for p in u.params]
        real(self, u)
        for p, g in zip(u.params, kept):
            p.grad = g

    return reduce_unit


def test_zero2_keeping_full_gradients_is_caught_by_the_memory_check(monkeypatch):
    monkeypatch.setattr(Zero2, "_reduce_unit", _reduce_keeping_full_gradients(Zero2._reduce_unit))
    out = launch(_worker, 2, 2)
    with pytest.raises(AssertionError, match="grads"):
        _assert_memory_matches_formula(out, 2, 2)


def test_bad_stage_is_a_clear_error():
    with pytest.raises(ValueError, match="stage must be"):
        zero_wrap(torch.nn.Linear(2, 2), stage=4)
    with pytest.raises(ValueError, match="stage must be"):
        zero_memory_formula(10, 5, 2)


def test_memory_formula_reproduces_the_papers_figure():
    """ZeRO paper, Figure 1: Psi = 7.5B, N = 64, mixed-precision Adam (2 + 2 + K bytes, K = 12):
    120 GB per device for data parallel, 31.4 GB, 16.6 GB and 1.88 GB for stages 1, 2, 3."""
    psi, n = 7.5e9, 64
    published = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.88}
    for stage, gb in published.items():
        got = zero_memory_formula(psi, stage, n, param_bytes=2, grad_bytes=2, optimizer_bytes=12)
        assert got["total"] / 1e9 == pytest.approx(gb, abs=0.05), stage
        assert got["total"] == got["params"] + got["grads"] + got["optimizer"]
    one = zero_memory_formula(1000, 3, 1)  # one rank: every stage is data parallel
    assert (
        one
        == zero_memory_formula(1000, 0, 1)
        == {
            "params": 4000,
            "grads": 4000,
            "optimizer": 8000,
            "total": 16000,
        }
    )
    with pytest.raises(ValueError, match="world_size must be"):
        zero_memory_formula(10, 1, 0)
    with pytest.raises(ValueError, match=r"stage must be 0 \(data parallel\), 1, 2 or 3; got 4"):
        zero_memory_formula(10, 4, 2)


def test_memory_by_kind_folds_the_shard_categories():
    snap = {"params": 1, "param_shards": 20, "grads": 300, "grad_shards": 4000, "optimizer": 50000}
    snap["activations"] = 7  # not model state: left out
    assert memory_by_kind(snap) == {
        "params": 21,
        "grads": 4300,
        "optimizer": 50000,
        "total": 54321,
    }
    assert memory_by_kind({}) == {"params": 0, "grads": 0, "optimizer": 0, "total": 0}


def _fsdp2_worker() -> dict:
    from cai_labs.zero.fsdp2 import fsdp2_memory, fsdp2_wrap

    rank, world = dist.get_rank(), dist.get_world_size()
    ref, _, _ = data_parallel_reference(rank, world)
    wrapped = fsdp2_wrap(model(seed=rank))
    opt = torch.optim.Adam(wrapped.parameters(), lr=LR)
    for x, y in batches(rank, world):
        opt.zero_grad()
        wrapped(input_ids=x, labels=y).loss.backward()
        opt.step()
    mem = fsdp2_memory(wrapped, opt)
    full = {k: v.full_tensor() for k, v in wrapped.state_dict().items()}
    err = max((full[k] - v).abs().max().item() for k, v in ref.state_dict().items())
    return {"err": err, "mem": mem, "numel": sum(p.numel() for p in ref.parameters())}


def test_fsdp2_side_by_side_matches_data_parallel_and_stage3_formula():
    out = launch(_fsdp2_worker, 2)
    assert out["err"] < 1e-2 * LR
    want = zero_memory_formula(out["numel"], 3, 2)
    for kind in ("params", "grads", "optimizer"):
        assert abs(out["mem"][kind] - want[kind]) <= 0.05 * want[kind], (kind, out["mem"], want)


def _clip_worker(stage: int, max_norm: float) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    ref, _, ref_norms = data_parallel_reference(
        rank, world, torch.optim.SGD, max_norm=max_norm, lr=0.1, momentum=0.9
    )
    # The optimizer passed as an instance: its class and hyper-parameters are reused.
    module = model(seed=0)
    wrapped, opt = zero_wrap(
        module, torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9), stage=stage
    )
    norms = []
    for x, y in batches(rank, world):
        opt.zero_grad()
        wrapped(input_ids=x, labels=y).loss.backward()
        norms.append(opt.clip_grad_norm_(max_norm).item())
        opt.step()
    got = torch.cat([v.reshape(-1) for v in wrapped.full_state_dict().values()])
    return {
        "err": (got - flat_state(ref)).abs().max().item(),
        "norms": norms,
        "ref_norms": ref_norms,
        "inner": type(opt.inner).__name__,
    }


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gradient_clipping_matches_data_parallel(stage):
    out = launch(_clip_worker, 2, stage, 0.5)
    assert out["inner"] == "SGD"
    assert min(out["ref_norms"]) > 0.5  # clipping was active on every step
    for a, b in zip(out["norms"], out["ref_norms"]):
        assert abs(a - b) <= 1e-5 * b
    assert out["err"] < 1e-5


def _overlap_worker(stage: int) -> dict:
    from cai_labs.zero import STAGES, ZeroOptimizer

    rank, world = dist.get_rank(), dist.get_world_size()
    flats, records = [], None
    for overlap in (False, True):
        wrapped = STAGES[stage](model(seed=0), overlap_comm=overlap, max_in_flight=1)
        opt = ZeroOptimizer(wrapped, torch.optim.SGD, lr=0.1, momentum=0.9)
        with Ledger(track_activations=False) as ledger:
            for x, y in batches(rank, world):
                opt.zero_grad()
                wrapped(input_ids=x, labels=y).loss.backward()
                assert not wrapped._pending  # all waited for at the end of backward
                opt.step()
        if overlap:
            records = [r for r in ledger.report()["comm"] if r["op"].startswith("reduce_scatter")]
        flats.append(torch.cat([v.reshape(-1) for v in wrapped.full_state_dict().values()]))
    return {
        "diff": (flats[0] - flats[1]).abs().max().item(),
        "async": [r["async"] for r in records],
        "units": len(wrapped.units),
    }


@pytest.mark.parametrize("stage", [2, 3])
def test_overlapped_reduce_scatter_equals_synchronous(stage):
    """ZeRO-2/3 start each unit's reduce-scatter asynchronously during backward; the result is
    exactly that of waiting for each one."""
    out = launch(_overlap_worker, 2, stage)
    assert out["diff"] == 0.0
    assert len(out["async"]) == STEPS * out["units"] and all(out["async"])


# Enough layer units that gathering all of them at once would exceed the two-unit bound.
PREFETCH_LAYERS = 6


class _GatheredStorage:
    """Bytes of gathered layer units, read off the full buffers' storages after every gather
    (independent of the wrapper's own ``gathered_peak_bytes`` bookkeeping)."""

    def __init__(self):
        self.units: list = []
        self.peak = 0

    def __call__(self, real):
        def gather(unit, async_op: bool = False):
            real(unit, async_op)
            now = sum(u.full.untyped_storage().nbytes() for u in self.units)
            self.peak = max(self.peak, now)

        return gather


def _prefetch_worker(layers: int = PREFETCH_LAYERS) -> dict:
    from _opt_cases import SIZES, setup

    from cai_labs.models.opt import tiny_opt
    from cai_labs.zero import Zero3, ZeroOptimizer
    from cai_labs.zero.flat import FlatParamUnit

    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    real_gather = FlatParamUnit.gather
    for prefetch in (False, True):
        module = tiny_opt(setup()[0], seed=0, **dict(SIZES, num_hidden_layers=layers)).train()
        wrapped = Zero3(module, prefetch=prefetch)
        opt = ZeroOptimizer(wrapped, torch.optim.Adam, lr=LR)
        storage = _GatheredStorage()
        storage.units = [u for u in wrapped.units if u is not wrapped.root]
        FlatParamUnit.gather = storage(real_gather)
        try:
            with Ledger(track_activations=False) as ledger:
                for x, y in batches(rank, world):
                    opt.zero_grad()
                    wrapped(input_ids=x, labels=y).loss.backward()
                    opt.step()
        finally:
            FlatParamUnit.gather = real_gather
        gathers = [r for r in ledger.report()["comm"] if r["op"].startswith("all_gather")]
        # A layer unit's full buffer, from its parameters' shapes: numel padded to N shards.
        sizes = [-(-sum(p.numel() for p in u.params) // world) * world * 4 for u in storage.units]
        out[prefetch] = {
            "flat": torch.cat([v.reshape(-1) for v in wrapped.full_state_dict().values()]),
            "calls": len(gathers),
            "bytes": sum(r["bytes"] for r in gathers),
            "async": sum(r["async"] for r in gathers),
            "peak": wrapped.gathered_peak_bytes,
            "bound": wrapped.gathered_bound_bytes(),
            "unit_bytes": max(u.gathered_bytes for u in wrapped.units if u is not wrapped.root),
            "layers": len(wrapped.units) - 1,
            "storage_peak": storage.peak,
            "wrapper_storage_peak": wrapped.gathered_storage_peak_bytes,
            "param_unit_bytes": sizes,
        }
    return out


@pytest.mark.parametrize("n", [2, 4])
def test_zero3_prefetch_is_bit_identical_and_bounded(n):
    """Prefetching the next unit's all-gather changes when it starts, not what is computed or
    sent: same weights to the bit, same all-gather calls and bytes, the later steps' gathers
    asynchronous, and at most two units (depth 1 + the one in use) gathered besides the root."""
    out = launch(_prefetch_worker, n)
    off, on = out[False], out[True]
    assert (off["flat"] - on["flat"]).abs().max().item() == 0.0
    assert (on["calls"], on["bytes"]) == (off["calls"], off["bytes"])
    layers = on["layers"]
    assert on["calls"] == STEPS * (2 * layers + 1)  # root once, every layer twice, per step
    # Step 1 records the order; on steps 2.. every layer is prefetched in forward and backward.
    assert off["async"] == 0 and on["async"] == (STEPS - 1) * 2 * layers
    assert layers == PREFETCH_LAYERS
    _assert_gathered_bound(off, on)


def _assert_gathered_bound(off: dict, on: dict) -> None:
    """Without prefetch one layer unit is gathered at a time, with it at most two."""
    assert off["peak"] == off["bound"] == off["unit_bytes"]  # depth 0: one unit at a time
    assert on["peak"] <= on["bound"] == 2 * on["unit_bytes"]
    # The same bound on what is really allocated: the gathered layer units' storages, against
    # two of the largest units computed from the parameter shapes. With PREFETCH_LAYERS units,
    # gathering them all would break it.
    unit = max(on["param_unit_bytes"])
    assert sum(on["param_unit_bytes"]) > 2 * unit
    assert off["storage_peak"] == unit
    assert unit < on["storage_peak"] <= 2 * unit
    for r in (off, on):  # what the wrapper reports as allocated is what the test saw
        assert r["wrapper_storage_peak"] == r["storage_peak"]


# -- deliberate breaks: the prefetch bound fails on a plausible bug ------------------------------


def _use_prefetching_everything(self, u, phase):
    """``Zero3._use`` that prefetches every remaining unit of the order, with no memory bound."""
    u.gather()
    if self._recording:
        if u not in self._order[phase]:
            self._order[phase].append(u)
    elif self.prefetch_depth:
        order = self._order[phase]
        i = self._position[phase].get(id(u))
        if i is not None:
            for nxt in order[i + 1 :]:
                if not nxt.gathered and nxt is not self.root:
                    nxt.gather(async_op=True)
    self._track_peak()


@pytest.mark.parametrize("n", [2, 4])
def test_zero3_unbounded_prefetch_is_caught(monkeypatch, n):
    from cai_labs.zero import Zero3

    monkeypatch.setattr(Zero3, "_use", _use_prefetching_everything)
    out = launch(_prefetch_worker, n)
    assert out[True]["storage_peak"] > 2 * max(out[True]["param_unit_bytes"])  # it did gather more
    with pytest.raises(AssertionError):
        _assert_gathered_bound(out[False], out[True])


def test_zero3_bad_prefetch_is_a_clear_error():
    from cai_labs.zero import Zero3

    with pytest.raises(ValueError, match="prefetch must be"):
        Zero3(torch.nn.Linear(2, 2), prefetch=-1)
