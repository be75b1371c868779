"""Iteration-level scheduling: requests join and leave the running batch at every decoding step.

One :meth:`Scheduler.step` is one iteration: admit waiting requests (as many as the batch size
and the token budget allow), prefill them (short prompts together in one left-padded forward,
long prompts alone in chunks of ``prefill_chunk`` tokens, one chunk per iteration, so decoding of
the others goes on between chunks), sample their first token, merge their KV caches into the
running batch, run one decoding step over every running request, and let finished requests
leave. While the batch is at least half full, newcomers wait up to ``join_wait`` iterations to
join together, so that one prefill pass serves several. When the padding it costs is small
(``mix_tokens``), the prefill happens *inside* the decoding step: one forward pass feeds each
running request its last token and each new request its prompt.
``policy="static"`` admits only into an empty batch: the batch then runs until its longest
request ends, finished requests leaving it. ``policy="padded"`` is static batching as one
Hugging Face ``generate`` call per batch does it: finished rows stay in the batch and keep being
computed (their tokens thrown away) until the longest request ends. Both are baselines of the
benchmark.

The scheduler is synchronous and single-threaded; :mod:`~cai_labs.serving.batcher` drives it
from the event loop, one step per call on a worker thread.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from cai_labs.serving.config import POLICIES
from cai_labs.serving.engine import Completion, GenerationEngine, GenerationJob
from cai_labs.serving.running_batch import RunningBatch
from cai_labs.serving.sampling import TokenSampler

if TYPE_CHECKING:
    from transformers import Cache

__all__ = ["Sequence", "StepReport", "Scheduler", "visible_text"]


#: The oldest transformers release the running batch works with: with 5.23.0, 5.18.0, 5.0.0,
#: 4.57.6 and 4.54.1 the tests fail when requests join a running batch (shapes or cache API).
MIN_TRANSFORMERS = (5, 24)


def require_transformers(version: tuple[int, int]) -> None:
    """Raise a clear error if the installed transformers is older than ``version``."""
    import transformers

    found = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    if found < version:
        want = ".".join(map(str, version))
        raise RuntimeError(
            f"cai_labs.serving's scheduler needs transformers >= {want} (older releases fail "
            "when requests join a running batch); "
            f"found {transformers.__version__}: pip install -U 'transformers>={want}'"
        )


def visible_text(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``(text to show, stopped)``: cut at the first stop string; while none has appeared,
    hold back a tail that could still become one."""
    cuts = [text.find(s) for s in stops if s and s in text]
    if cuts:
        return text[: min(cuts)], True
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold], False


@dataclass
class Sequence:
    """One request inside the scheduler, with the times the metrics are made of."""

    job: GenerationJob
    sampler: TokenSampler
    arrived: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False
    cache: object | None = None  # its own cache while a long prompt is prefilled in chunks
    prefilled: int = 0
    most_company: int = 0  # largest running batch it was decoded in
    queued_step: int = 0  # the scheduler iteration it arrived at

    def completion(self) -> Completion:
        start = self.admitted or self.arrived
        return Completion(
            token_ids=list(self.tokens),
            text=self.text,
            finish_reason=self.finish_reason or "length",
            batch_size=max(1, self.most_company),
            generate_s=(self.finished or start) - start,
        )


@dataclass
class StepReport:
    """What one iteration did."""

    finished: list[Sequence]
    decoded: int  # rows of the decoding step (batch occupancy)
    prefill_tokens: int
    seconds: float
    joined: list[int] = field(default_factory=list)  # sizes of the prefill groups that joined
    mixed: bool = False  # a group was prefilled inside the decoding pass


