"""The model side of the server: load a checkpoint directory, decode a batch of requests at once.

One call of :meth:`GenerationEngine.generate_batch` runs one Hugging Face ``generate`` over all
the requests the batcher gathered. Prompts of different lengths are **left** padded, because a
causal model continues the *last* position of each row: with right padding the pad tokens
would sit between a short prompt and its continuation. The attention mask hides the pads, and
OPT derives its position ids from that mask, so a padded row computes the same logits as the
same prompt alone (up to float rounding; ``tests/test_serving.py`` checks the text is equal).

Shapes: ``input_ids`` and ``attention_mask`` are ``(b, s)`` with ``s`` the longest prompt;
logits at each decoding step are ``(b, vocab)``.

Requests in one batch may ask for different settings (greedy or sampled, temperature, top-k,
seed, length). ``generate`` has one setting for the whole batch, so it runs greedy and a logits
processor (:class:`RowSampler`) chooses each row's token itself, with that row's settings and
its own seeded ``torch.Generator``, then hands ``generate`` a score row where only the chosen
token is finite. A row that reached its own ``max_new_tokens`` is handed the end-of-text token,
which makes ``generate`` stop it. The same processor reports each new token as it is chosen,
which is what the streaming endpoint sends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cai_labs.serving.sampling import TokenSampler

if TYPE_CHECKING:  # transformers is imported when a model is loaded, not with this module
    from transformers import Cache, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["GenerationJob", "Completion", "RowSampler", "GenerationEngine"]


@dataclass
class GenerationJob:
    """One request, tokenized. ``on_token(token_id, text_so_far)`` is called from the decoding
    thread for every new token (streaming), if given."""

    prompt_ids: list[int]
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    seed: int | None = None
    on_token: Callable[[int, str], None] | None = None
    ignore_eos: bool = False
    top_p: float | None = None
    stop: tuple[str, ...] = ()

    def sampler(self, eos_id: int) -> TokenSampler:
        """This job's own :class:`~cai_labs.serving.sampling.TokenSampler`."""
        banned = eos_id if self.ignore_eos else None
        return TokenSampler(self.temperature, self.top_k, self.top_p, self.seed, banned)


