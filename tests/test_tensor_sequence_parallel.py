"""Tensor + sequence parallelism (Megatron SP) equals the serial block; bytes and saved
activations equal their formulas; activations per rank are the serial block's / t."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from cai_labs import Ledger, launch
from cai_labs.comm import rank, reduce_from_group, size
from cai_labs.devices import device
from cai_labs.models.gpt import GPT, Block, GPTConfig
from cai_labs.tensor_parallel import make_grid
from cai_labs.tensor_parallel import sequence_parallel_1d as sp
from cai_labs.tensor_parallel.check import check_block, max_errors
from cai_labs.tensor_parallel.formulas import (
    block_activation_bytes,
    block_sent_bytes,
    layer_activation_bytes,
    sequence_parallel_block_activation_bytes,
    sequence_parallel_block_comm,
    sequence_parallel_block_cost,
)
from cai_labs.tensor_parallel.modes import TPMode

F64 = torch.float64
ELEM = 8  # float64
CFG = GPTConfig(d_model=16, n_heads=4, seq_len=8, mlp_ratio=4)
GPT_CFG = GPTConfig(vocab_size=64, seq_len=8, d_model=16, n_heads=4, n_layers=2)
BATCH = 2
#: Every output and gradient sums at most r*h = 64 products of O(1) terms (the weight
#: gradients b*s = 16): rounding is a few 64 * eps; 100x that leaves room for the order.
TOL = 100 * CFG.mlp_ratio * CFG.d_model * torch.finfo(F64).eps
BAD = 1e-3  # a break changes values by O(1)


def _sp_mode(regather: bool = True) -> TPMode:
    return TPMode(
        "1d+sp",
        sp,
        partial(sp.parallelize_block, regather=regather),
        sp.split_input,
        sp.gather_output,
        sp.gather_full,
    )


def _serial_saved_bytes() -> int:
    torch.manual_seed(0)
    block = Block(CFG).to(device())
    x = torch.randn(BATCH, CFG.seq_len, CFG.d_model, device=device(), requires_grad=True)
    with Ledger(model=block) as ledger:
        block(x).sum().backward()
    return ledger.report()["memory"]["peak_activations"]


def _errors(res: dict) -> dict:
    keep = ("out", "input_grad", "param_grads", "comm", "param_bytes", "peak_activation_bytes")
    return {k: res[k] for k in keep}


def _gpt_grad_errors(grid) -> float:
    """A 2-layer GPT with TP+SP blocks between replicated embeddings and head: entering the
    shards (split_input) and leaving them (gather_output) carry the gradients back whole."""
    gpt = GPT(GPT_CFG, seed=0).to(device())
    par = copy.deepcopy(gpt)
    blocks = [sp.parallelize_block(b, grid) for b in par.blocks]
    gen = torch.Generator().manual_seed(1)
    idx, tgt = (torch.randint(64, (BATCH, GPT_CFG.seq_len), generator=gen) for _ in range(2))
    idx, tgt = idx.to(device()), tgt.to(device())
    F.cross_entropy(gpt(idx).flatten(0, 1), tgt.flatten()).backward()
    x = par.tok_emb(idx) + par.pos_emb(torch.arange(GPT_CFG.seq_len, device=device()))
    x = sp.split_input(x, grid)
    for b in blocks:
        x = b(x)
    logits = par.head(par.ln_f(sp.gather_output(x, grid)))
    F.cross_entropy(logits.flatten(0, 1), tgt.flatten()).backward()
    got = {n: p.grad for n, p in par.named_parameters() if not n.startswith("blocks.")}
    for i, b in enumerate(blocks):
        got |= {f"blocks.{i}.{k}": v for k, v in b.serial_state(grads=True).items()}
    ref = {n: p.grad for n, p in gpt.named_parameters()}
    return max(max_errors(got, ref).values())


def _worker() -> dict:
    torch.set_default_dtype(F64)
    grid = make_grid("1d")
    out = {
        "gpt_grad_err": _gpt_grad_errors(grid),
        "sp": _errors(check_block(grid, CFG, BATCH, mode=_sp_mode())),
        "sp_saved_gathered": _errors(check_block(grid, CFG, BATCH, mode=_sp_mode(False))),
        "tp": _errors(check_block(grid, CFG, BATCH)),
        "serial_saved": _serial_saved_bytes(),
    }
    for bad in (torch.randn(BATCH, CFG.seq_len - 1, CFG.d_model), torch.randn(CFG.seq_len, 2)):
        try:
            sp.split_input(bad.to(device()), grid)
        except ValueError as e:
            out.setdefault("bad_input", []).append(str(e))
    return out


@pytest.fixture(scope="module", params=[2, 4])
def run(request) -> tuple[int, dict]:
    return request.param, launch(_worker, request.param)


def _assert_equal_to_serial(res: dict) -> None:
    assert res["out"] <= TOL, res["out"]
    assert res["input_grad"] <= TOL, res["input_grad"]
    names = {n for n, _ in Block(CFG).named_parameters()}
    assert set(res["param_grads"]) == names  # every parameter compared
    assert max(res["param_grads"].values()) <= TOL, res["param_grads"]


def test_tp_sp_block_equals_serial(run):
    """Output (shards gathered back), input gradient and every parameter gradient equal the
    serial Block's, with the shard saved (Megatron) or the gathered input saved."""
    _, out = run
    _assert_equal_to_serial(out["sp"])
    _assert_equal_to_serial(out["sp_saved_gathered"])
    assert out["gpt_grad_err"] <= TOL, out["gpt_grad_err"]


