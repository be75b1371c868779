"""Recipe: a tiny OPT base checkpoint, pre-trained offline, then fine-tuned to reverse words.

The checkpoint format is the Hugging Face one: a directory written by ``save_pretrained`` holding
``config.json``, ``model.safetensors`` and the tokenizer files. Everything that loads a model here
goes through ``from_pretrained``, so pointing ``base_dir`` at a real OPT directory (say a local
copy of facebook/opt-125m) runs the same fine-tuning on it.

Three steps, each a function:

* :func:`pretrain_base` — train a character tokenizer on standard-library docstrings
  (:mod:`cai_labs.data.stdlib_text`), build a tiny ``OPTForCausalLM``, pre-train it for a few
  hundred steps of next-character prediction, ``save_pretrained`` both;
* :func:`finetune` — load a checkpoint, train it on the reverse task
  (:mod:`cai_labs.data.reverse_task`) with the loss on the answer characters only;
* :func:`exact_match` — greedy generation on held-out words, scored character for character.

:func:`make_finetuned_checkpoint` chains them and returns the directory of the fine-tuned model:
that is what the serving tutorial loads.

Tensor shapes: ``input_ids`` and ``labels`` are ``(batch, seq)`` int64; labels are ``-100`` on
the positions whose prediction is not trained (the prompt), as transformers' loss expects.

Devices: models are loaded and built on :func:`cai_labs.device` and :func:`task_batch` makes its
tensors there (the rank's GPU inside a worker on a GPU node, else the CPU); training and
generation put their data where the model is.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, OPTForCausalLM, PreTrainedTokenizerBase

from cai_labs.data.reverse_task import ReverseTask, make_reverse_task
from cai_labs.data.stdlib_text import stdlib_text
from cai_labs.devices import device
from cai_labs.models.opt import tiny_opt, train_char_tokenizer

__all__ = [
    "PretrainConfig",
    "FinetuneConfig",
    "pretrain_base",
    "load_checkpoint",
    "task_batch",
    "finetune",
    "greedy_generate",
    "sample_words",
    "exact_match",
    "make_finetuned_checkpoint",
    "intra_op_threads",
]


@dataclass
class PretrainConfig:
    """Sizes and schedule of the base model's pre-training (defaults: a few seconds of CPU)."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    ffn_dim: int = 256
    max_position_embeddings: int = 64
    corpus_chars: int = 120_000
    steps: int = 150
    batch_size: int = 16
    seq_len: int = 48
    lr: float = 3e-3
    seed: int = 0
    threads: int | None = 1


@dataclass
class FinetuneConfig:
    """The fine-tuning run: task sizes and optimizer settings."""

    steps: int = 150
    batch_size: int = 32
    lr: float = 3e-3
    word_length: int = 4
    alphabet: str = "abcdefgh"
    n_test: int = 64
    seed: int = 0
    threads: int | None = 1
    extra: dict = field(default_factory=dict)

    def task(self) -> ReverseTask:
        return make_reverse_task(self.word_length, self.alphabet, self.n_test, self.seed)


