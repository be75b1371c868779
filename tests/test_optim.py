"""LARS, LAMB and the schedules against their papers' equations, worked out in plain Python.

The expected numbers are computed here with ``math`` on lists, independently of torch and of
the optimizers under test; the first step of each is also checked against numbers worked by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from cai_labs import launch
from cai_labs.data_parallel import allreduce_gradients, shard_batch
from cai_labs.models.cnn1d import CNN1d
from cai_labs.optim import (
    LAMB,
    LARS,
    linear_scaled_lr,
    param_groups,
    sqrt_scaled_lr,
    warmup_cosine,
    warmup_cosine_factor,
)

W0 = [3.0, 4.0]  # ||w|| = 5
GRADS = [[0.6, 0.8], [-0.2, 0.5], [0.1, -0.3]]  # ||g1|| = 1


def norm(v):
    return math.sqrt(sum(x * x for x in v))


def run(opt_cls, grads, **kw) -> tuple[list[list[float]], list[float]]:
    """Step ``opt_cls`` on one tensor with fixed gradients; weights after each step, ratios."""
    w = nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    opt = opt_cls([w], **kw)
    out, ratios = [], []
    for g in grads:
        w.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        out.append(w.detach().tolist())
        ratios.append(opt.trust_ratios()["group0.0"])
    return out, ratios


def lars_reference(grads, lr, eta, wd, mom, lr_in_momentum=True):
    """You et al. 2017, Algorithm 1, on plain lists."""
    w, v, out, ratios = list(W0), [0.0, 0.0], [], []
    for step, g in enumerate(grads):
        lam = eta * norm(w) / (norm(g) + wd * norm(w))
        d = [gi + wd * wi for gi, wi in zip(g, w)]
        if lr_in_momentum:
            v = [mom * vi + lr * lam * di for vi, di in zip(v, d)]
            w = [wi - vi for wi, vi in zip(w, v)]
        else:  # buffer of raw d (first step: v = d), scaled when applied
            v = list(d) if step == 0 else [mom * vi + di for vi, di in zip(v, d)]
            w = [wi - lr * lam * vi for wi, vi in zip(w, v)]
        out.append(w)
        ratios.append(lam)
    return out, ratios


def lamb_reference(grads, lr, b1, b2, eps, wd, bias_correction=True):
    """You et al. 2019, Algorithm 2 (phi = identity), on plain lists."""
    w, m, v, out, ratios = list(W0), [0.0, 0.0], [0.0, 0.0], [], []
    for t, g in enumerate(grads, start=1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        c1, c2 = (1 - b1**t, 1 - b2**t) if bias_correction else (1.0, 1.0)
        r = [(mi / c1) / (math.sqrt(vi / c2) + eps) + wd * wi for mi, vi, wi in zip(m, v, w)]
        ratio = norm(w) / norm(r)
        w = [wi - lr * ratio * ri for wi, ri in zip(w, r)]
        out.append(w)
        ratios.append(ratio)
    return out, ratios


def test_lars_first_step_by_hand():
    # lambda = 0.01 * 5 / (1 + 0.1 * 5) = 1/30; d = g + 0.1 w = (0.9, 1.2)
    # w1 = w - 0.5 * (1/30) * d = (3 - 0.015, 4 - 0.02)
    out, ratios = run(
        LARS, GRADS[:1], lr=0.5, trust_coefficient=0.01, weight_decay=0.1, momentum=0.9
    )
    assert ratios[0] == pytest.approx(1 / 30, rel=1e-12)
    assert out[0] == pytest.approx([2.985, 3.98], rel=1e-12)


@pytest.mark.parametrize("lr_in_momentum", [True, False])
def test_lars_three_steps_match_the_paper(lr_in_momentum):
    kw = dict(lr=0.5, trust_coefficient=0.01, weight_decay=0.1, momentum=0.9)
    out, ratios = run(LARS, GRADS, lr_in_momentum=lr_in_momentum, **kw)
    ref, ref_ratios = lars_reference(GRADS, 0.5, 0.01, 0.1, 0.9, lr_in_momentum)
    for a, b in zip(out, ref):
        assert a == pytest.approx(b, rel=1e-12)
    assert ratios == pytest.approx(ref_ratios, rel=1e-12)


def test_lars_momentum_placement_matters_when_the_rate_changes():
    """The two conventions agree at constant rate, not under a schedule: a real difference."""
    kw = dict(trust_coefficient=0.01, weight_decay=0.1, momentum=0.9)
    w_a = nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    w_b = nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    a = LARS([w_a], lr=0.5, lr_in_momentum=True, **kw)
    b = LARS([w_b], lr=0.5, lr_in_momentum=False, **kw)
    for i, g in enumerate(GRADS[:2]):
        for opt, w in ((a, w_a), (b, w_b)):
            opt.param_groups[0]["lr"] = 0.5 * (i + 1)  # warm-up
            w.grad = torch.tensor(g, dtype=torch.float64)
            opt.step()
    assert (w_a - w_b).abs().max() > 1e-4


def test_lamb_first_step_by_hand():
    # Bias-corrected step 1: m_hat = g, v_hat = g^2, so r = g / (|g| + eps) + wd w
    # = (0.6/0.600001 + 0.03, 0.8/0.800001 + 0.04)
    r = [0.6 / (0.6 + 1e-6) + 0.03, 0.8 / (0.8 + 1e-6) + 0.04]
    ratio = 5 / math.sqrt(r[0] ** 2 + r[1] ** 2)
    out, ratios = run(LAMB, GRADS[:1], lr=0.1, weight_decay=0.01)
    assert ratios[0] == pytest.approx(ratio, rel=1e-12)
    assert out[0] == pytest.approx([3 - 0.1 * ratio * r[0], 4 - 0.1 * ratio * r[1]], rel=1e-12)


@pytest.mark.parametrize("bias_correction", [True, False])
def test_lamb_three_steps_match_the_paper(bias_correction):
    out, ratios = run(
        LAMB,
        GRADS,
        lr=0.1,
        weight_decay=0.01,
        betas=(0.9, 0.99),
        eps=1e-6,
        bias_correction=bias_correction,
    )
    ref, ref_ratios = lamb_reference(GRADS, 0.1, 0.9, 0.99, 1e-6, 0.01, bias_correction)
    for a, b in zip(out, ref):
        assert a == pytest.approx(b, rel=1e-12)
    assert ratios == pytest.approx(ref_ratios, rel=1e-12)


def test_zero_weight_gets_ratio_one():
    for cls, kw in ((LARS, {"lr": 0.1, "momentum": 0.0}), (LAMB, {"lr": 0.1})):
        w = nn.Parameter(torch.zeros(3))
        opt = cls([w], **kw)
        w.grad = torch.ones(3)
        opt.step()
        assert opt.trust_ratios()["group0.0"] == 1.0
        assert w.abs().sum() > 0  # it moved


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3)
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 2)
        self.ln = nn.LayerNorm(2)
        self.gn = nn.GroupNorm(1, 4)


def test_param_groups_exclude_biases_and_norms():
    groups = param_groups(_Net(), weight_decay=0.1)
    assert groups[0]["names"] == ["conv.weight", "fc.weight"]
    assert groups[0]["weight_decay"] == 0.1 and groups[0]["adapt"]
    assert sorted(groups[1]["names"]) == sorted(
        [
            "conv.bias",
            "bn.weight",
            "bn.bias",
            "fc.bias",
            "ln.weight",
            "ln.bias",
            "gn.weight",
            "gn.bias",
        ]
    )
    assert groups[1]["weight_decay"] == 0.0 and not groups[1]["adapt"]
    decay_only = param_groups(_Net(), 0.1, exclude_from_adaptation=False)
    assert decay_only[1]["weight_decay"] == 0.0 and decay_only[1]["adapt"]
    assert len(param_groups(_Net(), 0.1, False, False)) == 1
    own_lr = param_groups(_Net(), 0.1, excluded_lr=0.05)
    assert own_lr[1]["lr"] == 0.05 and "lr" not in own_lr[0]
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(_Net(), -1.0)


@pytest.mark.parametrize("cls", [LARS, LAMB])
def test_excluded_tensors_take_a_plain_step_without_decay(cls):
    net = _Net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    kw = {"momentum": 0.0} if cls is LARS else {"bias_correction": True}
    opt = cls(param_groups(net, weight_decay=0.5), lr=0.01, **kw)
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.25)
    opt.step()
    after = dict(net.named_parameters())
    for n in ("fc.bias", "bn.weight", "ln.bias"):
        # LARS: w - lr * g (no ratio, no decay). LAMB step 1: r = g/|g| = 1 (eps aside).
        step = 0.01 * 0.25 if cls is LARS else 0.01 * 0.25 / (0.25 + 1e-6)
        assert torch.allclose(after[n], before[n] - step, atol=1e-7), n
    ratios = opt.trust_ratios()
    assert set(ratios) == {"conv.weight", "fc.weight"}
    assert all(r != 1.0 for r in ratios.values())


def test_bad_hyperparameters_raise_value_errors():
    w = [nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="momentum"):
        LARS(w, lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="trust_coefficient"):
        LARS(w, lr=0.1, trust_coefficient=0)
    with pytest.raises(ValueError, match="betas"):
        LAMB(w, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="batch sizes"):
        linear_scaled_lr(0.1, 0, 256)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine_factor(0, 10, 11)


def test_schedules_match_their_formulas():
    assert linear_scaled_lr(0.1, 4096, 256) == pytest.approx(1.6)
    assert sqrt_scaled_lr(0.1, 4096, 256) == pytest.approx(0.4)
    total, warm, final = 10, 4, 0.1
    expected = [0.25, 0.5, 0.75, 1.0] + [
        final + (1 - final) * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)
    ]
    w = nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([w], lr=2.0)
    sched = warmup_cosine(opt, total, warm, final)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * f for f in expected])
    assert expected[4] == 1.0 and seen[-1] > 2.0 * final
    # The code (not the list above) reaches the peak right after warm-up and ends at the floor.
    assert warmup_cosine_factor(warm, total, warm, final) == 1.0 and seen[warm] == 2.0
    assert warmup_cosine_factor(total, total, warm, final) == pytest.approx(final, abs=1e-15)


# ---- data parallel: the large-batch step on N ranks equals the serial step -------------------

BATCH, STEPS = 64, 3


def _data():
    """float64: Adam-type steps divide by sqrt(v) and amplify float32 rounding of the
    all-reduce's summation order (~1e-5 after a few steps); in float64 a real error stands out."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * BATCH, 40, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 10, (STEPS * BATCH,), generator=g)