@dataclass
class Completion:
    """What one job produced: new token ids (end-of-text excluded) and their text."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "length", "eos" or "stop" (a stop string was generated)
    batch_size: int = 1
    generate_s: float = 0.0
    extra: dict = field(default_factory=dict)


class RowSampler:
    """A ``generate`` logits processor that picks every row's next token with that row's own
    settings (see the module docstring). Call signature: ``(input_ids (b, t), scores (b, V))
    -> scores (b, V)`` with ``0`` at the chosen token and ``-inf`` elsewhere."""

    def __init__(self, jobs: list[GenerationJob], eos_id: int, decode: Callable[[list[int]], str]):
        self.jobs = jobs
        self.eos_id = eos_id
        self.decode = decode
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.reasons: list[str | None] = [None] * len(jobs)
        self.samplers = [job.sampler(eos_id) for job in jobs]

    def _pick(self, i: int, row: torch.Tensor) -> int:
        return self.samplers[i](row.cpu())  # each request's generator lives on the host

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = torch.full((len(self.jobs),), self.eos_id, dtype=torch.long)
        for i, job in enumerate(self.jobs):
            if self.reasons[i] is not None:
                continue  # finished: generate pads this row anyway
            if len(self.tokens[i]) >= job.max_new_tokens:
                self.reasons[i] = "length"  # force end-of-text so generate stops the row
                continue
            token = self._pick(i, scores[i])
            chosen[i] = token
            if token == self.eos_id:
                self.reasons[i] = "eos"
                continue
            self.tokens[i].append(token)
            if job.on_token is not None:
                job.on_token(token, self.decode(self.tokens[i]))
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(self.jobs), device=out.device), chosen.to(out.device)] = 0.0
        return out


class GenerationEngine:
    """A causal LM and its tokenizer, decoding batches of :class:`GenerationJob`.

    Args:
        model: a ``transformers`` causal LM (``OPTForCausalLM`` here), put in eval mode.
        tokenizer: its tokenizer; a pad token is borrowed from end-of-text if it has none.
        torch_threads: ``torch.set_num_threads`` value, or ``None`` to leave torch's default.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        torch_threads: int | None = None,
    ) -> None:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.model = model.eval()
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        if eos is None:
            eos = model.generation_config.eos_token_id
        if isinstance(eos, list):
            eos = eos[0]
        if eos is None:
            raise ValueError(
                "the checkpoint's tokenizer and generation config name no "
                "end-of-text token: set tokenizer.eos_token before saving it"
            )
        self.eos_id = int(eos)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        bos = tokenizer.bos_token_id
        self.bos_id = int(bos) if bos is not None else None
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 2048))

    @classmethod
    def from_pretrained(
        cls, checkpoint: str | Path, torch_threads: int | None = None
    ) -> GenerationEngine:
        """Load ``AutoModelForCausalLM`` and ``AutoTokenizer`` from a ``save_pretrained``
        directory (any OPT checkpoint, e.g. a local copy of facebook/opt-125m)."""
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(checkpoint)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is not a save_pretrained checkpoint directory "
                "(no config.json): pass the directory the model was saved to"
            )
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, torch_threads=torch_threads)

    def encode(self, prompt: str) -> list[int]:
        """Token ids of ``prompt``, starting with the beginning-of-text token.

        OPT was trained on texts that start with ``</s>`` (its BOS); facebook/opt tokenizers add
        it themselves, small locally trained ones may not, so it is added here when missing.
        """
        ids = list(self.tokenizer(prompt)["input_ids"])
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def new_cache(self) -> DynamicCache:
        """An empty transformers ``DynamicCache`` (keys/values ``(b, heads, s, head_dim)``) whose
        layers append in place (:class:`~cai_labs.serving.headroom_cache.HeadroomCache`)."""
        from cai_labs.serving.headroom_cache import HeadroomCache

        return HeadroomCache()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: Cache) -> torch.Tensor:
        """One forward pass over ``ids (b, s)`` after the ``cache``'s positions; ``mask (b,
        cached + s)`` marks real tokens with 1. Appends to ``cache``; returns the last
        position's logits ``(b, V)``."""
        # the scheduler's tensors live on the host; the cache with the model
        dev = self.model.device
        with torch.inference_mode():
            out = self.model(
                input_ids=ids.to(dev), attention_mask=mask.to(dev), cache=cache, use_cache=True
            )
        return out.logits[:, -1, :].cpu()  # sampled on the host, per request

    def pad_left(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both ``(b, longest)``, pads on the left."""
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, longest - len(prompt) :] = 1
        return ids, mask

    def generate_batch(self, jobs: list[GenerationJob]) -> list[Completion]:
        """Decode all ``jobs`` with one ``generate`` call; one :class:`Completion` per job."""
        if not jobs:
            return []
        ids, mask = self.pad_left([job.prompt_ids for job in jobs])
        sampler = RowSampler(jobs, self.eos_id, self.decode)
        start = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids.to(self.model.device),
                attention_mask=mask.to(self.model.device),
                logits_processor=[sampler],
                do_sample=False,
                num_beams=1,
                use_cache=True,  # keys/values of earlier positions are kept, not recomputed
                max_new_tokens=max(job.max_new_tokens for job in jobs),
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_id,
            )
        elapsed = time.perf_counter() - start
        return [
            Completion(
                token_ids=tokens,
                text=self.decode(tokens),
                finish_reason=sampler.reasons[i] or "length",
                batch_size=len(jobs),
                generate_s=elapsed,
            )
            for i, tokens in enumerate(sampler.tokens)
        ]
