"""Sequence parallelism (ring and all-to-all attention, BERT MLM, SP x DP) equals serial."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from cai_labs import Ledger, RankFailed, comm_totals, launch, wire
from cai_labs.data.mlm import mlm_batch
from cai_labs.sequence_parallel import check_sequence_split, serial_attention, split_sequence
from cai_labs.sequence_parallel import ring_attention as ring_module  # patched by one test
from cai_labs.sequence_parallel.all_to_all_attention import all_to_all_attention
from cai_labs.sequence_parallel.bert import (
    allreduce_sum_gradients,
    sequence_parallel_mlm_loss,
    tiny_bert_config,
)
from cai_labs.sequence_parallel.groups import make_sp_dp_groups
from cai_labs.sequence_parallel.ring_attention import ring_attention

B, H, L, D = 2, 4, 16, 8
VOCAB, SEQ, BATCH = 300, 32, 4


def _attention_data():
    g = torch.Generator().manual_seed(0)
    q, k, v, d_out = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for _ in range(4))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 11:] = 0  # padding at the end of row 0 (spans two ranks' chunks for N=4)
    mask[1, 3:6] = 0  # and holes inside row 1
    return q, k, v, mask, d_out


def _serial_attention():
    q, k, v, mask, d_out = _attention_data()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = serial_attention(*leaves, mask)
    out.backward(d_out)
    return [out.detach()] + [t.grad for t in leaves]


def _attention_worker(kind: str, broken: bool = False) -> dict:
    rank, n = dist.get_rank(), dist.get_world_size()
    q, k, v, mask, d_out = _attention_data()
    if broken:  # a ring reduce that forgets the other ranks' shares of dK and dV
        ring_module.ring_reduce = lambda contribution, ring: contribution(ring.rank)
    local = [split_sequence(t, rank, n, dim=2).clone().requires_grad_() for t in (q, k, v)]
    fn = ring_attention if kind == "ring" else all_to_all_attention
    with Ledger(track_activations=False) as ledger:
        out = fn(*local, split_sequence(mask, rank, n, dim=1))
        out.backward(split_sequence(d_out, rank, n, dim=2))
    pieces = [None] * n
    dist.all_gather_object(pieces, [out.detach()] + [t.grad for t in local])
    full = [torch.cat([p[i] for p in pieces], dim=2) for i in range(4)]
    report = ledger.report()
    return {"full": full, "comm": comm_totals(report), "wire": report["wire"]}


def _assert_equals_serial(out: dict, reference: list) -> None:
    for name, got, want in zip(["out", "dq", "dk", "dv"], out["full"], reference):
        assert torch.allclose(got, want, atol=1e-12, rtol=0), (name, (got - want).abs().max())


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("kind", ["ring", "all_to_all"])
def test_attention_equals_serial_outputs_and_gradients(kind, n):
    reference = _serial_attention()
    out = launch(_attention_worker, n, kind, timeout=120)
    _assert_equals_serial(out, reference)
    chunk_bytes = B * H * (L // n) * D * 8
    comm = out["comm"]
    if kind == "ring":  # 6 (N-1) chunk transfers per rank: 2 forward, 4 backward
        assert comm["isend"]["bytes"] == 6 * (n - 1) * chunk_bytes
    else:  # 8 all-to-alls of one chunk-sized buffer per rank, (N-1)/N of it sent
        assert comm["all_to_all_single"]["calls"] == 8
        assert comm["all_to_all_single"]["bytes"] == 8 * chunk_bytes
    # measured on rank 0's sockets: each op's payload (sends whole; all-to-all (N-1)/N of its
    # buffer, like any masks' all-gather) plus whole gloo headers
    payload = sum(op["modeled_sent_bytes"] for op in comm.values())
    if out["wire"]["measured"]:  # what rank 0 put on the wire: the payload + gloo headers
        assert wire.gloo_headers(out["wire"]["sent"], payload) is not None, (out["wire"], payload)


def test_broken_ring_reduce_is_caught():
    reference = _serial_attention()
    out = launch(_attention_worker, 2, "ring", True, timeout=120)
    assert torch.allclose(out["full"][1], reference[1], atol=1e-12)  # dQ does not use the reduce
    assert not torch.allclose(out["full"][2], reference[2], atol=1e-3)  # dK does


def _heads_in_reverse_order(real):
    """``heads_to_seq`` that puts the received head groups back in reverse rank order."""

    def heads_to_seq(x, group):
        out = real(x, group)
        b, h, c, d = out.shape
        n = dist.get_world_size(group)
        return out.reshape(b, n, h // n, c, d).flip(1).reshape(b, h, c, d)

    return heads_to_seq


def test_all_to_all_with_head_groups_in_the_wrong_order_is_caught(monkeypatch):
    from cai_labs.sequence_parallel import all_to_all_attention as a2a

    monkeypatch.setattr(a2a, "heads_to_seq", _heads_in_reverse_order(a2a.heads_to_seq))
    out = launch(_attention_worker, 2, "all_to_all", timeout=120)
    with pytest.raises(AssertionError, match="out"):
        _assert_equals_serial(out, _serial_attention())


def test_indivisible_sequence_raises_clear_error():
    with pytest.raises(ValueError, match="does not split evenly over 4 sequence-parallel ranks"):
        check_sequence_split(30, 4)
    with pytest.raises(ValueError, match="pad the sequence to 32"):
        split_sequence(torch.zeros(2, 30), rank=0, world_size=4)


def _heads_not_divisible() -> None:
    q = torch.zeros(1, 3, 4, 2)
    all_to_all_attention(q, q, q)


def test_all_to_all_needs_heads_divisible():
    with pytest.raises(RankFailed, match="heads divisible by 2"):
        launch(_heads_not_divisible, 2, timeout=60)


def _model():
    from transformers import BertForMaskedLM

    torch.manual_seed(0)  # float64: the comparisons below hold on any CPU's kernels
    return BertForMaskedLM(tiny_bert_config(VOCAB, max_positions=64)).double()


def _batch(step: int):
    stream = torch.randint(5, VOCAB, (4000,), generator=torch.Generator().manual_seed(1))
    return mlm_batch(stream, BATCH, SEQ, step, vocab_size=VOCAB, mask_id=4)


def _bert_step_worker(kind: str) -> dict:
    rank, n = dist.get_rank(), dist.get_world_size()
    model, batch = _model(), _batch(0)
    parts = [
        split_sequence(t, rank, n) for t in (batch.input_ids, batch.attention_mask, batch.labels)
    ]
    loss = sequence_parallel_mlm_loss(model, *parts, attention=kind)
    loss.backward()
    allreduce_sum_gradients(model)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return {"loss": total.item(), "grads": [p.grad for p in model.parameters()]}


@pytest.mark.parametrize("kind", ["ring", "all_to_all"])
def test_bert_mlm_step_sp2_equals_transformers_serial(kind):
    model, batch = _model(), _batch(0)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    out.loss.backward()
    got = launch(_bert_step_worker, 2, kind, timeout=120)
    assert abs(got["loss"] - out.loss.item()) < 1e-10
    for g, p in zip(got["grads"], model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-10, rtol=0), (g - p.grad).abs().max()


STEPS, LR = 3, 1e-2


def _serial_training() -> list[torch.Tensor]:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for step in range(STEPS):
        b = _batch(step)
        opt.zero_grad()
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
        out.loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _sp_dp_worker(sp: int) -> list[torch.Tensor]:
    grid = make_sp_dp_groups(sp)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for step in range(STEPS):
        b = _batch(step)
        per_dp = BATCH // grid.dp_size
        rows = slice(grid.dp_rank * per_dp, (grid.dp_rank + 1) * per_dp)
        parts = [
            split_sequence(t[rows], grid.sp_rank, sp)
            for t in (b.input_ids, b.attention_mask, b.labels)
        ]
        opt.zero_grad()
        loss = sequence_parallel_mlm_loss(
            model, *parts, group=grid.sp_group, loss_group=dist.group.WORLD
        )
        loss.backward()
        allreduce_sum_gradients(model)  # over SP and DP: all 4 ranks
        opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, params)
    return every


def test_sp2_x_dp2_equals_serial_after_three_steps():
    serial = _serial_training()
    every = launch(_sp_dp_worker, 4, 2, timeout=180)
    for rank_params in every:
        for p, q in zip(rank_params, serial):
            assert torch.allclose(p, q, atol=1e-9, rtol=0), (p - q).abs().max()


def test_mlm_batch_masks_only_real_tokens_and_is_reproducible():
    a, b = _batch(3), _batch(3)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    targets = a.labels != -100
    assert targets.any(1).all()  # every row has a target
    assert not (targets & (a.attention_mask == 0)).any()  # never a padded position
    assert (a.input_ids[a.attention_mask == 0] == 0).all()  # padding is [PAD] = 0


def test_wordpiece_tokenizer_trains_offline():
    from cai_labs.data.stdlib_text import SPECIAL_TOKENS, token_stream, train_wordpiece

    texts = ["Return the sum of the values.", "Return a new list of the sorted values."] * 20
    tok = train_wordpiece(texts, vocab_size=60)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    rest = [w for w, _ in vocab[len(SPECIAL_TOKENS) :]]
    assert rest == sorted(rest)  # ids do not depend on the trainer's hash-map order
    ids = token_stream(tok, texts[:2])
    assert tok.decode(ids.tolist()).startswith("return the sum of the values")