def _make(name: str, model: nn.Module):
    groups = param_groups(model, weight_decay=0.01)
    opt = LARS(groups, lr=2.0, momentum=0.9) if name == "lars" else LAMB(groups, lr=0.01)
    return opt, warmup_cosine(opt, STEPS, 1)


def _train(name: str, world: int, rank: int, sync: bool) -> list[torch.Tensor]:
    x, y = _data()
    model = CNN1d(seed=0).double()
    opt, sched = _make(name, model)
    for s in range(STEPS):
        xb, yb = x[s * BATCH : (s + 1) * BATCH], y[s * BATCH : (s + 1) * BATCH]
        xb, yb = shard_batch(xb, yb, rank=rank, world_size=world)
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        if sync:
            allreduce_gradients(model)
        opt.step()
        sched.step()
    return [p.detach().clone() for p in model.parameters()]


def _parallel(sync: bool) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for name in ("lars", "lamb"):
        params = _train(name, world, rank, sync)
        gathered = [None] * world
        dist.all_gather_object(gathered, params)
        out[name] = gathered
    return out


@pytest.mark.parametrize("n", [2, 4])
def test_data_parallel_large_batch_step_equals_serial(n):
    out = launch(_parallel, n, True)
    for name in ("lars", "lamb"):
        serial = _train(name, 1, 0, False)
        for rank_params in out[name]:
            for p, q in zip(rank_params, serial):
                assert torch.allclose(p, q, atol=1e-12, rtol=0), (name, (p - q).abs().max())


