"""1D tensor parallelism of Hugging Face OPT equals the serial model, and costs what the formula
says; a row-parallel layer without its all-reduce is caught; bad sizes fail clearly."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from cai_labs import Ledger, RankFailed, comm_totals, launch
from cai_labs.ledger import tensor_bytes
from cai_labs.models.opt import tiny_opt, tiny_opt_config, train_char_tokenizer
from cai_labs.tensor_parallel import make_grid
from cai_labs.tensor_parallel.formulas import opt_1d_cost
from cai_labs.tensor_parallel.opt_1d import check_opt_tp_size, opt_full_state, parallelize_opt

SIZES = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    ffn_dim=64,
    max_position_embeddings=32,
)
BATCH, SEQ, STEPS, TOL = 4, 12, 3, 1e-10  # float64


@functools.lru_cache(maxsize=1)
def _tok():
    return train_char_tokenizer("reverse abcdefgh => . the quick brown fox jumps")


def _batch(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    return torch.randint(3, len(_tok()), (BATCH, SEQ), generator=gen)


def _max_err(a: dict, b: dict) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _worker(broken: bool = False) -> dict:
    if broken:  # row-parallel layers forget to sum their partial products
        from cai_labs.tensor_parallel import layers_1d

        layers_1d.reduce_from_group = lambda x, group: x
    serial = tiny_opt(_tok(), seed=0, **SIZES).double().train()
    grid = make_grid("1d")
    par = parallelize_opt(copy.deepcopy(serial), grid)
    opt_s = torch.optim.AdamW(serial.parameters(), lr=1e-2)
    opt_p = torch.optim.AdamW(par.parameters(), lr=1e-2)
    out = {"loss_err": [], "param_bytes": tensor_bytes(list(par.parameters()))}
    for step in range(STEPS):
        x = _batch(step)
        res_s = serial(input_ids=x, labels=x)
        res_s.loss.backward()
        with Ledger() as ledger:
            res_p = par(input_ids=x, labels=x)
            res_p.loss.backward()
        out["loss_err"].append(abs(res_s.loss.item() - res_p.loss.item()))
        if step == 0:
            out["logits_err"] = (res_s.logits - res_p.logits).abs().max().item()
            ref = {n: p.grad for n, p in serial.named_parameters()}
            out["grad_err"] = _max_err(opt_full_state(par, grads=True), ref)
            out["comm"] = comm_totals(ledger.report())
        opt_s.step()
        opt_p.step()
        opt_s.zero_grad()
        opt_p.zero_grad()
    ref = {n: p.detach() for n, p in serial.named_parameters()}
    out["param_err"] = _max_err(opt_full_state(par), ref)
    if not broken:
        serial.eval()
        par.eval()
        # A padding mask (left padding), with the SDPA and the eager attention masks of HF.
        x = _batch(7)
        mask = torch.ones_like(x)
        mask[0, :3] = 0
        out["masked_err"] = []
        for impl in ("sdpa", "eager"):
            serial.config._attn_implementation = par.config._attn_implementation = impl
            with torch.no_grad():
                a = serial(input_ids=x, attention_mask=mask).logits
                b = par(input_ids=x, attention_mask=mask).logits
            out["masked_err"].append((a - b)[mask.bool()].abs().max().item())
        serial.config._attn_implementation = par.config._attn_implementation = "sdpa"
        # Generation with the key/value cache, on the trained weights.
        prompt = _batch(99)[:2, :5]
        kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        out["generate_equal"] = torch.equal(
            serial.generate(prompt, **kw), par.generate(prompt, **kw)
        )
    return out


@pytest.mark.parametrize("n", [2, 4])
def test_opt_1d_equals_serial_and_formula(n):
    out = launch(_worker, n)
    assert out["logits_err"] < TOL and max(out["loss_err"]) < TOL, out
    assert out["grad_err"] < TOL, out["grad_err"]  # every parameter, shards gathered
    assert out["param_err"] < TOL, out["param_err"]  # after 3 AdamW steps
    assert out["generate_equal"]
    assert max(out["masked_err"]) < 1e-8, out["masked_err"]
    config = tiny_opt_config(_tok(), **SIZES)
    cost = opt_1d_cost(config, n, BATCH * SEQ, elem=8)
    assert out["comm"]["all_reduce"]["bytes"] == cost.comm_bytes
    assert out["comm"]["all_reduce"]["calls"] == cost.comm_calls == 4 * SIZES["num_hidden_layers"]
    assert set(out["comm"]) == {"all_reduce"}
    assert out["param_bytes"] == cost.param_bytes


def test_formula_with_one_rank_is_the_serial_model():
    serial = tiny_opt(_tok(), **SIZES)
    cost = opt_1d_cost(serial.config, 1, BATCH * SEQ)
    assert cost.param_bytes == tensor_bytes(list(serial.parameters()))
    assert cost.comm_bytes == 0


def test_row_parallel_without_all_reduce_is_caught():
    out = launch(_worker, 2, True)
    assert out["logits_err"] > 1e-3 and out["grad_err"] > 1e-3


def test_bad_tensor_parallel_size():
    config = tiny_opt_config(_tok(), **SIZES)
    with pytest.raises(
        ValueError,
        match=r"OPT has 4 attention heads; tensor-parallel size 3 "
        r"does not divide them: use 1, 2 or 4",
    ):
        check_opt_tp_size(config, 3)
    odd = tiny_opt_config(_tok(), **{**SIZES, "ffn_dim": 66})
    with pytest.raises(ValueError, match=r"ffn_dim=66; tensor-parallel size 4 .* use 1 or 2"):
        check_opt_tp_size(odd, 4)

    def bad_worker():
        parallelize_opt(tiny_opt(_tok(), **SIZES), make_grid("1d"))

    with pytest.raises(RankFailed, match="does not divide them"):
        launch(bad_worker, 3)
