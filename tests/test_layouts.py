"""The unified model: every layout trains to the serial losses from the same weights, and
impossible layouts fail with a message saying what to change."""

import pytest
import torch
import torch.distributed as dist

from cai_labs import Ledger, RankFailed, launch
from cai_labs.data.char_corpus import load_char_corpus
from cai_labs.layout_costs import classify_comm, predicted_cost
from cai_labs.layouts import Layout
from cai_labs.models import GPT, GPTConfig
from cai_labs.unified import ParallelGPT, lm_loss

CFG = GPTConfig(n_layers=4, d_model=32, n_heads=4, seq_len=16)
BATCH, STEPS, LR = 8, 3, 3e-3
CORPUS = load_char_corpus(vocab_size=CFG.vocab_size)


def serial_losses() -> list[float]:
    model = GPT(CFG, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    out = []
    for step in range(STEPS):
        x, y = CORPUS.batch(step, BATCH, CFG.seq_len)
        opt.zero_grad()
        loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def train_worker(layout: Layout) -> tuple[list[float], list]:
    """Train STEPS steps; also return, per rank, the last step's measured bytes and the formula."""
    model = ParallelGPT(CFG, layout, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    with Ledger(model=model, track_activations=False) as ledger:
        for step in range(STEPS):
            start = len(ledger.comm)
            x, y = CORPUS.batch(step, BATCH, CFG.seq_len)
            losses.append(model.train_step(x, y, opt, ledger=ledger, step=step))
        measured = classify_comm(ledger.comm[start:], layout)
        measured["params"] = ledger.memory()["params"]
    pred = predicted_cost(CFG, layout, BATCH, dist.get_rank())
    formula = {
        "tp": pred.tp_bytes,
        "pp": pred.pp_bytes,
        "dp": pred.dp_bytes,
        "params": pred.param_bytes,
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (measured, formula))
    return losses, everyone


@pytest.mark.parametrize(
    "layout",
    [
        Layout(dp=2, pp=2, n_micro=2),
        Layout(dp=2, pp=2, tp=2, tp_mode="1d", n_micro=2),
        Layout(pp=2, tp=4, tp_mode="2d", n_micro=2, schedule="gpipe"),
    ],
    ids=lambda lay: lay.name,
)
def test_layout_losses_and_bytes_equal_serial_and_formula(layout):
    ref = serial_losses()
    got, per_rank = launch(train_worker, layout.world_size, layout)
    assert got == pytest.approx(ref, abs=1e-5)
    assert got[-1] < got[0]  # it learns
    _assert_bytes_match_formula(per_rank)
    assert any(m["tp"] for m, _ in per_rank) == (layout.tp > 1)


def test_formula_catches_a_wrong_count():
    # The check above can fail: the formula of another layout does not match the measurement.
    a = predicted_cost(CFG, Layout(pp=2, tp=4, tp_mode="2d", n_micro=2), BATCH, 0)
    b = predicted_cost(CFG, Layout(pp=2, tp=4, tp_mode="1d", n_micro=2), BATCH, 0)
    assert a != b


def _assert_bytes_match_formula(per_rank) -> None:
    for rank, (measured, formula) in enumerate(per_rank):
        assert measured == formula, f"rank {rank}: measured {measured} != formula {formula}"


def _double_reduce(real):
    """A data-parallel gradient average run twice per step (e.g. a hook and an explicit call)."""

    def reduce(module, group=None):
        real(module, group=group)
        real(module, group=group)

    return reduce


def _recvs_counted(real):
    """A classifier that counts the receiver's ``irecv`` as pipeline bytes too."""

    def classify(records, layout):
        out = real(records, layout)
        out["pp"] += sum(r["bytes"] for r in records if r["op"] in ("irecv", "recv"))
        return out

    return classify


@pytest.mark.parametrize(
    "target, name, wrap",
    [
        ("cai_labs.unified", "allreduce_gradients", _double_reduce),
        (__name__, "classify_comm", _recvs_counted),
    ],
    ids=["dp-all-reduce-twice", "classifier-counts-receives"],
)
def test_measured_bytes_check_catches_a_wrong_count(monkeypatch, target, name, wrap):
    """The bytes check of the test above fails on a run that communicates (or is counted) wrong:
    a measured DP x PP run, classified by ``classify_comm``, against the formula."""
    import importlib

    module = importlib.import_module(target)
    monkeypatch.setattr(module, name, wrap(getattr(module, name)))
    _, per_rank = launch(train_worker, 4, Layout(dp=2, pp=2, n_micro=2))
    with pytest.raises(AssertionError, match="measured"):
        _assert_bytes_match_formula(per_rank)


def broken_worker(layout: Layout) -> list[float]:
    """DP2 x PP2 with the gradient average switched off: replicas step on their half alone."""
    model = ParallelGPT(CFG, layout, seed=0)
    model.dp_group = None  # the bug
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    return [
        model.train_step(*CORPUS.batch(step, BATCH, CFG.seq_len), opt, step=step)
        for step in range(STEPS)
    ]


def test_missing_gradient_average_is_caught():
    got = launch(broken_worker, 4, Layout(dp=2, pp=2, n_micro=2))
    assert abs(got[-1] - serial_losses()[-1]) > 1e-4


@pytest.mark.parametrize(
    "layout, batch, message",
    [
        (Layout(pp=5), None, "pp=5 pipeline stages need at least 5 transformer blocks"),
        (Layout(tp=6, tp_mode="2d"), None, "2D tensor parallelism needs a square world size"),
        (Layout(tp=4, tp_mode="3d"), None, "3D tensor parallelism needs a cube"),
        (Layout(tp=4, tp_mode="4d"), None, "unknown tp_mode"),
        (Layout(schedule="zigzag"), None, "unknown schedule"),
        (Layout(dp=3), 8, "does not split over dp=3"),
        (Layout(dp=2, pp=2, n_micro=3), 8, "do not split into n_micro=3"),
        (Layout(dp=0), None, "dp must be a positive integer"),
    ],
)
def test_bad_layouts_raise(layout, batch, message):
    with pytest.raises(ValueError, match=message):
        layout.validate(CFG, batch_size=batch)


def test_wrong_world_size_raises_on_the_ranks():
    with pytest.raises(RankFailed, match="needs dp\\*pp\\*tp = 4 ranks; this run has 2"):
        launch(ParallelGPT, 2, CFG, Layout(dp=2, pp=2, n_micro=2))


def test_layout_coordinates():
    lay = Layout(dp=2, pp=2, tp=2)
    assert [lay.coords(r) for r in range(8)][:4] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert lay.tp_rank_lists() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.dp_rank_lists() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay.name == "DP2 x PP2 x TP2-1D"


def test_corpus_is_deterministic_and_learnable():
    assert CORPUS.vocab_size == CFG.vocab_size
    assert CORPUS.unigram_entropy < torch.log(torch.tensor(float(CFG.vocab_size))).item()
    x, y = CORPUS.batch(5, 4, CFG.seq_len)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x, CORPUS.batch(5, 4, CFG.seq_len)[0])
