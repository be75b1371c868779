"""Pipeline parallel == serial: GPipe and 1F1B on 2 and 4 stages give the serial loss and
gradients; the schedules keep the activation memory they promise; bad splits raise."""

import statistics

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
    bubble_formula,
    gpipe_order,
    measured_bubble,
    one_f_one_b_order,
    partition_layers,
    pipeline_step,
    split_microbatches,
    step_events,
)
from cai_labs.pipeline import bubble as bubble_mod
from cai_labs.pipeline.schedules import SCHEDULES

CFG = GPTConfig(n_layers=4, d_model=32, n_heads=4, seq_len=16)
N_MICRO = 4
X = torch.randint(0, CFG.vocab_size, (8, CFG.seq_len), generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, CFG.vocab_size, (8, CFG.seq_len), generator=torch.Generator().manual_seed(2))


def serial_reference():
    model = GPT(CFG, seed=0)
    loss = lm_loss(model(X), Y)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def pipeline_worker(schedule: str, n_micro: int, scale_bug: bool = False):
    rank, p = dist.get_rank(), dist.get_world_size()
    gpt = GPT(CFG, seed=0)
    stage = GPTStage(gpt, rank, p)
    links = StageLinks(rank - 1 if rank > 0 else None, rank + 1 if rank < p - 1 else None)
    # A broken variant for the test to catch: the micro-batch losses not divided by m.
    loss_fn = (lambda o, t: lm_loss(o, t) * n_micro) if scale_bug else lm_loss
    with Ledger(model=stage) as ledger:
        loss = pipeline_step(
            stage,
            links,
            stage=rank,
            n_stages=p,
            inputs=X,
            targets=Y,
            n_micro=n_micro,
            loss_fn=loss_fn,
            schedule=schedule,
            ledger=ledger,
        )
    names = {id(q): n for n, q in gpt.named_parameters()}
    report = ledger.report()
    mine = {
        "loss": None if loss is None else loss.item(),
        "grads": {names[id(q)]: q.grad for q in stage.parameters()},
        "peak_act": report["memory"]["peak_activations"],
        "timeline": report["timeline"],
        "sent": sum(r["bytes"] for r in report["comm"] if r["op"] == "isend"),
    }
    out = [None] * p
    dist.all_gather_object(out, mine)
    return out


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages", [2, 4])
def test_pipeline_equals_serial(schedule, stages):
    ref_loss, ref_grads = serial_reference()
    res = launch(pipeline_worker, stages, schedule, N_MICRO)
    assert res[-1]["loss"] == pytest.approx(ref_loss, abs=1e-5)
    seen = set()
    for r in res:
        for name, g in r["grads"].items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-6, rtol=1e-4)
            seen.add(name)
    assert seen == set(ref_grads), "every parameter lives on exactly one stage"
    # Per step a stage sends its m output activations forward and its m input gradients back,
    # B*s*d*4 bytes each way in total, plus one 64-byte shape header per link and direction.
    act_bytes = X.shape[0] * CFG.seq_len * CFG.d_model * 4
    for s, r in enumerate(res):
        links = (s < stages - 1) + (s > 0)
        assert r["sent"] == links * (act_bytes + 64)
    # Timeline: every stage ran m forwards and m backwards.
    for r in res:
        names = [e["name"] for e in r["timeline"]]
        assert names.count("F") == names.count("B") == N_MICRO


def test_broken_loss_scaling_is_caught():
    _, ref_grads = serial_reference()
    res = launch(pipeline_worker, 2, "1f1b", N_MICRO, True)
    worst = max((g - ref_grads[n]).abs().max().item() for r in res for n, g in r["grads"].items())
    assert worst > 1e-3


def test_1f1b_holds_fewer_activations_and_bubble_is_measured():
    gp = launch(pipeline_worker, 2, "gpipe", N_MICRO)
    ofob = launch(pipeline_worker, 2, "1f1b", N_MICRO)
    # Stage 0 of 2 keeps all 4 micro-batches under GPipe, at most 2 under 1F1B.
    assert ofob[0]["peak_act"] <= 0.6 * gp[0]["peak_act"]
    events = step_events([r["timeline"] for r in gp], step=0)
    b = measured_bubble(events)
    assert 0.0 < b["bubble"] < 1.0 and set(b) >= {"stage0", "stage1", "span"}