class Scheduler:
    """Continuous (or static) batching over a :class:`GenerationEngine`.

    Args:
        engine: the model.
        max_batch_size: most requests running (decoding or prefilling) at once.
        max_batch_tokens: most tokens one iteration feeds the model (one per decoding request
            plus the prefill tokens, padding included); bounds an iteration's time and memory.
        prefill_chunk: prompts longer than this are prefilled in chunks of this many tokens.
        policy: ``"continuous"``, ``"static"`` or ``"padded"`` (see the module docstring).
        mix_tokens: newcomers are prefilled inside the decoding pass when that costs at most
            this many padding tokens (each running row gets ``prompt width - 1`` pads); else in
            a pass of their own.
        join_wait: a running batch less than half empty admits newcomers only once the oldest
            has waited this many iterations, so that prefill passes are shared by several
            newcomers instead of interrupting every step (as TGI's ``max_waiting_tokens``).
    """

    def __init__(
        self,
        engine: GenerationEngine,
        max_batch_size: int = 16,
        max_batch_tokens: int = 2048,
        prefill_chunk: int = 256,
        policy: str = "continuous",
        mix_tokens: int = 32,
        join_wait: int = 4,
    ) -> None:
        require_transformers(MIN_TRANSFORMERS)
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if not 1 <= prefill_chunk <= max_batch_tokens:
            raise ValueError(
                f"need 1 <= prefill_chunk ({prefill_chunk}) <= max_batch_tokens "
                f"({max_batch_tokens}): raise max_batch_tokens or lower prefill_chunk"
            )
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk = prefill_chunk
        self.policy = policy
        self.mix_tokens = mix_tokens
        self.join_wait = join_wait
        self.steps = 0
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: RunningBatch | None = None
        self.agree: Callable[[list[int]], list[int]] = lambda tokens: tokens  # TP: rank 0's
        self._done: list[Sequence] = []

    # -- queue ------------------------------------------------------------------------------------

    def add(self, job: GenerationJob, arrived: float | None = None) -> Sequence:
        """Queue ``job``; returns its :class:`Sequence` (finished when ``finish_reason`` is set)."""
        seq = Sequence(job, job.sampler(self.engine.eos_id))
        seq.queued_step = self.steps
        if arrived is not None:
            seq.arrived = arrived
        self.waiting.append(seq)
        return seq

    @property
    def active(self) -> int:
        """Requests admitted and not finished (running or prefilling)."""
        return len(self.prefilling) + (len(self.running) if self.running else 0)

    @property
    def free_slots(self) -> int:
        """How many more requests could be admitted now under the policy."""
        if self.policy != "continuous" and self.active:
            return 0
        return max(0, self.max_batch_size - self.active - len(self.waiting))

    def idle(self) -> bool:
        return not (self.waiting or self.prefilling or self.running)

    def clear(self) -> None:
        """Forget every request (after a failed step)."""
        self.waiting.clear()
        self.prefilling.clear()
        self.running = None
        self._done = []

    # -- one iteration ----------------------------------------------------------------------------

    def step(self) -> StepReport:
        """Admit, prefill, decode once, retire finished requests (see the module docstring)."""
        start = time.perf_counter()
        self.steps += 1
        self._retire_cancelled()
        group = self._admit()
        prefill_tokens, joined = self._prefill_chunks()
        decoded = len(self.running) if self.running else 0
        width = max((len(s.job.prompt_ids) for s in group), default=0)
        if group:
            prefill_tokens += len(group) * width
            joined.append(len(group))
        mixed = bool(group and decoded and decoded * (width - 1) <= self.mix_tokens)
        if mixed:
            self._decode(group)  # one pass: prefill the newcomers, decode the others
            decoded += len(group)
        else:
            if group:
                self._prefill_group(group)
            decoded = len(self.running) if self.running else 0
            if decoded:
                self._decode()
        done, self._done = self._done, []
        seconds = time.perf_counter() - start
        return StepReport(done, decoded, prefill_tokens, seconds, joined, mixed)

    def run(self, jobs: list[GenerationJob]) -> list[Completion]:
        """Serve ``jobs`` (all queued now) to the end, offline; one completion per job."""
        seqs = [self.add(job) for job in jobs]
        while not self.idle():
            self.step()
        return [s.completion() for s in seqs]

    def _admit(self) -> list[Sequence]:
        """Move waiting requests in: short prompts into one prefill group, long ones to chunks."""
        if self.policy != "continuous" and self.active or self._defer():
            return []
        budget = self.max_batch_tokens - self.active - self.prefill_chunk * len(self.prefilling)
        group: list[Sequence] = []
        longest, now = 0, time.perf_counter()
        while self.waiting and self.active + len(group) < self.max_batch_size:
            seq = self.waiting[0]
            n = len(seq.job.prompt_ids)
            padded = (len(group) + 1) * max(longest, n) - len(group) * longest
            cost = self.prefill_chunk if n > self.prefill_chunk else padded
            if cost > budget and (group or self.active):
                break
            self.waiting.popleft()
            seq.admitted = now
            budget -= cost
            if n > self.prefill_chunk:
                self.prefilling.append(seq)
            else:
                group.append(seq)
                longest = max(longest, n)
        return group

    def _defer(self) -> bool:
        """Continuous: let newcomers gather while the batch is at least half full."""
        if not self.waiting or not self.running or 2 * self.active < self.max_batch_size:
            return False
        return self.steps - self.waiting[0].queued_step < self.join_wait

    def _prefill_group(self, group: list[Sequence]) -> None:
        ids, mask = self.engine.pad_left([s.job.prompt_ids for s in group])
        cache = self.engine.new_cache()
        logits = self.engine.forward(ids, mask, cache)
        self._join(group, cache, mask, logits)

    def _prefill_chunks(self) -> tuple[int, list[int]]:
        """One chunk of every long prompt being prefilled; returns the tokens fed and ``[1]``
        for each prompt completed."""
        fed, joined = 0, []
        for seq in list(self.prefilling):
            prompt = seq.job.prompt_ids
            lo, hi = seq.prefilled, min(seq.prefilled + self.prefill_chunk, len(prompt))
            if seq.cache is None:
                seq.cache = self.engine.new_cache()
            mask = torch.ones((1, hi), dtype=torch.long)
            logits = self.engine.forward(torch.tensor([prompt[lo:hi]]), mask, seq.cache)
            seq.prefilled, fed = hi, fed + hi - lo
            if hi == len(prompt):
                self.prefilling.remove(seq)
                cache, seq.cache = seq.cache, None
                self._join([seq], cache, mask, logits)
                joined.append(1)
        return fed, joined

    def _join(
        self, seqs: list[Sequence], cache: Cache, mask: torch.Tensor, logits: torch.Tensor
    ) -> None:
        """First tokens of freshly prefilled ``seqs``; the unfinished join the running batch."""
        tokens = self.agree([s.sampler(logits[i]) for i, s in enumerate(seqs)])
        for seq, token in zip(seqs, tokens):
            self._emit(seq, token)
        piece = RunningBatch(seqs, cache, mask, torch.tensor(tokens, dtype=torch.long))
        rows = [i for i, s in enumerate(seqs) if s.finish_reason is None]
        if not rows:
            return
        if self.policy != "padded":
            piece.keep(rows)
        if self.running is None:
            self.running = piece
        else:
            self.running.extend(piece)

    def _decode(self, group: list[Sequence] = ()) -> None:
        """One decoding step of the running batch; with ``group``, the same forward pass also
        prefills those newcomers (their prompts left-padded to a common width ``w``; each
        running row gets ``w - 1`` pads before its last token, then moved to its front)."""
        batch, n = self.running, len(self.running)
        ids, mask = batch.last[:, None], torch.ones((n, 1), dtype=torch.long)
        length = batch.length
        if group:
            new_ids, new_mask = self.engine.pad_left([s.job.prompt_ids for s in group])
            width = new_ids.shape[1]
            ids = torch.cat([F.pad(ids, (width - 1, 0), value=self.engine.pad_id), new_ids])
            mask = torch.cat([F.pad(mask, (width - 1, 0)), new_mask])
            batch.mask = torch.cat(
                [batch.mask, torch.zeros((len(group), length), dtype=torch.long)]
            )
            batch.add_rows(len(group))
            batch.seqs = batch.seqs + list(group)
        batch.mask = torch.cat([batch.mask, mask], 1)
        logits = self.engine.forward(ids, batch.mask, batch.cache)
        if group:
            batch.close_gap(n, length, width - 1)
        pad = self.engine.pad_id  # a finished row kept in a padded batch is fed pads
        tokens = self.agree(
            [pad if s.finish_reason else s.sampler(logits[i]) for i, s in enumerate(batch.seqs)]
        )
        batch.last = torch.tensor(tokens, dtype=torch.long)
        for seq, token in zip(batch.seqs, tokens):
            if seq.finish_reason is None:
                seq.most_company = max(seq.most_company, len(batch))
                self._emit(seq, token)
        self._retire()

    # -- finishing --------------------------------------------------------------------------------

    def _emit(self, seq: Sequence, token: int) -> None:
        now = time.perf_counter()
        seq.first_token = seq.first_token or now
        if token == self.engine.eos_id:
            return self._finish(seq, "eos", now)
        seq.tokens.append(token)
        text = self.engine.decode(seq.tokens)
        shown, stopped = visible_text(text, seq.job.stop) if seq.job.stop else (text, False)
        seq.text = shown
        if seq.job.on_token is not None:
            seq.job.on_token(token, shown)
        if stopped:
            self._finish(seq, "stop", now)
        elif len(seq.tokens) >= seq.job.max_new_tokens:
            self._finish(seq, "length", now)

    def _finish(self, seq: Sequence, reason: str, now: float) -> None:
        if reason != "stop" and seq.job.stop:  # no stop string came: release the held tail
            seq.text = self.engine.decode(seq.tokens)
        seq.finish_reason, seq.finished = reason, now
        self._done.append(seq)

    def _retire(self) -> None:
        if self.running is None:
            return
        rows = [i for i, s in enumerate(self.running.seqs) if s.finish_reason is None]
        if not rows:
            self.running = None
        elif len(rows) < len(self.running) and self.policy != "padded":
            self.running.keep(rows)

    def _retire_cancelled(self) -> None:
        now = time.perf_counter()
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self._finish(seq, "cancelled", now)
        for seq in [s for s in self.prefilling if s.cancelled]:
            self.prefilling.remove(seq)
            self._finish(seq, "cancelled", now)
        for seq in self.running.seqs if self.running else []:
            if seq.cancelled and seq.finish_reason is None:
                self._finish(seq, "cancelled", now)
        self._retire()