def test_ledger_bytes_equal_the_formula(run):
    t, out = run
    for key, regather in (("sp", True), ("sp_saved_gathered", False)):
        measured = out[key]["comm"]
        want = sequence_parallel_block_comm(
            t, BATCH, CFG.seq_len, CFG.d_model, regather=regather, elem=ELEM
        )
        assert set(measured) == set(want)
        for op, w in want.items():
            m = measured[op]
            assert (m["calls"], m["bytes"], m["modeled_sent_bytes"]) == (
                w["calls"],
                w["bytes"],
                w["ring_sent_bytes"],
            ), (op, m, w)
        sent = sum(m["modeled_sent_bytes"] for m in measured.values())
        kw = dict(sequence_parallel=True, regather=regather, elem=ELEM)
        assert sent == block_sent_bytes(t, BATCH, CFG.seq_len, CFG.d_model, **kw)
    tp = out["tp"]["comm"]
    assert tp["all_reduce"]["modeled_sent_bytes"] == block_sent_bytes(
        t, BATCH, CFG.seq_len, CFG.d_model, elem=ELEM
    )
    # Measured: SP's all-gathers + reduce-scatters of b*s*h move what TP's all-reduces move.
    sg = out["sp_saved_gathered"]["comm"]
    sp_big = sg["all_gather"]["modeled_sent_bytes"] + sg["reduce_scatter"]["modeled_sent_bytes"]
    assert sp_big == tp["all_reduce"]["modeled_sent_bytes"]
    cost = sequence_parallel_block_cost(
        t, BATCH, CFG.seq_len, CFG.d_model, CFG.n_heads, CFG.mlp_ratio, elem=ELEM
    )
    assert out["sp"]["param_bytes"] == cost.param_bytes == out["tp"]["param_bytes"]


def test_saved_activations_are_serial_over_t(run):
    """Measured saved bytes per rank: TP+SP == its formula == (serial + (t-1) masks) / t,
    below TP alone, whose layer-norm and linear inputs stay whole."""
    t, out = run
    s, h, sp_bytes = CFG.seq_len, CFG.d_model, out["sp"]["peak_activation_bytes"]
    args = (t, BATCH, s, h, CFG.n_heads, CFG.mlp_ratio)
    assert sp_bytes == sequence_parallel_block_activation_bytes(*args, elem=ELEM)
    mask = s * s  # the causal mask (bools), the one saved tensor the same on every rank
    assert t * sp_bytes == out["serial_saved"] + (t - 1) * mask
    tp_bytes = out["tp"]["peak_activation_bytes"]
    assert tp_bytes == block_activation_bytes("1d", *args, elem=ELEM)
    assert sp_bytes < tp_bytes
    # Korthikanti's model without dropout (34/t of sbh in 16 bits) plus what it leaves out:
    # the norms' mean and 1/std (4 per token, split by t) and the mask.
    paper = layer_activation_bytes(
        s, BATCH, h, CFG.n_heads, t, sequence_parallel=True, dropout=False, elem=ELEM
    )
    assert sp_bytes == paper + 4 * BATCH * s * ELEM // t + mask
    # Saving the gathered input costs (t-1)/t * b*s*h more per column linear, as predicted.
    gathered = out["sp_saved_gathered"]["peak_activation_bytes"]
    assert gathered == sequence_parallel_block_activation_bytes(*args, regather=False, elem=ELEM)
    assert gathered - sp_bytes == 2 * (t - 1) * BATCH * s * h * ELEM // t


def test_bad_sequence_length_is_refused(run):
    t, out = run
    assert len(out["bad_input"]) == 2
    assert f"divisible by {t}" in out["bad_input"][0]
    assert "expected activations (b, s, h)" in out["bad_input"][1]
    with pytest.raises(ValueError, match="choose s divisible by"):
        sequence_parallel_block_activation_bytes(t, BATCH, 7, 16, 4)
    with pytest.raises(ValueError, match="choose s divisible by"):
        sequence_parallel_block_comm(t, BATCH, 7, 16)


# -- breaks: each plausible bug must make the comparison with serial fail ----------------------
def _rs_wrong_shard(x, group, dim=0):
    """All-reduce, then keep the next rank's slice."""
    return reduce_from_group(x, group).chunk(size(group), dim)[(rank(group) + 1) % size(group)]


def _rs_by_slicing(x, group, dim=0):
    """All-reduce, then slice: forward right, but backward leaves other tokens' dY at zero."""
    return reduce_from_group(x, group).chunk(size(group), dim)[rank(group)]


BREAKS = {
    "replicated grads not all-reduced": ("copy_to_group", lambda x, group: x),
    "reduce-scatter keeps the wrong shard": ("reduce_scatter_group", _rs_wrong_shard),
    "reduce-scatter as all-reduce + slice": ("reduce_scatter_group", _rs_by_slicing),
}


def _broken_worker() -> dict:
    torch.set_default_dtype(F64)
    grid = make_grid("1d")
    out = {}
    for name, (attr, fake) in BREAKS.items():
        real = getattr(sp, attr)
        setattr(sp, attr, fake)
        try:
            out[name] = _errors(check_block(grid, CFG, BATCH, mode=_sp_mode()))
        finally:
            setattr(sp, attr, real)
    return out


def test_breaks_are_caught():
    out = launch(_broken_worker, 2)
    lost = out["replicated grads not all-reduced"]
    assert lost["out"] <= TOL and lost["input_grad"] <= TOL  # forward and dX still right...
    for name in ("ln1.weight", "ln2.bias", "attn.proj.bias", "mlp.fc2.bias"):
        assert lost["param_grads"][name] > BAD, name  # ...but these are one rank's share
    assert out["reduce-scatter keeps the wrong shard"]["out"] > BAD
    sliced = out["reduce-scatter as all-reduce + slice"]
    assert sliced["out"] <= TOL  # the forward is right
    assert sliced["param_grads"]["attn.proj.weight"] > BAD