def test_skipping_the_gradient_average_is_caught():
    """Without the all-reduce each rank's norms and ratios come from its own slice: the check
    above must fail on it."""
    out = launch(_parallel, 2, False)
    for name in ("lars", "lamb"):
        serial = _train(name, 1, 0, False)
        worst = max((p - q).abs().max().item() for p, q in zip(out[name][0], serial))
        assert worst > 1e-3, name


# -- edges and defaults: what the published rules fix beyond the main path ----------------------
# (These also kill mutants in `nox -s mutants`: each pins a boundary, a default or a branch.)


def _w():
    return [nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))]


def test_validation_boundaries_and_messages():
    for kw in ({"lr": 0.0}, {"momentum": 0.0}, {"weight_decay": 0.0}, {"eps": 0.0}):
        LARS(_w(), **{"lr": 0.1, **kw})  # the boundary itself is allowed
    LARS(_w(), lr=0.1, max_trust_ratio=1.0)
    LAMB(_w(), lr=0.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0, max_trust_ratio=1.0)
    bad = [
        (LARS, {"lr": -0.1}, "lr must be >= 0"),
        (LARS, {"lr": 0.1, "momentum": 1.0}, "momentum must be in"),
        (LARS, {"lr": 0.1, "weight_decay": -0.1}, "weight_decay must be >= 0"),
        (LARS, {"lr": 0.1, "eps": -1e-9}, "eps must be >= 0"),
        (LARS, {"lr": 0.1, "max_trust_ratio": 0.0}, "max_trust_ratio must be > 0"),
        (LAMB, {"lr": -0.1}, "lr must be >= 0"),
        (LAMB, {"betas": (1.0, 0.5)}, "betas must both be in"),
        (LAMB, {"eps": -1e-9}, "eps must be >= 0"),
        (LAMB, {"weight_decay": -0.1}, "weight_decay must be >= 0"),
        (LAMB, {"max_trust_ratio": 0.0}, "max_trust_ratio must be > 0"),
    ]
    for cls, kw, message in bad:
        with pytest.raises(ValueError, match=message):
            cls(_w(), **kw)
    linear_scaled_lr(0.1, 1, 1)  # batch sizes of one are fine
    with pytest.raises(ValueError, match="batch sizes must be positive"):
        sqrt_scaled_lr(0.1, 256, 0)
    for args in ((0, 1, 0), (0, 5, 5), (0, 5, 2, 0.0), (0, 5, 2, 1.0)):
        warmup_cosine_factor(*args)
    for args, message in [
        ((0, 0, 0), "total_steps must be positive"),
        ((0, 5, 6), "warmup_steps must be between 0 and total_steps=5"),
        ((0, 5, -1), "warmup_steps must be between"),
        ((0, 5, 2, 1.5), "final_factor must be in"),
        ((0, 5, 2, -0.5), "final_factor must be in"),
    ]:
        with pytest.raises(ValueError, match=message):
            warmup_cosine_factor(*args)
    with pytest.raises(ValueError, match="warmup_steps must be between"):
        warmup_cosine(torch.optim.SGD(_w(), lr=1.0), 5, 6)
    with pytest.raises(ValueError, match="final_factor must be in"):
        warmup_cosine(torch.optim.SGD(_w(), lr=1.0), 5, 2, 2.0)