def test_schedule_orders():
    assert gpipe_order(0, 2, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]
    assert one_f_one_b_order(0, 3, 4) == [
        ("F", 0),
        ("F", 1),
        ("F", 2),
        ("B", 0),
        ("F", 3),
        ("B", 1),
        ("B", 2),
        ("B", 3),
    ]
    assert one_f_one_b_order(2, 3, 4) == [
        ("F", 0),
        ("B", 0),
        ("F", 1),
        ("B", 1),
        ("F", 2),
        ("B", 2),
        ("F", 3),
        ("B", 3),
    ]
    assert bubble_formula(4, 8) == pytest.approx(3 / 11)


def test_bad_splits_raise_clear_errors():
    assert partition_layers(5, 2) == [range(0, 3), range(3, 5)]
    with pytest.raises(ValueError, match="cannot split 2 transformer blocks into 3"):
        partition_layers(2, 3)
    with pytest.raises(ValueError, match="do not divide a batch of 8"):
        split_microbatches(torch.zeros(8, 3), 3)


# -- the bubble against its formula ---------------------------------------------------------------


def simulated_events(schedule: str, p: int, m: int, f: float, b: float) -> list[dict]:
    """The F/B events of an ideal pipeline (no communication time) in which every stage takes
    ``f`` per forward and ``b`` per backward, built here from the schedule's order alone: each op
    starts when its stage is free and its input is there (F after the previous stage's F of the
    micro-batch, B after the next stage's B of it)."""
    end: dict[tuple[str, int, int], float] = {}
    orders = {s: list(SCHEDULES[schedule](s, p, m)) for s in range(p)}
    free = dict.fromkeys(range(p), 0.0)
    events = []
    while any(orders.values()):
        progressed = False
        for s in range(p):
            if not orders[s]:
                continue
            kind, i = orders[s][0]
            dep = ("F", s - 1, i) if kind == "F" else ("B", s + 1, i)
            if (kind == "F" and s == 0) or (kind == "B" and s == p - 1):
                dep = ("F", s, i) if kind == "B" else None
            if dep is not None and dep not in end:
                continue
            start = max(free[s], end[dep] if dep else 0.0)
            free[s] = end[(kind, s, i)] = start + (f if kind == "F" else b)
            events.append({"name": kind, "stage": s, "start": start, "end": free[s], "step": 0})
            orders[s].pop(0)
            progressed = True
        assert progressed, "schedule deadlocks"
    return events


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m", [(2, 4), (4, 4), (4, 8), (3, 5)])
def test_measured_bubble_of_an_ideal_pipeline_equals_the_formula(schedule, p, m):
    # Dyadic durations: every time is exact in float64, so the bubble equals the formula to
    # float64 rounding of one division.
    b = bubble_mod.measured_bubble(simulated_events(schedule, p, m, f=1.0, b=2.0))
    assert b["span"] == (m + p - 1) * 3.0
    assert b["bubble"] == pytest.approx(bubble_formula(p, m), abs=4 * 2**-52)


def test_measured_bubble_averages_copies_of_a_stage_and_needs_events():
    """Clock readings start anywhere (an offset), and a stage may run on several ranks (data or
    tensor parallel copies): their bubbles are averaged, then the stages'."""
    events = simulated_events("gpipe", 2, 4, f=1.0, b=2.0)
    t0 = 1024.0
    shifted = [
        dict(e, start=e["start"] + t0, end=e["end"] + t0, rank=2 * e["stage"]) for e in events
    ]
    # A second copy of stage 1 (rank 3) that is idle half of its busy time's worth longer:
    # its last backward is cut short by 3 time units.
    copy = [dict(e, rank=3) for e in shifted if e["stage"] == 1]
    copy[-1] = dict(copy[-1], end=copy[-1]["end"] - 3.0)
    for e in shifted:  # rank 0's forwards carry no rank: it defaults to 0, the same copy
        if e["stage"] == 0 and e["name"] == "F":
            del e["rank"]
    b = bubble_mod.measured_bubble(shifted + copy)
    span = 15.0
    assert b["span"] == span
    assert b["stage0"] == 1 - 12 / span
    assert b["stage1"] == ((1 - 12 / span) + (1 - 9 / span)) / 2
    assert b["bubble"] == (b["stage0"] + b["stage1"]) / 2
    with pytest.raises(ValueError, match="^no F/B events given: record the step with a Ledger$"):
        bubble_mod.measured_bubble([])


