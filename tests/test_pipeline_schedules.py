"""Interleaved 1F1B and ZB-H1: valid orders, their ideal bubbles equal the formulas, and on 2 and
4 ranks they give the serial loss and gradients (float64), as 1F1B does; breaks are caught."""

import itertools
from collections import Counter, defaultdict

import pytest
import torch
import torch.distributed as dist
from torch import nn

from cai_labs import Ledger, launch
from cai_labs.hybrid import lm_loss
from cai_labs.models import GPT, GPTConfig
from cai_labs.pipeline import (
    GPTStage,
    StageLinks,
    bubble_fraction,
    interleaved_order,
    measured_bubble,
    pipeline_step,
    step_events,
    virtual_stages,
    zb_h1_order,
)
from cai_labs.pipeline import bubble as bubble_mod
from cai_labs.pipeline import partition as partition_mod
from cai_labs.pipeline import schedules as schedules_mod
from cai_labs.pipeline.formulas import in_flight_microbatches, zb_h1_bubble
from cai_labs.pipeline.split_backward import record_module_outputs

SCHEDULES = schedules_mod.SCHEDULES

# -- orders played on an ideal pipeline -------------------------------------------------------


def orders_of(schedule: str, p: int, m: int, v: int = 1) -> list[list[tuple[str, int, int]]]:
    """Each rank's order as ``(kind, microbatch, chunk)`` ops."""
    if schedule == "interleaved":
        return [schedules_mod.interleaved_order(r, p, m, v) for r in range(p)]
    return [[(k, i, 0) for k, i in SCHEDULES[schedule](r, p, m)] for r in range(p)]


def _messages(kind: str, u: int, n: int) -> tuple[list, list]:
    """What op ``kind`` on virtual stage ``u`` of ``n`` receives and sends, as (src u, dst u,
    tag), with pipeline_step's tags: forward out of ``u`` is ``2u``, gradient out of ``u`` is
    ``2u - 1``."""
    if kind == "F":
        recv = [(u - 1, u, 2 * u - 2)] if u > 0 else []
        return recv, ([(u, u + 1, 2 * u)] if u < n - 1 else [])
    if kind == "B":
        recv = [(u + 1, u, 2 * u + 1)] if u < n - 1 else []
        return recv, ([(u, u - 1, 2 * u - 1)] if u > 0 else [])
    return [], []


def check_ops(orders: list[list[tuple]], p: int, m: int, v: int) -> bool:
    """Every (chunk, micro-batch) has one F and one B on each rank, and one W where the order
    splits the backward; F before B before W. Returns whether the backward is split."""
    split = any(op[0] == "W" for order in orders for op in order)
    for r, order in enumerate(orders):
        count = Counter(order)
        want = {(k, i, c) for k in ("FBW" if split else "FB") for i in range(m) for c in range(v)}
        assert set(count) == want and set(count.values()) == {1}, f"rank {r}: ops {count}"
        pos = {op: n for n, op in enumerate(order)}
        for i in range(m):
            for c in range(v):
                assert pos[("F", i, c)] < pos[("B", i, c)], f"rank {r}: B{i} before F{i}"
                if split:
                    assert pos[("B", i, c)] < pos[("W", i, c)], f"rank {r}: W{i} before B{i}"
    return split