def test_published_defaults():
    """LARS (You et al. 2017): momentum 0.9, trust coefficient 0.001; LAMB (You et al. 2020):
    Adam's betas, eps 1e-6; neither decays unless asked."""
    lars = LARS(_w(), lr=0.1).defaults
    assert (lars["momentum"], lars["trust_coefficient"], lars["eps"]) == (0.9, 0.001, 0.0)
    assert (lars["weight_decay"], lars["max_trust_ratio"], lars["lr_in_momentum"]) == (0, None, 1)
    assert lars["adapt"] is True and lars["names"] is None
    lamb = LAMB(_w()).defaults
    assert (lamb["lr"], lamb["betas"], lamb["eps"], lamb["weight_decay"]) == (
        1e-3,
        (0.9, 0.999),
        1e-6,
        0.0,
    )
    assert lamb["bias_correction"] is True and lamb["max_trust_ratio"] is None
    assert lamb["adapt"] is True and lamb["names"] is None
    assert param_groups(_Net())[0]["weight_decay"] == 0.0
    assert warmup_cosine_factor(4, 4, 0) == 0.0  # decays to 0 unless a floor is given


def test_schedule_edges():
    assert warmup_cosine_factor(0, 5, 0) == 1.0  # no warm-up: the peak at once
    assert warmup_cosine_factor(0, 1, 0, 0.5) == 1.0
    assert warmup_cosine_factor(7, 5, 5, 0.25) == 0.25  # all warm-up, then the floor
    assert warmup_cosine_factor(9, 5, 1, 0.25) == 0.25  # past the end: stays at the floor
    # halfway through the decay: the mean of peak and floor
    assert warmup_cosine_factor(3, 5, 1, 0.2) == pytest.approx(0.6, abs=1e-15)
    opt = torch.optim.SGD(_w(), lr=2.0)
    sched = warmup_cosine(opt, 4, 2)
    assert opt.param_groups[0]["lr"] == 1.0  # step 0 of a 2-step warm-up: half the peak
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)  # no floor by default


