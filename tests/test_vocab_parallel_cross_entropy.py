"""Vocabulary-parallel cross-entropy equals F.cross_entropy on the gathered logits, sends 3
all-reduces of b*s elements, and a version missing one of them is caught."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cai_labs import Ledger, launch
from cai_labs.tensor_parallel import cross_entropy as CE
from cai_labs.tensor_parallel.formulas import vocab_loss_cost

B, S, V, IGNORE = 3, 8, 64, -100
TOL = 1e-12


def _problem(n: int, ignore_index: int = IGNORE) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logits (B, S, V) and targets that hit every rank's slice, plus ignored ones."""
    gen = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(B, S, V, generator=gen, dtype=torch.float64)
    targets = torch.randint(V, (B, S), generator=gen)
    per = V // n
    targets[0, :n] = torch.arange(n) * per + per - 1  # the last id of each rank's slice
    targets[1, :n] = torch.arange(n) * per  # the first id of each slice
    targets[2, 0] = targets[2, 5] = ignore_index
    return logits, targets


def _worker(skip: int | None = None, ignore_index: int = IGNORE) -> dict:
    """On every rank: compare with PyTorch for each reduction; ``skip`` = index (0 max, 1 target
    logit, 2 sum-exp) of an all-reduce to leave out, to show the test catches it."""
    if skip is not None:
        real, calls = CE.all_reduce_, [0]

        def broken(x, group, op=dist.ReduceOp.SUM):
            calls[0] += 1
            if (calls[0] - 1) % 3 != skip:
                real(x, group, op)

        CE.all_reduce_ = broken
    group, n, r = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    logits, targets = _problem(n, ignore_index)
    out = {
        "targets_on_rank": sorted(
            {int(t) // (V // n) for t in targets.flatten() if t != ignore_index}
        )
    }
    for reduction in ("mean", "sum", "none"):
        full = logits.clone().requires_grad_()
        ref = F.cross_entropy(
            full.flatten(0, 1), targets.flatten(), reduction=reduction, ignore_index=ignore_index
        )
        w = torch.linspace(0.5, 2.0, ref.numel(), dtype=torch.float64).reshape(ref.shape)
        (ref * w).sum().backward()
        local = logits.chunk(n, dim=-1)[r].clone().requires_grad_()
        with Ledger() as ledger:
            loss = CE.vocab_parallel_cross_entropy(
                local, targets, group, ignore_index, reduction, vocab_size=V
            )
            loss.backward(w.reshape(loss.shape))  # d sum(loss * w): no extra op measured
        report = ledger.report()
        out[reduction] = {
            "loss": (loss.flatten() - ref.detach()).abs().max().item(),
            "grad": (local.grad - full.grad.chunk(n, dim=-1)[r]).abs().max().item(),
            "comm": [(c["op"], c["bytes"]) for c in report["comm"]],
            "saved": report["memory"]["peak_activations"],
            "ignored_grad": local.grad[targets == ignore_index].abs().max().item(),
        }
    return out


@pytest.mark.parametrize("n", [2, 4])
def test_equals_cross_entropy_of_gathered_logits(n):
    out = launch(_worker, n)
    assert out["targets_on_rank"] == list(range(n))  # every shard holds some target
    for reduction in ("mean", "sum", "none"):
        res = out[reduction]
        assert res["loss"] < TOL and res["grad"] < TOL, (reduction, res)
        assert res["ignored_grad"] == 0.0
        cost = vocab_loss_cost(n, B * S, V, parallel=True, elem=8)
        assert res["comm"] == [("all_reduce", B * S * 8)] * 3  # 3 all-reduces of b*s float64
        assert sum(b for _, b in res["comm"]) == cost.comm_bytes
        if reduction != "mean":  # "mean" also saves its int64 divisor
            assert res["saved"] == cost.activation_bytes, reduction


def test_ignore_index_inside_the_vocabulary():
    """An ignore_index that is also a real id (0) is ignored, not looked up."""
    out = launch(_worker, 2, None, 0)
    assert out["mean"]["loss"] < TOL and out["mean"]["grad"] < TOL


@pytest.mark.parametrize("skip,what", [(0, "max"), (1, "target logit"), (2, "sum of exp")])
def test_missing_all_reduce_is_caught(skip, what):
    out = launch(_worker, 2, skip)
    assert out["mean"]["loss"] > 1e-3 or out["mean"]["grad"] > 1e-3, what


def _bad_inputs() -> dict:
    group, n = dist.group.WORLD, dist.get_world_size()
    local = torch.zeros(2, 4, 8)
    t = torch.zeros(2, 4, dtype=torch.long)
    cases = {
        "uneven": lambda: CE.vocab_parallel_cross_entropy(local, t, group, vocab_size=17),
        "wrong slice": lambda: CE.vocab_parallel_cross_entropy(local, t, group, vocab_size=32),
        "shape": lambda: CE.vocab_parallel_cross_entropy(local, t[:, :3], group),
        "range": lambda: CE.vocab_parallel_cross_entropy(local, t + 8 * n, group),
        "dtype": lambda: CE.vocab_parallel_cross_entropy(local, t.float(), group),
        "reduction": lambda: CE.vocab_parallel_cross_entropy(local, t, group, reduction="avg"),
    }
    msgs = {}
    for name, call in cases.items():
        try:
            call()
            msgs[name] = None
        except ValueError as e:
            msgs[name] = str(e)
    return msgs


def test_bad_sizes_raise_clearly():
    msgs = launch(_bad_inputs, 2)
    assert all(msgs.values()), msgs
    assert "vocabulary=17 is not divisible by 2" in msgs["uneven"]
    assert "needs 16" in msgs["wrong slice"]
    assert "do not match" in msgs["shape"]
    assert "outside the vocabulary [0, 16)" in msgs["range"]
    assert "int64" in msgs["dtype"]
    assert "reduction" in msgs["reduction"]
    with pytest.raises(ValueError, match="does not split"):
        vocab_loss_cost(3, 10, 64)


def test_gather_then_cross_entropy_formula():
    """The formula of the baseline (all-gather, then F.cross_entropy) is what the ledger sees."""

    def work() -> dict:
        from cai_labs.comm import gather_from_group

        n, r = dist.get_world_size(), dist.get_rank()
        logits, targets = _problem(n)
        local = logits.float().chunk(n, dim=-1)[r].clone().requires_grad_()
        with Ledger() as ledger:
            full = gather_from_group(local, dist.group.WORLD, -1)
            F.cross_entropy(full.flatten(0, 1), targets.flatten()).backward()
        rep = ledger.report()
        return {
            "comm": sum(c["bytes"] for c in rep["comm"]),
            "saved": rep["memory"]["peak_activations"],
        }

    out = launch(work, 2)
    cost = vocab_loss_cost(2, B * S, V, parallel=False)
    assert (out["comm"], out["saved"]) == (cost.comm_bytes, cost.activation_bytes)


def test_parallel_gpt_1d_never_gathers_the_logits():
    """The whole 1D model's loss: equal to serial, and its traffic is the embedding's and the
    blocks' all-reduces of (b, s, d), the head's dX all-reduce and the loss's 3 of (b, s)."""
    from cai_labs import Layout, parallelize
    from cai_labs.models.gpt import GPT, GPTConfig
    from cai_labs.tensor_parallel.formulas import block_cost

    cfg = GPTConfig(vocab_size=V, seq_len=S, d_model=16, n_heads=4, n_layers=2)

    def work() -> dict:
        gen = torch.Generator().manual_seed(1)
        idx, tgt = (torch.randint(V, (B, S), generator=gen) for _ in range(2))
        serial = GPT(cfg, seed=0)
        par = parallelize(copy.deepcopy(serial), Layout(tp=dist.get_world_size()))
        ref = F.cross_entropy(serial(idx).flatten(0, 1), tgt.flatten())
        with Ledger() as ledger:
            loss = par.loss(idx, tgt)
            loss.backward()
        comm = ledger.report()["comm"]
        return {
            "err": abs(loss.item() - ref.item()),
            "ops": sorted({c["op"] for c in comm}),
            "bytes": sum(c["bytes"] for c in comm),
            "logits": tuple(par.head_logits(idx).shape),
            "forward": tuple(par(idx).shape),
        }

    n = 2
    out = launch(work, n)
    M = B * S
    blocks = cfg.n_layers * block_cost("1d", n, B, S, cfg.d_model).comm_bytes
    expected = 4 * M * cfg.d_model * 2 + blocks + vocab_loss_cost(n, M, V).comm_bytes
    assert out["err"] < 1e-5
    assert out["ops"] == ["all_reduce"]  # no all_gather of (b, s, V)
    assert out["bytes"] == expected  # embedding + head dX + blocks + 3 * b*s
    assert out["logits"] == (B, S, V // n) and out["forward"] == (B, S, V)