def play(
    orders: list[list[tuple]],
    p: int,
    m: int,
    v: int = 1,
    times: dict | None = None,
    overhead: float = 0.0,
) -> dict:
    """Run the orders on an ideal pipeline: F takes 1, B 2 (1 where W takes the other 1), or
    ``times``, all divided by ``v``; an op starts when its rank is free and its message has
    arrived (the k-th receive on a channel ``(src, dst, tag)`` gets the k-th send). Checks that
    the ops are complete, that every channel's sends and receives carry the same micro-batches
    in the same order, and that nothing deadlocks. Returns the events and each rank's peak of
    micro-batches in flight (in units of a whole stage: a chunk counts ``1/v``).

    With ``overhead``, a rank stays busy that long after each op's event before it sends and
    moves on (Python, sends: not computing, but not waiting either); each receive is an ``R``
    event from the moment the rank asks until its message is there, as ``pipeline_step`` records
    it."""
    split = check_ops(orders, p, m, v)
    n, dur = p * v, times or {"F": 1.0, "B": 1.0 if split else 2.0, "W": 1.0}
    sends, recvs = defaultdict(list), defaultdict(list)  # channel -> micro-batches, in order
    pair_sends, pair_recvs = defaultdict(list), defaultdict(list)  # (src, dst rank) -> messages
    for r, order in enumerate(orders):
        for kind, i, c in order:
            recv, send = _messages(kind, c * p + r, n)
            for ch in recv:
                recvs[ch].append(i)
                pair_recvs[(ch[0] % p, r)].append((ch, i))
            for ch in send:
                sends[ch].append(i)
                pair_sends[(r, ch[1] % p)].append((ch, i))
    assert dict(sends) == dict(recvs), "sends and receives do not match channel by channel"
    # A backend that ignores tags (NCCL) matches a pair of ranks' messages in order.
    assert dict(pair_sends) == dict(pair_recvs), "messages out of order between a pair of ranks"
    arrived: dict[tuple, list[float]] = defaultdict(list)  # channel -> arrival times
    taken: Counter = Counter()  # channel -> messages received so far
    pos, free, events = [0] * p, [0.0] * p, []
    held, peak = [0] * p, [0] * p
    while any(pos[r] < len(orders[r]) for r in range(p)):
        progressed = False
        for r in range(p):
            if pos[r] == len(orders[r]):
                continue
            kind, i, c = orders[r][pos[r]]
            recv, send = _messages(kind, c * p + r, n)
            if any(len(arrived[ch]) <= taken[ch] for ch in recv):
                continue
            start = max([free[r]] + [arrived[ch][taken[ch]] for ch in recv])
            taken.update(recv)
            if recv:
                events.append({"name": "R", "stage": r, "start": free[r], "end": start, "step": 0})
            end = start + dur[kind] / v
            free[r] = end + overhead
            for ch in send:
                arrived[ch].append(free[r])
            events.append({"name": kind, "stage": r, "start": start, "end": end, "step": 0})
            held[r] += {"F": 1, "B": 0 if split else -1, "W": -1}[kind]
            peak[r] = max(peak[r], held[r])
            pos[r] += 1
            progressed = True
        assert progressed, (
            f"deadlock: ranks stuck at {[o[q] for o, q in zip(orders, pos) if q < len(o)]}"
        )
    return {"events": events, "peak": [q / v for q in peak]}


GRID = [(p, m) for p in (1, 2, 3, 4, 5) for m in (1, 2, 3, 4, 5, 8)]
GRID_INTERLEAVED = [(p, v, k * p) for p in (2, 3, 4) for v in (1, 2, 3, 4) for k in (1, 2, 3)]


@pytest.mark.parametrize("p, m", GRID)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1"])
def test_orders_are_valid(schedule, p, m):
    play(orders_of(schedule, p, m), p, m)


@pytest.mark.parametrize("p, v, m", GRID_INTERLEAVED)
def test_interleaved_orders_are_valid_and_hold_what_the_formula_says(p, v, m):
    peak = play(orders_of("interleaved", p, m, v), p, m, v)["peak"]
    for r in range(p):
        assert peak[r] == pytest.approx(in_flight_microbatches("interleaved", r, p, m, v))


@pytest.mark.parametrize("p, m", [(p, m) for p, m in GRID if m >= p])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1"])
def test_ideal_bubble_equals_the_formula(schedule, p, m):
    # F=1, B=2 (B=W=1 for zb-h1): dyadic, so the bubble equals the formula to one division.
    got = measured_bubble(play(orders_of(schedule, p, m), p, m)["events"])["bubble"]
    assert got == pytest.approx(bubble_fraction(schedule, p, m), abs=8 * 2**-52)


@pytest.mark.parametrize("p, v, m", [(p, v, m) for p, v, m in GRID_INTERLEAVED if v in (1, 2, 4)])
def test_ideal_interleaved_bubble_equals_the_formula(p, v, m):
    # v a power of two: op times 1/v and 2/v stay dyadic, so every time is exact.
    got = measured_bubble(play(orders_of("interleaved", p, m, v), p, m, v)["events"])["bubble"]
    assert got == pytest.approx(bubble_fraction("interleaved", p, m, v), abs=8 * 2**-52)


