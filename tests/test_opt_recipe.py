"""The OPT recipe: checkpoints round-trip through save_pretrained/from_pretrained, batches are
well-formed, exact match scores what it should."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
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


class _Oracle(torch.nn.Module):
    """A "model" that greedily writes the right answer for ``right`` words and the right answer
    with its last token replaced for every other word: known scores for :func:`exact_match`."""

    def __init__(self, tok, task: ReverseTask, right: set[str]):
        super().__init__()
        self.vocab = len(tok)
        self.next: dict[tuple[int, ...], int] = {}
        for w in task.test_words:
            ids = [tok.bos_token_id] if tok.bos_token_id is not None else []
            ids += tok(task.prompt(w), add_special_tokens=False)["input_ids"]
            answer = tok(task.answer(w), add_special_tokens=False)["input_ids"]
            if w not in right:  # one wrong token, at the very end
                answer = answer[:-1] + [(answer[-1] + 1) % self.vocab]
            for k, t in enumerate(answer):
                self.next[tuple(ids + answer[:k])] = t

    def forward(self, input_ids: torch.Tensor):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b, row in enumerate(input_ids.tolist()):
            logits[b, -1, self.next[tuple(row)]] = 1.0
        return SimpleNamespace(logits=logits)


def _check_exact_match(score) -> None:
    """``score`` (``exact_match`` or a broken one) gives the known fractions of right answers."""
    tok = train_char_tokenizer("reverse abcdefgh => .")
    task = make_reverse_task(n_test=8)
    words = list(task.test_words)
    assert score(_Oracle(tok, task, set(words)), tok, task) == 1.0
    assert score(_Oracle(tok, task, set()), tok, task) == 0.0
    assert score(_Oracle(tok, task, set(words[::2])), tok, task) == 0.5
    three = set(words[:3])
    assert score(_Oracle(tok, task, three), tok, task) == 3 / 8
    assert score(_Oracle(tok, task, three), tok, task, words=words[:4]) == 3 / 4


def test_exact_match_scores_known_right_and_wrong_answers():
    _check_exact_match(exact_match)


# -- deliberate breaks: the checks above fail on a plausible bug ---------------------------------


def test_always_zero_exact_match_is_caught():
    with pytest.raises(AssertionError):
        _check_exact_match(lambda *a, **k: 0.0)


def test_exact_match_one_token_short_is_caught(monkeypatch):
    """An off-by-one in the number of generated tokens scores even a perfect model 0."""
    from cai_labs.recipes import opt_finetune

    real = opt_finetune.greedy_generate
    monkeypatch.setattr(opt_finetune, "greedy_generate", lambda m, ids, n: real(m, ids, n - 1))
    with pytest.raises(AssertionError):
        _check_exact_match(exact_match)
