"""Sequence x pipeline (x data) parallel BERT MLM equals the serial transformers model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from cai_labs import Ledger, launch, wire
from cai_labs.data.mlm import mlm_batch
from cai_labs.pipeline import StageLinks
from cai_labs.sequence_parallel import pipelined
from cai_labs.sequence_parallel.bert import tiny_bert_config
from cai_labs.sequence_parallel.groups import make_sequence_groups, sequence_layout
from cai_labs.sequence_parallel.pipelined import PipelinedSequenceBert, traffic_by_kind

VOCAB, SEQ, BATCH, LAYERS = 200, 32, 4, 4
STEPS, LR = 3, 1e-2


def _model():
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    cfg = tiny_bert_config(
        VOCAB, hidden=32, layers=LAYERS, heads=4, intermediate=64, max_positions=SEQ
    )
    return BertForMaskedLM(cfg).double()


def _batch(step: int):
    stream = torch.randint(5, VOCAB, (2000,), generator=torch.Generator().manual_seed(1))
    return mlm_batch(stream, BATCH, SEQ, step, vocab_size=VOCAB, mask_id=4)


def _serial_loss(model, b) -> torch.Tensor:
    return model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss


def _gather_named(pipe: PipelinedSequenceBert, what: str) -> list[dict[str, torch.Tensor]]:
    named = pipe.stage.named_model_parameters()
    mine = {n: (p.grad if what == "grad" else p).detach().clone() for n, p in named.items()}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def _step_worker(attention: str, schedule: str, swap_chunks: bool = False) -> dict:
    groups = make_sequence_groups(sp=2, dp=1, pp=2)
    pipe = PipelinedSequenceBert(
        _model(), groups, attention=attention, n_micro=2, schedule=schedule
    )
    if swap_chunks:  # broken: stage s sends its chunk to the *other* SP rank of stage s+1

        def other(r):
            return None if r is None else r ^ 1

        pipe.links = StageLinks(other(groups.prev_stage), other(groups.next_stage))
    with Ledger(track_activations=False) as ledger:
        loss = pipe.forward_backward(_batch(0))
        pipe.sum_gradients()
    traffic = [None] * dist.get_world_size()
    report = ledger.report()
    mine = {
        **traffic_by_kind(report, groups),
        "modeled": traffic_by_kind(report, groups, measured=False),
        "P": _stage_bytes(pipe),
    }
    dist.all_gather_object(traffic, mine)
    return {
        "loss": pipe.global_loss(loss),
        "grads": _gather_named(pipe, "grad"),
        "traffic": traffic,
    }


def _stage_bytes(pipe: PipelinedSequenceBert) -> int:
    return sum(p.numel() * p.element_size() for p in pipe.stage.parameters())


@pytest.mark.parametrize("attention,schedule", [("ring", "1f1b"), ("all_to_all", "gpipe")])
def test_sp2_x_pp2_step_equals_serial_loss_and_gradients(attention, schedule):
    model, b = _model(), _batch(0)
    loss = _serial_loss(model, b)
    loss.backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    got = launch(_step_worker, 4, attention, schedule, timeout=180)
    assert abs(got["loss"] - loss.item()) < 1e-12
    seen = set()
    for rank_grads in got["grads"]:  # every rank's stage, every parameter of it
        for name, g in rank_grads.items():
            assert torch.allclose(g, want[name], atol=1e-12, rtol=0), (
                name,
                (g - want[name]).abs().max(),
            )
            seen.add(name)
    assert seen == set(want), set(want) - seen  # the stages together hold the whole model
    act = BATCH * (SEQ // 2) * 32 * 8  # the whole batch's activation chunk, float64
    header = 8 * 8  # StageLinks' one-time shape header (8 int64) on each link
    pp = act + header  # stage 0: activations; stage 1: their gradients
    ring = 2 * (6 * act + BATCH * SEQ // 2)  # 6 (N-1) chunks per layer, 2 layers, + masks

    def on_wire(measured, payload, what):  # measured bytes = payload + whole gloo headers
        assert wire.gloo_headers(measured, payload) is not None, (what, measured, payload)

    for rank, t in enumerate(got["traffic"]):  # bytes measured on the wire
        # Attention's calls and the pipeline's isends may overlap; then they are one entry.
        attn = ring if attention == "ring" else t["modeled"]["SP attention"]
        if "PP p2p + SP attention" in t:
            on_wire(t["PP p2p + SP attention"], attn + pp, rank)
        else:
            on_wire(t["SP attention"], attn, rank)
            on_wire(t["PP p2p"], pp, rank)
        # dp = 1: the replica group is the SP group, one ring of 2: 2 (2-1)/2 P = P
        on_wire(t["grad all-reduce"], t["P"], rank)
        on_wire(t["tied embedding all-reduce"], VOCAB * 32 * 8, rank)


def test_wrong_stage_chunk_is_caught():
    model, b = _model(), _batch(0)
    serial = _serial_loss(model, b).item()
    got = launch(_step_worker, 4, "ring", "1f1b", True, timeout=180)
    assert abs(got["loss"] - serial) > 1e-3, "swapping the chunks between stages went unnoticed"


def _train_worker() -> dict:
    groups = make_sequence_groups(sp=2, dp=2, pp=2)
    out = {}
    for variant in ("replica", "sp_then_dp", "no DP sum"):
        if variant == "no DP sum":  # broken: the stage's sum stops at its SP group
            pipelined.allreduce_sum_gradients = _sp_only(groups)
        pipe = PipelinedSequenceBert(
            _model(),
            groups,
            n_micro=2,
            grad_sum="sp_then_dp" if variant == "sp_then_dp" else "replica",
        )
        opt = torch.optim.Adam(pipe.stage.parameters(), lr=LR)
        losses = []
        for s in range(STEPS):
            with Ledger(track_activations=False) as ledger:  # the last step's traffic stays
                losses.append(pipe.global_loss(pipe.train_step(_batch(s), opt, step=s)))
        traffic = [None] * dist.get_world_size()
        dist.all_gather_object(
            traffic, {**traffic_by_kind(ledger.report(), groups), "P": _stage_bytes(pipe)}
        )
        out[variant] = {
            "losses": losses,
            "params": _gather_named(pipe, "param"),
            "traffic": traffic,
        }
    return out


def _sp_only(groups):
    real = pipelined.allreduce_sum_gradients

    def reduce(module, group=None):
        real(module, group=groups.sp_group if group is groups.replica_group else group)

    return reduce


def test_sp2_x_dp2_x_pp2_trains_to_serial_losses_and_weights():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    losses = []
    for s in range(STEPS):
        opt.zero_grad()
        loss = _serial_loss(model, _batch(s))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    want = dict(model.named_parameters())
    got = launch(_train_worker, 8, timeout=300)
    for variant in ("replica", "sp_then_dp"):
        assert max(abs(a - b) for a, b in zip(got[variant]["losses"], losses)) < 1e-10, variant
        for rank_params in got[variant]["params"]:
            for name, p in rank_params.items():
                assert torch.allclose(p, want[name], atol=1e-10, rtol=0), (variant, name)
    for one, two in zip(got["replica"]["traffic"], got["sp_then_dp"]["traffic"]):
        p = one["P"]  # bytes measured on the wire, against each algorithm's payload
        one_ring = wire.gloo_headers(one["grad all-reduce"], round(2 * 3 / 4 * p))  # 4 ranks
        two_rings = wire.gloo_headers(two["grad all-reduce"], 2 * p)  # 2 * 2 (2-1)/2 P
        assert one_ring is not None and two_rings is not None, (one, two)
        assert one["grad all-reduce"] < two["grad all-reduce"]
        rest = [  # everything but the gradient sum is the same traffic in both variants
            sum(v for k, v in t.items() if k not in ("grad all-reduce", "P")) for t in (one, two)
        ]
        assert rest[0] == rest[1], (one, two)
    broken = got["no DP sum"]
    gap = max((p - want[n]).abs().max().item() for rp in broken["params"] for n, p in rp.items())
    assert gap > 1e-4, "training without the DP gradient sum went unnoticed"


def test_unknown_grad_sum_is_rejected():
    with pytest.raises(ValueError, match="unknown grad_sum 'dp_only'; choose one of"):
        PipelinedSequenceBert(_model(), None, grad_sum="dp_only")  # checked first


def test_world_size_must_factor():
    with pytest.raises(
        ValueError,
        match=r"SP x DP x PP needs world_size = sp\*dp\*pp = "
        r"2\*2\*2 = 8; got 6",
    ):
        sequence_layout(2, 2, 2, world_size=6)
    with pytest.raises(ValueError, match="SP x PP needs world_size"):
        sequence_layout(2, 1, 2, world_size=2)
    with pytest.raises(ValueError, match="pp must be a positive integer"):
        sequence_layout(2, 1, 0)
