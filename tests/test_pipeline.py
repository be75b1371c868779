"""Pipeline parallel == serial: GPipe and 1F1B on 2 and 4 stages give the serial loss and
gradients; the schedules keep the activation memory they promise; bad splits raise."""

import pytest
import torch
import torch.distributed as dist

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
