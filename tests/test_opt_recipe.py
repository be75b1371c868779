"""The OPT recipe: checkpoints round-trip through save_pretrained/from_pretrained, batches are
well-formed, exact match scores what it should."""

from __future__ import annotations

import torch

from cai_labs.data.reverse_task import ReverseTask, make_reverse_task
from cai_labs.models.opt import tiny_opt, train_char_tokenizer
from cai_labs.recipes.opt_finetune import exact_match, load_checkpoint, task_batch

SIZES = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    ffn_dim=64,
    max_position_embeddings=32,
)


def test_checkpoint_round_trip(tmp_path):
    tok = train_char_tokenizer("reverse abcdefgh => .")
    model = tiny_opt(tok, **SIZES)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_checkpoint(tmp_path)
    for (n, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), n
    assert tok2("abc")["input_ids"] == tok("abc")["input_ids"]
    assert tok2.decode(tok("reverse ab =>")["input_ids"]) == "reverse ab =>"


def test_task_batch_labels_only_the_answer_and_pads_uneven_rows():
    tok = train_char_tokenizer("reverse abcdefgh => .")
    task = ReverseTask(("ab", "abcd"), ("ba",))
    x, y = task_batch(tok, task, ["ab", "abcd"])
    assert x.shape == y.shape and x.shape[0] == 2
    answer = tok.decode([t for t in y[0].tolist() if t != -100])
    assert answer == " ba." + tok.eos_token or answer == " ba."
    assert (y[0] != -100).sum() == len(" ba.") + 1  # answer characters and EOS
    assert x[0, -1].item() == tok.pad_token_id and y[0, -1].item() == -100


def test_exact_match_is_zero_for_a_fresh_model():
    tok = train_char_tokenizer("reverse abcdefgh => .")
    task = make_reverse_task(n_test=8)
    assert exact_match(tiny_opt(tok, **SIZES), tok, task) == 0.0