@contextlib.contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` PyTorch intra-op threads, restoring the previous number after.

    Models this small run faster on one thread than on two that contend for shared cores
    (measured: about 9x less CPU time per step on the 2-core machine that builds the site).
    ``None`` leaves the setting alone.
    """
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def pretrain_base(out_dir: str | Path, config: PretrainConfig | None = None) -> Path:
    """Pre-train a tiny OPT on docstrings and ``save_pretrained`` it (model + tokenizer).

    Returns ``out_dir``. The task's characters are added to the vocabulary so that fine-tuning
    never meets an unknown token.
    """
    cfg = config or PretrainConfig()
    with intra_op_threads(cfg.threads):
        return _pretrain(Path(out_dir), cfg)


def _pretrain(out: Path, cfg: PretrainConfig) -> Path:
    text = stdlib_text(max_chars=cfg.corpus_chars)
    tokenizer = train_char_tokenizer(text, extra_chars="abcdefghijklmnopqrstuvwxyz =>.")
    model = tiny_opt(
        tokenizer,
        seed=cfg.seed,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        ffn_dim=cfg.ffn_dim,
        max_position_embeddings=cfg.max_position_embeddings,
    ).to(device())
    ids = torch.tensor(tokenizer.backend_tokenizer.encode(text).ids, dtype=torch.long)
    if len(ids) <= cfg.seq_len + 1:
        raise ValueError("the corpus is shorter than one training window; raise corpus_chars")
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    model.train()
    losses = []
    start = time.perf_counter()
    for _ in range(cfg.steps):
        starts = torch.randint(0, len(ids) - cfg.seq_len, (cfg.batch_size,), generator=gen)
        batch = torch.stack([ids[s : s + cfg.seq_len] for s in starts.tolist()]).to(device())
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "pretrain_log.json").write_text(
        json.dumps(
            {"config": asdict(cfg), "losses": losses, "seconds": time.perf_counter() - start}
        )
    )
    return out


def load_checkpoint(path: str | Path) -> tuple[OPTForCausalLM, PreTrainedTokenizerBase]:
    """``from_pretrained`` of model and tokenizer from one directory (no network); the model is
    on :func:`cai_labs.device`."""
    model = OPTForCausalLM.from_pretrained(path, local_files_only=True).to(device())
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def task_batch(
    tokenizer: PreTrainedTokenizerBase, task: ReverseTask, words: list[str] | tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` of shape ``(len(words), seq)``: BOS, prompt, answer, EOS, on
    :func:`cai_labs.device`.

    Labels are ``-100`` over BOS and the prompt, so only the answer and EOS are trained. With the
    character tokenizer every row has the same length; a subword tokenizer (a real OPT's) can
    give rows of different lengths, which are then right-padded with the pad token and label
    ``-100``: in a causal model no earlier position attends to a later pad, so no attention mask
    is needed and the loss is the same as without padding.
    """
    rows, labels = [], []
    for w in words:
        prompt = _bos(tokenizer) + tokenizer(task.prompt(w), add_special_tokens=False)["input_ids"]
        answer = tokenizer(task.answer(w), add_special_tokens=False)["input_ids"]
        answer = answer + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [r + [pad] * (width - len(r)) for r in rows]
    labels = [lab + [-100] * (width - len(lab)) for lab in labels]
    return torch.tensor(rows, device=device()), torch.tensor(labels, device=device())


def sample_words(task: ReverseTask, batch_size: int, step: int, seed: int = 0) -> list[str]:
    """The training words of ``step``: a seeded draw, identical on every rank."""
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    idx = torch.randint(0, len(task.train_words), (batch_size,), generator=gen)
    return [task.train_words[i] for i in idx.tolist()]


def finetune(
    model: OPTForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    config: FinetuneConfig | None = None,
) -> list[float]:
    """Fine-tune ``model`` in place on the reverse task (AdamW); returns the loss per step."""
    cfg = config or FinetuneConfig()
    with intra_op_threads(cfg.threads):
        return _finetune(model, tokenizer, cfg)


def _finetune(
    model: OPTForCausalLM, tokenizer: PreTrainedTokenizerBase, cfg: FinetuneConfig
) -> list[float]:
    task = cfg.task()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    model.train()
    here = next(model.parameters()).device
    losses = []
    for step in range(cfg.steps):
        x, y = task_batch(tokenizer, task, sample_words(task, cfg.batch_size, step, cfg.seed))
        x, y = x.to(here), y.to(here)
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def greedy_generate(
    model: OPTForCausalLM, input_ids: torch.Tensor, new_tokens: int
) -> torch.Tensor:
    """Append ``new_tokens`` argmax tokens to ``input_ids`` ``(b, s)`` -> ``(b, s + new_tokens)``.

    Plain recomputation each step (no key/value cache): short answers, simplest correct code.
    """
    ids = input_ids
    for _ in range(new_tokens):
        logits = model(input_ids=ids).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def exact_match(
    model: OPTForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    task: ReverseTask,
    words: list[str] | tuple[str, ...] | None = None,
) -> float:
    """Fraction of ``words`` (default: the task's test words) whose answer is generated exactly.

    Greedy generation of as many tokens as the answer has; the decoded text must equal the
    answer. Prompts are grouped by token length so that no padding is ever needed.
    """
    words = list(task.test_words if words is None else words)
    if not words:
        raise ValueError("exact_match needs at least one word")
    groups: dict[tuple[int, int], list[tuple[str, list[int]]]] = {}
    for w in words:
        ids = _bos(tokenizer) + tokenizer(task.prompt(w), add_special_tokens=False)["input_ids"]
        n_new = len(tokenizer(task.answer(w), add_special_tokens=False)["input_ids"])
        groups.setdefault((len(ids), n_new), []).append((w, ids))
    was_training = model.training
    model.eval()
    here = next(model.parameters()).device
    hits = 0
    for (length, n_new), items in groups.items():
        prompts = torch.tensor([ids for _, ids in items], device=here)
        out = greedy_generate(model, prompts, n_new)[:, length:]
        hits += sum(
            tokenizer.decode(row.tolist()) == task.answer(w) for row, (w, _) in zip(out, items)
        )
    model.train(was_training)
    return hits / len(words)


def make_finetuned_checkpoint(
    out_dir: str | Path,
    base_dir: str | Path | None = None,
    pretrain: PretrainConfig | None = None,
    config: FinetuneConfig | None = None,
) -> Path:
    """Produce a fine-tuned OPT checkpoint directory; returns it.

    If ``base_dir`` is None a base model is pre-trained into ``out_dir/base`` first. The
    fine-tuned model and its tokenizer are written to ``out_dir/finetuned`` with
    ``save_pretrained``; ``metrics.json`` next to them records exact-match accuracy before and
    after and the task's settings (a server can read them to build prompts the same way).
    """
    cfg = config or FinetuneConfig()
    out = Path(out_dir)
    if base_dir is None:
        base_dir = pretrain_base(out / "base", pretrain)
    model, tokenizer = load_checkpoint(base_dir)
    task = cfg.task()
    before = exact_match(model, tokenizer, task)
    losses = finetune(model, tokenizer, cfg)
    after = exact_match(model, tokenizer, task)
    target = out / "finetuned"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "metrics.json").write_text(
        json.dumps(
            {
                "exact_match_before": before,
                "exact_match_after": after,
                "final_loss": losses[-1],
                "task": {
                    "kind": "reverse",
                    "prompt": ReverseTask.prompt("{word}"),
                    "answer": ReverseTask.answer("abc").replace("cba", "{reversed}"),
                    "word_length": cfg.word_length,
                    "alphabet": cfg.alphabet,
                },
                "finetune": asdict(cfg),
            },
            indent=1,
        )
    )
    return target