def test_trust_ratio_edges():
    from cai_labs.optim.layerwise import trust_ratio

    t = torch.tensor
    assert trust_ratio(t(2.0), t(4.0)).item() == 0.5  # coefficient 1 by default
    assert trust_ratio(t(2.0), t(0.0)).item() == 1.0  # zero update: 1, not inf
    assert trust_ratio(t(0.0), t(3.0)).item() == 1.0  # zero weight: 1, not 0
    assert trust_ratio(t(8.0), t(1.0), 0.5, max_ratio=3.0).item() == 3.0
    assert trust_ratio(t(8.0), t(1.0), 0.5, max_ratio=5.0).item() == 4.0


def _one_step(opt_cls, grad, **kw):
    w = _w()
    opt = opt_cls(w, **kw)
    w[0].grad = torch.tensor(grad, dtype=torch.float64)
    opt.step()
    return w[0].detach(), opt


def test_lars_weight_decay_eps_and_clipping_by_hand():
    # ||w|| = 5, ||g|| = 1. Decay 1: ratio c*5/(1 + 5), step along g + w.
    w, opt = _one_step(LARS, [0.6, 0.8], lr=0.5, momentum=0.0, weight_decay=1.0)
    ratio = 0.001 * 5 / 6
    want = torch.tensor([3.0 - 0.5 * ratio * 3.6, 4.0 - 0.5 * ratio * 4.8], dtype=torch.float64)
    torch.testing.assert_close(w, want, rtol=1e-15, atol=0)
    _, opt = _one_step(LARS, [0.6, 0.8], lr=0.5, momentum=0.0, eps=0.5)
    assert opt.trust_ratios()["group0.0"] == pytest.approx(0.001 * 5 / 1.5, rel=1e-15)
    _, opt = _one_step(LARS, [0.6, 0.8], lr=0.5, trust_coefficient=1.0, max_trust_ratio=2.0)
    assert opt.trust_ratios()["group0.0"] == 2.0  # 5 clipped to 2


def test_lamb_weight_decay_and_clipping_by_hand():
    # Step 1 with bias correction and eps 0: r = g / |g| = (1, 1); decay 1 adds w: (4, 5).
    w, opt = _one_step(LAMB, [0.6, 0.8], lr=0.1, eps=0.0, weight_decay=1.0)
    ratio = 5 / math.sqrt(41)
    want = torch.tensor([3.0 - 0.1 * ratio * 4, 4.0 - 0.1 * ratio * 5], dtype=torch.float64)
    torch.testing.assert_close(w, want, rtol=1e-12, atol=0)
    _, opt = _one_step(LAMB, [0.6, 0.8], lr=0.1, eps=0.0, max_trust_ratio=2.0)
    assert opt.trust_ratios()["group0.0"] == 2.0  # 5 / sqrt(2) clipped to 2


def test_trust_ratios_skip_plain_groups_and_unstepped_tensors():
    a, b, c = (nn.Parameter(torch.ones(2)) for _ in range(3))
    opt = LARS([{"params": [a], "adapt": False}, {"params": [b, c]}], lr=0.1, momentum=0.0)
    a.grad, b.grad = torch.ones(2), torch.ones(2)  # c has no gradient: it never steps
    opt.step()
    assert set(opt.trust_ratios()) == {"group1.0"}


def test_param_groups_edges():
    from cai_labs.optim.param_groups import is_excluded

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(2))  # a parameter of the root module
            self.frozen = nn.Linear(2, 2)
            self.frozen.weight.requires_grad_(False)
            self.a = nn.Linear(2, 2, bias=False)
            self.b = nn.Linear(2, 2, bias=False)
            self.b.weight = self.a.weight  # tied: one tensor, one entry

    groups = param_groups(Tied(), weight_decay=0.1, exclude_from_decay=False)
    assert groups[0]["names"] == ["scale", "a.weight"]
    assert groups[1]["names"] == ["frozen.bias"] and groups[1]["weight_decay"] == 0.1
    param_groups(Tied(), weight_decay=0.0, excluded_lr=0.0)  # zero is allowed for both
    with pytest.raises(ValueError, match="excluded_lr must be >= 0 or None"):
        param_groups(Tied(), excluded_lr=-1.0)
    only_norms = param_groups(nn.LayerNorm(3), excluded_lr=0.05)
    assert len(only_norms) == 1 and only_norms[0]["lr"] == 0.05
    assert is_excluded(nn.Linear(2, 2), "fc.bias") and not is_excluded(nn.Linear(2, 2), "weight")
