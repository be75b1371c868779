"""Continuous batching: every request gets the tokens it gets alone, whoever it shares steps
with; requests join between decoding steps and leave when finished; long prompts are prefilled
in chunks; the token budget holds; a misaligned cache is caught; static batching waits.

The model is a random OPT with spread-out weights (varied text, so a wrong row shows) in
float64, so that greedy choices do not hinge on float32 rounding of padded vs unpadded matmuls.
"""

from __future__ import annotations

import pytest
import torch

from cai_labs.serving import (
    GenerationEngine,
    GenerationJob,
    Scheduler,
    make_toy_checkpoint,
    running_batch,
)
from cai_labs.serving import scheduler as scheduler_mod
from cai_labs.serving.scheduler import visible_text

PROMPTS = [
    "Return a copy of the string",
    "hello",
    "Path objects are",
    "Split the string at",
    "x " * 40,  # 41 tokens: prefilled in chunks of 16
    "Return the",
    "join these",
]
LENGTHS = [10, 3, 12, 7, 9, 20, 15]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_toy_checkpoint(tmp_path_factory.mktemp("opt_varied"), init_std=0.3)
    engine = GenerationEngine.from_pretrained(path, torch_threads=1)
    engine.model.double()
    return engine


def _jobs(engine) -> list[GenerationJob]:
    return [GenerationJob(engine.encode(p), max_new_tokens=n) for p, n in zip(PROMPTS, LENGTHS)]


def _staggered(scheduler: Scheduler, jobs: list[GenerationJob]):
    """Two requests first; the rest arrive after two steps, while those two decode."""
    seqs = [scheduler.add(job) for job in jobs[:2]]
    reports = [scheduler.step(), scheduler.step()]
    seqs += [scheduler.add(job) for job in jobs[2:]]
    while not scheduler.idle():
        reports.append(scheduler.step())
    return seqs, reports


def test_each_request_gets_its_text_alone(engine, monkeypatch):
    jobs = _jobs(engine)
    alone = [engine.generate_batch([job])[0].token_ids for job in jobs]  # transformers generate
    widths = []  # tokens per row of every forward pass
    forward = engine.forward
    monkeypatch.setattr(
        engine, "forward", lambda ids, *a: widths.append(ids.shape) or forward(ids, *a)
    )
    scheduler = Scheduler(engine, max_batch_size=3, max_batch_tokens=64, prefill_chunk=16)
    seqs, reports = _staggered(scheduler, jobs)
    assert [s.tokens for s in seqs] == alone
    # Short newcomers joining a running batch were prefilled inside its decoding pass; the
    # long prompt (81 tokens) went alone, in chunks of 16 tokens (the last one of 1 token).
    mixed = [r for r in reports if r.mixed]
    assert mixed and all(r.decoded > sum(r.joined) for r in mixed)
    chunks = [shape for shape in widths if shape[0] == 1 and shape[1] > 1]
    assert len(chunks) == len(jobs[4].prompt_ids) // 16 and max(s[1] for s in chunks) == 16
    assert all(s.finish_reason == "length" for s in seqs)
    # It was continuous: requests joined while others decoded, and rows left as they finished.
    assert any(r.joined and r.decoded > sum(r.joined) for r in reports)
    occupancy = [r.decoded for r in reports if r.decoded]
    assert max(occupancy) == 3 and min(occupancy) < 3
    # The long prompt went through chunks of at most 16 tokens, within the token budget.
    assert all(r.decoded + r.prefill_tokens <= 64 for r in reports)


def test_seeded_samples_do_not_depend_on_the_batch(engine):
    def job(i: int) -> GenerationJob:
        return GenerationJob(
            engine.encode(PROMPTS[i]), 8, temperature=0.9, top_k=50, top_p=0.9, seed=i
        )

    alone = [Scheduler(engine).run([job(i)])[0].token_ids for i in range(4)]
    together = [
        c.token_ids for c in Scheduler(engine, max_batch_size=4).run(list(map(job, range(4))))
    ]
    assert together == alone


def test_a_misaligned_mask_would_be_caught(engine, monkeypatch):
    """Pad the mask on the wrong side when a request joins: its text changes."""
    jobs = _jobs(engine)
    alone = [engine.generate_batch([job])[0].token_ids for job in jobs]
    original = running_batch._pad_left

    def pad_mask_right(t, n):
        return torch.nn.functional.pad(t, (0, n)) if t.dim() == 2 else original(t, n)

    monkeypatch.setattr(running_batch, "_pad_left", pad_mask_right)
    seqs, _ = _staggered(Scheduler(engine, max_batch_size=3, prefill_chunk=16), jobs)
    assert [s.tokens for s in seqs] != alone


def test_static_policy_admits_only_into_an_empty_batch(engine):
    jobs = _jobs(engine)
    alone = [engine.generate_batch([job])[0].token_ids for job in jobs]
    scheduler = Scheduler(engine, max_batch_size=3, prefill_chunk=16, policy="static")
    seqs, reports = _staggered(scheduler, jobs)
    assert [s.tokens for s in seqs] == alone
    cohorts: dict[float, list] = {}
    for seq in seqs:
        cohorts.setdefault(seq.admitted, []).append(seq)
    admitted = sorted(cohorts)
    for before, after in zip(admitted, admitted[1:]):  # a batch runs until its last one ends
        assert after >= max(s.finished for s in cohorts[before])
    assert len(admitted) > 1
    # Continuous batching admits while others run.
    seqs, _ = _staggered(Scheduler(engine, max_batch_size=3, prefill_chunk=16), jobs)
    assert any(s.admitted < t.finished and t.admitted < s.admitted for s in seqs for t in seqs)


def test_padded_policy_computes_finished_rows_until_the_longest_ends(engine):
    """``padded``: the same text as alone, and every decoding step of a batch computes all of its
    rows (finished ones included), so each step decodes the batch's full size."""
    jobs = _jobs(engine)[:3]  # 10, 3 and 12 new tokens: one batch of 3
    alone = [engine.generate_batch([job])[0].token_ids for job in jobs]
    for policy, rows in (("padded", [3] * 11), ("static", [3, 3, 2, 2, 2, 2, 2, 2, 2, 1, 1])):
        scheduler = Scheduler(engine, max_batch_size=3, prefill_chunk=16, policy=policy)
        seqs = [scheduler.add(job) for job in jobs]
        reports = []
        while not scheduler.idle():
            reports.append(scheduler.step())
        assert [s.tokens for s in seqs] == alone, policy
        assert [r.decoded for r in reports] == rows, policy  # prefill + 11 decoding steps


def test_stop_strings_and_bad_settings(engine):
    assert visible_text("abc STOP def", ("STOP",)) == ("abc ", True)
    assert visible_text("abc ST", ("STOP",)) == ("abc ", False)  # held back: may become STOP
    job = GenerationJob(engine.encode(PROMPTS[0]), max_new_tokens=10)
    full = Scheduler(engine).run([job])[0].text
    stop = full[3:6]
    cut = Scheduler(engine).run([GenerationJob(job.prompt_ids, 10, stop=(stop,))])[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.find(stop)]
    with pytest.raises(ValueError, match="prefill_chunk"):
        Scheduler(engine, max_batch_tokens=8, prefill_chunk=16)
    with pytest.raises(ValueError, match="policy"):
        Scheduler(engine, policy="dynamic")
    with pytest.raises(RuntimeError, match=r"transformers >= 99\.0 .*pip install -U"):
        scheduler_mod.require_transformers((99, 0))
    scheduler_mod.require_transformers(scheduler_mod.MIN_TRANSFORMERS)  # what is installed
