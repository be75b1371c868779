"""``parallelize(model, layout)``: every dimension from one Layout equals the serial GPT in
float64 (losses and weights after SGD steps), and a plausible bug in each is caught."""

from __future__ import annotations

import pytest
import torch

from cai_labs import Layout, launch, parallelize
from cai_labs.data.char_corpus import load_char_corpus
from cai_labs.hybrid import lm_loss
from cai_labs.models import GPT, GPTConfig

CFG = GPTConfig(n_layers=4, d_model=32, n_heads=4, seq_len=16)
BATCH, STEPS, LR = 8, 3, 0.5
CORPUS = load_char_corpus(vocab_size=CFG.vocab_size)
TOL = 1e-10  # float64: parallel sums differ from serial ones by rounding only


def _float64(fn):
    def run(*args):
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            return fn(*args)
        finally:
            torch.set_default_dtype(old)

    return run


@_float64
def serial_run() -> tuple[list[float], dict[str, torch.Tensor]]:
    model = GPT(CFG, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        x, y = CORPUS.batch(step, BATCH, CFG.seq_len)
        opt.zero_grad()
        loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@_float64
def parallel_run(layout: Layout, bug: str | None = None) -> tuple[list[float], dict]:
    """Train STEPS SGD steps; return the losses and this rank's stage at full shape."""
    model = parallelize(GPT(CFG, seed=0), layout)
    if bug == "no sp gradient sum":
        model.grad_sum_groups = []
    if bug == "no dp average":
        model.dp_group = None
    opt = model.make_optimizer(torch.optim.SGD, lr=LR)
    losses = [
        model.train_step(*CORPUS.batch(step, BATCH, CFG.seq_len), opt, step=step)
        for step in range(STEPS)
    ]
    # ZeRO-3 holds shards only: gather the full weights (1/2 keep them full on every rank)
    state = model.zero.full_state_dict() if layout.zero == 3 else model.serial_state()
    return losses, state


def _assert_equal(got: tuple, ref: tuple) -> None:
    (losses, params), (ref_losses, ref_params) = got, ref
    assert losses == pytest.approx(ref_losses, abs=TOL, rel=0)
    assert params, "the rank holds parameters"
    for name, p in params.items():
        err = (p - ref_params[name]).abs().max().item()
        assert err < TOL, (name, err)


@pytest.mark.parametrize(
    "layout",
    [
        Layout(dp=2, pp=2, tp=2, tp_mode="1d", n_micro=2),
        Layout(dp=2, pp=2, tp=2, tp_mode="1d", n_micro=2, schedule="gpipe", vocab_parallel=False),
        Layout(pp=2, tp=4, tp_mode="2d", n_micro=2),
        Layout(dp=2, sp=2, sp_attention="ring"),
        Layout(pp=2, sp=2, sp_attention="all_to_all", n_micro=2),
        Layout(dp=2, sp=2, sp_attention="ring_flash"),
        Layout(sp=4, sp_attention="ring_flash"),
        Layout(dp=2, tp=2, zero=2),
        Layout(dp=2, pp=2, zero=1, n_micro=2),
        Layout(dp=2, zero=3),
    ],
    ids=lambda lay: lay.name + ("" if lay.vocab_parallel else " (replicated head)"),
)
def test_one_layout_equals_serial_in_float64(layout):
    assert layout.world_size in (2, 4, 8)
    _assert_equal(launch(parallel_run, layout.world_size, layout), serial_run())


@pytest.mark.parametrize(
    "layout, bug",
    [
        (Layout(dp=2, sp=2), "no sp gradient sum"),
        (Layout(dp=2, sp=2, sp_attention="ring_flash"), "no sp gradient sum"),
        (Layout(dp=2, pp=2, tp=2, n_micro=2), "no dp average"),
    ],
)
def test_a_missing_gradient_sum_is_caught(layout, bug):
    losses, _ = launch(parallel_run, layout.world_size, layout, bug)
    ref_losses, _ = serial_run()
    assert abs(losses[-1] - ref_losses[-1]) > 1e-4


def test_apply_order_is_fixed(monkeypatch):
    from cai_labs.hybrid import apply as mod

    calls = []
    for name in ("apply_tp", "apply_sp", "apply_pp", "apply_dp", "apply_zero"):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda m, _n=name, _r=real: calls.append(_n) or _r(m))
    mod.parallelize(GPT(CFG, seed=0), Layout())
    assert calls == ["apply_tp", "apply_sp", "apply_pp", "apply_dp"]


@pytest.mark.parametrize(
    "layout, message",
    [
        (Layout(tp=2, sp=2), "use one of them"),
        (Layout(zero=2), "needs dp > 1"),
        (Layout(dp=2, pp=2, zero=3), "ZeRO-3"),
        (Layout(sp=3), "does not split evenly over 3"),
        (Layout(sp=8, sp_attention="all_to_all"), "use sp dividing n_heads"),
        (Layout(sp=16, sp_attention="ring_flash"), "multiple of 2N = 32"),
        (Layout(zero=4), "unknown zero"),
        (Layout(tp=3, vocab_parallel=True), "not divisible by 3"),
    ],
)
def test_bad_layouts_say_what_to_change(layout, message):
    with pytest.raises(ValueError, match=message):
        layout.validate(CFG)