@pytest.mark.parametrize("overhead", [0.0, 0.25])
@pytest.mark.parametrize(
    "schedule, p, m, v",
    [("gpipe", 2, 4, 1), ("1f1b", 3, 6, 1), ("1f1b", 4, 4, 1), ("interleaved", 2, 4, 2)]
    + [("interleaved", 4, 8, 2), ("interleaved", 3, 6, 4)],
)
def test_waiting_bubble_counts_what_a_stage_waits_not_what_it_does_between_ops(
    schedule, p, m, v, overhead
):
    """Time a rank spends between ops on its own (``overhead``) is idle for ``measured_bubble``
    but work for ``waiting_bubble``: with it, the pipeline is the ideal one of ops that long,
    whose bubble is the formula's, but for the ends: the span runs from the first op's event
    to the last's, without the overhead after it (at most one overhead per rank)."""
    events = play(orders_of(schedule, p, m, v), p, m, v, overhead=overhead)["events"]
    want = bubble_fraction(schedule, p, m, v)
    got = bubble_mod.waiting_bubble(events)
    assert got["bubble"] == pytest.approx(want, abs=overhead / got["span"] + 8 * 2**-52)
    not_computing = measured_bubble(events)["bubble"]
    assert (
        not_computing == pytest.approx(want, abs=8 * 2**-52)
        if not overhead
        else (not_computing > want + 0.05)
    )


def test_waiting_bubble_that_counts_only_receive_waits_is_caught(monkeypatch):
    """A break: counting only the receive waits misses the last stage's idle tail (and the
    first stage's idle head); the check above fails on it."""

    def blocked_only(events):
        ops = [e for e in events if e["name"] != "R"]
        span = max(e["end"] for e in ops) - min(e["start"] for e in ops)
        waits = sum(e["end"] - e["start"] for e in events if e["name"] == "R")
        return {"bubble": waits / span / len({e["stage"] for e in ops}), "span": span}

    monkeypatch.setattr(bubble_mod, "waiting_bubble", blocked_only)
    with pytest.raises(AssertionError):
        test_waiting_bubble_counts_what_a_stage_waits_not_what_it_does_between_ops(
            "1f1b", 4, 4, 1, 0.25
        )
    monkeypatch.undo()
    with pytest.raises(ValueError, match="no R events"):
        events = play(orders_of("1f1b", 2, 2), 2, 2)["events"]
        bubble_mod.waiting_bubble([e for e in events if e["name"] != "R"])


TIMES = (0.25, 0.5, 1.0, 1.5, 3.0)


@pytest.mark.parametrize("p, m", [(2, 2), (2, 5), (3, 6), (4, 4), (5, 8)])
def test_ideal_zb_h1_bubble_with_unequal_times_equals_the_formula(p, m):
    orders = orders_of("zb-h1", p, m)
    for t_f, t_b, t_w in itertools.product(TIMES, repeat=3):
        events = play(orders, p, m, times={"F": t_f, "B": t_b, "W": t_w})["events"]
        want = zb_h1_bubble(p, m, t_f, t_b, t_w)
        assert measured_bubble(events)["bubble"] == pytest.approx(want, abs=8 * 2**-52)


@pytest.mark.parametrize("p, m", [(p, m) for p, m in GRID if p > 1])
def test_zb_h1_holds_what_1f1b_holds_on_its_first_stage(p, m):
    zb = play(orders_of("zb-h1", p, m), p, m)["peak"]
    ofob = play(orders_of("1f1b", p, m), p, m)["peak"]
    assert zb == [min(p, m)] * p == [in_flight_microbatches("zb-h1", r, p, m) for r in range(p)]
    assert max(zb) == max(ofob) == ofob[0]