def test_step_events_keep_one_step_of_forwards_and_backwards():
    tl0 = [
        {"name": "F", "step": 1, "stage": 0},
        {"name": "B", "step": 1, "stage": 0},
        {"name": "F", "step": 2, "stage": 0},
        {"name": "optimizer", "step": 1},
        {"name": "F"},
    ]
    tl1 = [{"name": "B", "step": 1, "stage": 1}, {"name": "W", "step": 1, "stage": 1}]
    assert step_events([tl0, tl1], step=1) == [tl0[0], tl0[1], *tl1]  # W: split backward
    assert step_events([tl0], step=3) == []


class _Equal(nn.Module):
    """A stage of ``layers`` tanh(Linear) of width ``d``: every stage does the same work."""

    def __init__(self, d: int, layers: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(d, d), nn.Tanh())])

    def forward(self, x):
        return self.net(x)


BUBBLE_D, BUBBLE_ROWS, BUBBLE_STEPS = 512, 2048, 5


def bubble_worker(schedule: str, n_micro: int) -> list[float]:
    """Equal stages, compute-heavy micro-batches (a forward is ~1 GFLOP, tens of ms, so waking
    a rank from a receive costs little beside it; one rank per core): the conditions of the
    formula. Returns the measured bubble of each step."""
    rank, p = dist.get_rank(), dist.get_world_size()
    stage = _Equal(BUBBLE_D, 4, seed=rank)
    links = StageLinks(rank - 1 if rank > 0 else None, rank + 1 if rank < p - 1 else None)
    x = torch.randn(BUBBLE_ROWS, BUBBLE_D, generator=torch.Generator().manual_seed(0))
    x.requires_grad_()  # stage 0 computes its input gradient too, like every other stage
    y = torch.zeros(BUBBLE_ROWS, BUBBLE_D)
    with Ledger(track_activations=False) as ledger:
        for step in range(BUBBLE_STEPS + 1):  # step 0 warms up (shape handshakes, allocator)
            dist.barrier()
            pipeline_step(
                stage,
                links,
                stage=rank,
                n_stages=p,
                inputs=x,
                targets=y,
                n_micro=n_micro,
                loss_fn=nn.functional.mse_loss,
                schedule=schedule,
                ledger=ledger,
                step=step,
            )
    timelines = [None] * p
    dist.all_gather_object(timelines, ledger.report()["timeline"])
    return [
        bubble_mod.measured_bubble(step_events(timelines, step))["bubble"]
        for step in range(1, BUBBLE_STEPS + 1)
    ]


# Measured on 2 ranks (one per core): the median step's bubble is within this of the formula.
# The slack is for what the formula leaves out: the sends and receives between events, the
# loss on the last stage, and other processes on a shared machine (measured with a load
# average of 13 on 2 cores: single steps 0.17-0.28, medians 0.19-0.20).
# Leaving the backward out of the busy time (the break below) reads about 0.7 against 0.2.
BUBBLE_TOL = 0.15


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_measured_bubble_matches_the_formula_on_two_ranks(schedule):
    got = statistics.median(launch(bubble_worker, 2, schedule, N_MICRO))
    want = bubble_formula(2, N_MICRO)
    assert abs(got - want) <= BUBBLE_TOL, (
        f"{schedule}: measured bubble {got:.3f}, formula {want:.3f}"
    )


# -- deliberate breaks: the bubble checks above fail on a plausible bug ---------------------------


def _forward_only_bubble(events: list[dict]) -> dict[str, float]:
    """The audit's break: ``measured_bubble`` with backward events left out of the busy time."""
    span = max(e["end"] for e in events) - min(e["start"] for e in events)
    stages = sorted({e["stage"] for e in events})
    busy = {
        s: sum(e["end"] - e["start"] for e in events if e["stage"] == s and e["name"] == "F")
        for s in stages
    }
    out = {f"stage{s}": 1.0 - busy[s] / span for s in stages}
    return {**out, "bubble": sum(out.values()) / len(out), "span": span}


def test_bubble_without_backward_busy_time_is_caught(monkeypatch):
    monkeypatch.setattr(bubble_mod, "measured_bubble", _forward_only_bubble)
    with pytest.raises(AssertionError):
        test_measured_bubble_of_an_ideal_pipeline_equals_the_formula("gpipe", 4, 8)
    with pytest.raises(AssertionError):
        test_measured_bubble_matches_the_formula_on_two_ranks("gpipe")
