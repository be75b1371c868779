"""Pipeline schedules on the same model: measured bubble next to its formula, one run.

GPipe, 1F1B, interleaved 1F1B (``v`` chunks per rank) and ZB-H1 run on ``p = 2`` ranks, each
rank pinned to its own core with one thread, on equal stages of ``tanh(Linear)`` layers whose
ops take about 0.3 s per micro-batch (``--d 2048``), so that computation dominates the step (the
formulas' condition; with ``--d 512``, ops of 10-20 ms, the waits for messages add about 0.05-0.1
to every bubble). Two shares of the step's span are measured from the ledger's events, mean over
ranks: *not computing* (:func:`~cai_labs.pipeline.measured_bubble`: outside ``F``/``B``/``W``)
and *waiting* (:func:`~cai_labs.pipeline.waiting_bubble`: blocked in a receive, ``R``, or
before a rank's first op and after its last); the formula is
:func:`~cai_labs.pipeline.formulas.bubble_fraction`. For ZB-H1 the formula
assumes ``T_F = T_B = T_W``; the measured op times are printed, with the bubble for those times
(:func:`~cai_labs.pipeline.formulas.zb_h1_bubble`).

PyTorch's own engine runs next to each schedule on the same layers, micro-batches and ranks:
``torch.distributed.pipelining``'s ``ScheduleGPipe``, ``Schedule1F1B``,
``ScheduleInterleaved1F1B`` (``v`` stages per rank) and ``ScheduleInterleavedZeroBubble`` with one
stage per rank (its split backward on the ZB-H1 layout). The median step time of each is printed
with the ratio torch / cai_labs.

Two pipelines by default, ``m = 2`` (``m = p``: the fewest micro-batches every schedule here
allows) and ``m = 4``. More micro-batches shrink the formula's bubble (ZB-H1's
``(p-1)/(3m+p-1)``: 0.143 at ``m = 2``, 0.077 at ``m = 4``), but not the waits that come from
op times varying from op to op (the ``spread`` column: slowest minus fastest op of a kind over
its median): ZB-H1's order on equal times has no slack in its steady state, so every op that
runs long makes the next stage wait, and that wait is a larger share of a smaller bubble.

The median over the measured steps is printed; a loaded machine (other processes on the cores)
shows up as extra idle time, most where messages are most frequent (interleaved): a rank
blocked in a receive waits for the scheduler to wake it. ``--no-pin`` lets the OS move the ranks
(on a loaded machine a pinned rank cannot leave a busy core). Nothing is asserted on time.

    PYTHONPATH=src python benchmarks/bench_pipeline_schedules.py [--micro 2 4] [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import pipelining

from cai_labs import Ledger, launch
from cai_labs.pipeline import (
    StageLinks,
    measured_bubble,
    pipeline_step,
    step_events,
    waiting_bubble,
)
from cai_labs.pipeline.formulas import bubble_fraction, zb_h1_bubble

RANKS = 2
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
TORCH_SCHEDULES = {  # name -> (torch.distributed.pipelining schedule, stages per rank)
    "gpipe": ("ScheduleGPipe", 1),
    "1f1b": ("Schedule1F1B", 1),
    "interleaved": ("ScheduleInterleaved1F1B", 0),  # 0: --chunks
    "zb-h1": ("ScheduleInterleavedZeroBubble", 1),
}


def tanh_layers(d: int, layers: int, seed: int) -> nn.Sequential:
    """``layers`` x tanh(Linear(d, d)): F, B (input gradient) and W (weight gradient) are one
    ``d x d`` matrix product each per row, so ``T_F ~ T_B ~ T_W``."""
    torch.manual_seed(seed)
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(d, d), nn.Tanh())])


def _pin(rank: int) -> None:
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[rank % len(cores)]})


def worker(schedule: str, args: argparse.Namespace) -> dict:
    rank, p = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    if args.pin:
        _pin(rank)
    if schedule == "interleaved":  # the same layers per rank, in v chunks of layers / v
        per_chunk = args.layers // args.chunks
        module = [tanh_layers(args.d, per_chunk, seed=10 * rank + c) for c in range(args.chunks)]
        links = StageLinks.ring(rank, p)
    else:
        module = tanh_layers(args.d, args.layers, seed=rank)
        links = StageLinks(rank - 1 if rank > 0 else None, rank + 1 if rank < p - 1 else None)
    rows = args.rows * args.micro
    x = torch.randn(rows, args.d, generator=torch.Generator().manual_seed(0)).requires_grad_()
    y = torch.zeros(rows, args.d)  # stage 0 computes its input gradient too, like every stage
    seconds = []
    with Ledger(track_activations=False) as ledger:
        for step in range(args.steps + 1):  # step 0 warms up (shape handshakes, allocator)
            dist.barrier()
            start = time.perf_counter()
            pipeline_step(
                module,
                links,
                stage=rank,
                n_stages=p,
                inputs=x,
                targets=y,
                n_micro=args.micro,
                loss_fn=nn.functional.mse_loss,
                schedule=schedule,
                ledger=ledger,
                step=step,
            )
            dist.barrier()
            seconds.append(time.perf_counter() - start)
    timelines = [None] * p
    dist.all_gather_object(timelines, ledger.report()["timeline"])
    steps = [step_events(timelines, s) for s in range(1, args.steps + 1)]
    v = args.chunks if schedule == "interleaved" else 1
    durations = {
        k: d
        for k in ("F", "B", "W")
        if (d := [e["end"] - e["start"] for ev in steps for e in ev if e["name"] == k])
    }
    # per micro-batch through the rank's whole stage (v chunks)
    times = {k: v * statistics.median(d) for k, d in durations.items()}
    spread = max((max(d) - min(d)) / statistics.median(d) for d in durations.values())
    bubbles = [measured_bubble(ev)["bubble"] for ev in steps]
    waits = [
        waiting_bubble(step_events(timelines, s, waits=True))["bubble"]
        for s in range(1, args.steps + 1)
    ]
    return {
        "bubbles": bubbles,
        "waits": waits,
        "times": times,
        "spread": spread,
        "seconds": statistics.median(seconds[1:]),
    }


def torch_worker(schedule: str, args: argparse.Namespace) -> float:
    """Median step time of ``torch.distributed.pipelining`` on the same layers and batches."""
    rank, p = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    if args.pin:
        _pin(rank)
    name, per_rank = TORCH_SCHEDULES[schedule]
    v = per_rank or args.chunks
    stages = [
        pipelining.PipelineStage(
            tanh_layers(args.d, args.layers // v, seed=s), s, p * v, torch.device("cpu")
        )
        for s in (rank + c * p for c in range(v))
    ]
    multi = name in ("ScheduleInterleaved1F1B", "ScheduleInterleavedZeroBubble")
    run = getattr(pipelining, name)(
        stages if multi else stages[0], n_microbatches=args.micro, loss_fn=nn.functional.mse_loss
    )
    rows = args.rows * args.micro
    x = torch.randn(rows, args.d, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(rows, args.d)
    seconds = []
    for _ in range(args.steps + 1):
        dist.barrier()
        start = time.perf_counter()
        run.step(x) if rank == 0 else run.step(target=y)
        dist.barrier()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--micro", type=int, nargs="+", default=[2, 4], help="micro-batches m (multiples of p)"
    )
    ap.add_argument("--chunks", type=int, default=2, help="chunks per rank v (interleaved)")
    ap.add_argument("--steps", type=int, default=4, help="measured steps per schedule")
    ap.add_argument("--d", type=int, default=2048, help="layer width")
    ap.add_argument("--layers", type=int, default=4, help="tanh(Linear) layers per rank")
    ap.add_argument("--rows", type=int, default=512, help="rows per micro-batch")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="let the OS place the ranks")
    args, _ = ap.parse_known_args()  # nox -s bench passes the same arguments to every script
    if args.layers % args.chunks:
        raise SystemExit(f"--layers {args.layers} must be a multiple of --chunks {args.chunks}")
    for m in args.micro:
        table(argparse.Namespace(**{**vars(args), "micro": m}))
    print(
        "torch: torch.distributed.pipelining's "
        + ", ".join(n for n, _ in TORCH_SCHEDULES.values())
        + " (zb-h1's row: the zero-bubble schedule with one stage per rank)"
    )
    print(
        "spread: (slowest - fastest) / median op time, of the op kind that varies most "
        f"(F, B or W); load average at end {os.getloadavg()[0]:.1f} (measured under this load)"
    )


def table(args: argparse.Namespace) -> None:
    """Every schedule on ``args.micro`` micro-batches: one row each."""
    load = os.getloadavg()[0]
    placed = "one core and one thread each" if args.pin else "one thread each, unpinned"
    print(
        f"\np = {RANKS} ranks, {placed}, on a machine of {os.cpu_count()} "
        f"cores (load average {load:.1f} at start); m = {args.micro}, v = {args.chunks}; "
        f"{args.layers} x tanh(Linear({args.d}, {args.d})) per rank, {args.rows} rows per "
        f"micro-batch; median of {args.steps} steps"
    )
    print(
        "not computing: 1 - F/B/W time / span; waiting: blocked in a receive or outside the "
        "stage's own ops (measured_bubble, waiting_bubble; medians over steps)"
    )
    print(
        f"{'schedule':<12} {'formula':>8} {'waiting':>8} {'min-max':>13} {'ratio':>6} "
        f"{'not comp':>8} {'ratio':>6} {'s/step':>7} {'torch':>7} {'t/ours':>6} {'spread':>6}  "
        "median op time per micro-batch and stage, ms (B: whole backward unless W)"
    )
    for schedule in SCHEDULES:
        res = launch(worker, RANKS, schedule, args)
        got = statistics.median(res["bubbles"])
        v = args.chunks if schedule == "interleaved" else 1
        want = bubble_fraction(schedule, RANKS, args.micro, v)
        wait = statistics.median(res["waits"])
        lo, hi = min(res["waits"]), max(res["waits"])
        ops = "  ".join(f"{k} {t * 1e3:.1f}" for k, t in res["times"].items())
        ours, theirs = res["seconds"], launch(torch_worker, RANKS, schedule, args)
        print(
            f"{schedule:<12} {want:8.3f} {wait:8.3f} {lo:6.3f}-{hi:6.3f} {wait / want:6.2f} "
            f"{got:8.3f} {got / want:6.2f} {ours:7.3f} {theirs:7.3f} {theirs / ours:6.2f} "
            f"{res['spread']:6.2f}  {ops}"
        )
        if schedule == "zb-h1":
            t = res["times"]
            with_times = zb_h1_bubble(RANKS, args.micro, t["F"], t["B"], t["W"])
            print(
                f"{'':<12} formula with the measured T_F, T_B, T_W: {with_times:.3f}, "
                f"ratio waiting {wait / with_times:.2f}, not computing {got / with_times:.2f}"
            )


if __name__ == "__main__":
    main()