def test_zb_h1_order_on_four_stages():
    assert zb_h1_order(3, 4, 4) == [
        *[("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2), ("F", 3), ("B", 3)],
        *[("W", 0), ("W", 1), ("W", 2), ("W", 3)],
    ]
    assert zb_h1_order(0, 4, 4)[:7] == [("F", 0), ("F", 1), ("F", 2), ("F", 3), ("B", 0)] + [
        ("W", 0),
        ("B", 1),
    ]
    assert interleaved_order(1, 2, 2, 2) == [
        *[("F", 0, 0), ("F", 1, 0), ("F", 0, 1), ("B", 0, 1), ("F", 1, 1), ("B", 1, 1)],
        *[("B", 0, 0), ("B", 1, 0)],
    ]


def _zb_without_last_w(stage, n_stages, n_micro):
    return [op for op in zb_h1_order(stage, n_stages, n_micro) if op != ("W", n_micro - 1)]


def _interleaved_backward_same_chunks(stage, n_stages, n_micro, chunks=2):
    """A plausible slip: the backwards walk the chunks in the forward's order (not reversed)."""
    order = interleaved_order(stage, n_stages, n_micro, chunks)
    return [(k, i, c if k == "F" else chunks - 1 - c) for k, i, c in order]


def test_broken_orders_are_caught():
    with pytest.raises(AssertionError, match="ops"):
        play([[(k, i, 0) for k, i in _zb_without_last_w(r, 3, 4)] for r in range(3)], 3, 4)
    broken = [_interleaved_backward_same_chunks(r, 2, 4, 2) for r in range(2)]
    with pytest.raises(AssertionError, match="out of order between a pair|deadlock"):
        play(broken, 2, 4, 2)
    swapped = orders_of("1f1b", 2, 4)
    swapped[1][0], swapped[1][1] = swapped[1][1], swapped[1][0]  # B0 before F0 on stage 1
    with pytest.raises(AssertionError, match="before F"):
        play(swapped, 2, 4)
    crossed = orders_of("gpipe", 2, 4)
    crossed[1][0], crossed[1][1] = crossed[1][1], crossed[1][0]  # stage 1 takes F1 first
    with pytest.raises(AssertionError, match="channel by channel"):
        play(crossed, 2, 4)


# -- on ranks: equal to serial and to 1F1B, in float64 ----------------------------------------

CFG = GPTConfig(n_layers=8, d_model=16, n_heads=2, seq_len=8)
N_MICRO, CHUNKS = 4, 2
X = torch.randint(0, CFG.vocab_size, (8, CFG.seq_len), generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, CFG.vocab_size, (8, CFG.seq_len), generator=torch.Generator().manual_seed(2))
# float64: reordering the sums over 4 micro-batches and ~10^2-term products moves a gradient by
# ~1e-14 relative; a missing micro-batch moves it by ~1/4.
TOL = dict(rtol=1e-10, atol=1e-12)


def serial_reference():
    model = GPT(CFG, seed=0).double()
    loss = lm_loss(model(X), Y)
    loss.backward()
    return loss.item(), {n: q.grad for n, q in model.named_parameters()}


def _stage(gpt: GPT, schedule: str, rank: int, p: int) -> tuple:
    if schedule == "interleaved":
        chunks = [
            GPTStage(gpt, u, p * CHUNKS) for u in partition_mod.virtual_stages(rank, p, CHUNKS)
        ]
        return nn.ModuleList(chunks), StageLinks.ring(rank, p)
    links = StageLinks(rank - 1 if rank > 0 else None, rank + 1 if rank < p - 1 else None)
    return GPTStage(gpt, rank, p), links


def schedules_worker(schedules: list[str]) -> list[dict]:
    rank, p = dist.get_rank(), dist.get_world_size()
    mine = {}
    for schedule in schedules:
        gpt = GPT(CFG, seed=0).double()
        module, links = _stage(gpt, schedule, rank, p)
        with Ledger(model=module) as ledger:
            loss = pipeline_step(
                module,
                links,
                stage=rank,
                n_stages=p,
                inputs=X,
                targets=Y,
                n_micro=N_MICRO,
                loss_fn=lm_loss,
                schedule=schedule,
                ledger=ledger,
            )
        names = {id(q): n for n, q in gpt.named_parameters()}
        report = ledger.report()
        mine[schedule] = {
            "loss": None if loss is None else loss.item(),
            "grads": {names[id(q)]: q.grad for q in module.parameters()},
            "peak_act": report["memory"]["peak_activations"],
            "timeline": report["timeline"],
        }
    out = [None] * p
    dist.all_gather_object(out, mine)
    return out


def _assert_equal_to_serial(res: list[dict], schedule: str) -> None:
    ref_loss, ref_grads = serial_reference()
    assert res[-1][schedule]["loss"] == pytest.approx(ref_loss, rel=1e-12)
    seen = set()
    for r in res:
        for name, g in r[schedule]["grads"].items():
            assert g is not None, f"{schedule}: {name} got no gradient"
            torch.testing.assert_close(g, ref_grads[name], **TOL, msg=f"{schedule}: {name}")
            seen.add(name)
    assert seen == set(ref_grads), "every parameter lives on exactly one rank"


@pytest.mark.parametrize("ranks", [2, 4])
def test_interleaved_and_zb_h1_equal_serial_and_1f1b(ranks):
    res = launch(schedules_worker, ranks, ["1f1b", "interleaved", "zb-h1"])
    for schedule in ("1f1b", "interleaved", "zb-h1"):
        _assert_equal_to_serial(res, schedule)
    for r in res:  # and equal to 1F1B's (through serial, but say it)
        for name, g in r["zb-h1"]["grads"].items():
            torch.testing.assert_close(g, r["1f1b"]["grads"][name], **TOL)
    for rank, r in enumerate(res):  # R: a receive for every F but the first virtual stage's,
        first, last = rank == 0, rank == ranks - 1  # and every B but the last's
        names = Counter(e["name"] for e in r["interleaved"]["timeline"])
        waits = N_MICRO * (2 * CHUNKS - first - last)
        assert names == {"F": N_MICRO * CHUNKS, "B": N_MICRO * CHUNKS, "R": waits}
        names = Counter(e["name"] for e in r["zb-h1"]["timeline"])
        waits = N_MICRO * (2 - first - last)
        assert names == {"F": N_MICRO, "B": N_MICRO, "W": N_MICRO, "R": waits}
    b = measured_bubble(step_events([r["zb-h1"]["timeline"] for r in res], step=0))
    assert 0.0 < b["bubble"] < 1.0
    # Memory: ZB-H1 holds min(p, m) micro-batches on every stage, 1F1B p - s: measured saved
    # activation bytes in that ratio (the last stage, which also keeps the loss's, left out).
    zb, ofob = [r["zb-h1"]["peak_act"] for r in res], [r["1f1b"]["peak_act"] for r in res]
    assert zb[0] == ofob[0]
    for s in range(ranks - 1):
        want = in_flight_microbatches("zb-h1", s, ranks, N_MICRO)
        assert zb[s] * in_flight_microbatches("1f1b", s, ranks, N_MICRO) == ofob[s] * want


def test_zb_h1_skipping_the_last_weight_pass_is_caught(monkeypatch):
    monkeypatch.setitem(SCHEDULES, "zb-h1", _zb_without_last_w)
    res = launch(schedules_worker, 2, ["zb-h1"])
    with pytest.raises(AssertionError):
        _assert_equal_to_serial(res, "zb-h1")


def test_interleaved_chunks_placed_contiguously_are_caught(monkeypatch):
    """A plausible slip: rank r holding virtual stages ``r v .. r v + v - 1`` while the schedule
    sends chunk c's output to rank r + 1's chunk c: the layers run in the wrong order."""
    monkeypatch.setattr(
        partition_mod, "virtual_stages", lambda r, p, v: [r * v + c for c in range(v)]
    )
    res = launch(schedules_worker, 2, ["interleaved"])
    with pytest.raises(AssertionError):
        _assert_equal_to_serial(res, "interleaved")


# -- bad input --------------------------------------------------------------------------------


def test_bad_schedule_inputs_raise_clear_errors():
    with pytest.raises(
        ValueError, match=r"micro-batches \(6\) divisible by the pipeline size \(4\)"
    ):
        bubble_fraction("interleaved", 4, 6, 2)
    with pytest.raises(ValueError, match=r"divisible by the pipeline size \(4\)"):
        interleaved_order(0, 4, 6, 2)
    with pytest.raises(ValueError, match=r"at least as many micro-batches \(2\) as stages \(4\)"):
        bubble_fraction("zb-h1", 4, 2)
    with pytest.raises(ValueError, match="op times must be positive"):
        zb_h1_bubble(2, 4, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        bubble_fraction("zb-h2", 4, 8)
    assert bubble_fraction("interleaved", 4, 8, 2) == 3 / 19
    assert bubble_fraction("zb-h1", 4, 8) == 3 / 27
    assert virtual_stages(1, 4, 2) == [1, 5]
    with pytest.raises(ValueError, match="at least 2 ranks"):
        StageLinks.ring(0, 1)
    stage = nn.Linear(2, 2)
    kw = dict(stage=0, n_stages=1, inputs=X, targets=Y, n_micro=2, loss_fn=lm_loss)
    with pytest.raises(ValueError, match="pass stage_module as a list"):
        pipeline_step(stage, StageLinks(None, None), schedule="interleaved", **kw)
    with pytest.raises(ValueError, match="runs one stage per rank; got 2 chunks"):
        pipeline_step([stage, stage], StageLinks(None, None), schedule="zb-h1", **kw)


def test_split_backward_refuses_what_it_would_count_twice():
    lin = nn.Linear(3, 3)
    tied = nn.Sequential(lin, nn.Linear(3, 3))
    tied[1].weight = lin.weight
    with pytest.raises(ValueError, match="weight tying"), record_module_outputs(tied):
        pass
    twice = nn.Sequential(lin, lin)
    with pytest.raises(ValueError, match="ran twice"), record_module_outputs(twice):
        twice(torch.zeros(1, 3))
