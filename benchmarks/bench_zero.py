"""ZeRO-3 (cai_labs) against FSDP2 (PyTorch): step time and per-rank memory, one run.

Both shard parameters, gradients and Adam state over N ranks with one all-gather/reduce-scatter
unit per OPT decoder layer plus the root (ZeRO-3 also once without its all-gather prefetch).
Prints the measured ratios; goals: memory ratio within 5% of 1 (both follow the (4+4+8)Ψ/N
formula in fp32); step-time ratios reported, not asserted (they depend on the machine).

    PYTHONPATH=src python benchmarks/bench_zero.py [--world-size 4] [--steps 10]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.distributed as dist

from cai_labs import Ledger, launch
from cai_labs.data.reverse_task import make_reverse_task
from cai_labs.data_parallel import shard_batch
from cai_labs.models.opt import tiny_opt, train_char_tokenizer
from cai_labs.recipes.opt_finetune import sample_words, task_batch
from cai_labs.zero import Zero3, ZeroOptimizer, memory_by_kind, zero_memory_formula, zero_wrap
from cai_labs.zero.fsdp2 import fsdp2_memory, fsdp2_wrap

SIZES = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    ffn_dim=512,
    max_position_embeddings=64,
)
BATCH = 32


def worker(method: str, steps: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = train_char_tokenizer("reverse abcdefghijklmnopqrstuvwxyz => .")
    task = make_reverse_task()
    model = tiny_opt(tok, seed=0, **SIZES).train()
    numel = sum(p.numel() for p in model.parameters())
    if method == "zero3":
        model, opt = zero_wrap(model, torch.optim.Adam, stage=3, lr=1e-3)
    elif method == "zero3-no-prefetch":
        model = Zero3(model, prefetch=False)
        opt = ZeroOptimizer(model, torch.optim.Adam, lr=1e-3)
    else:
        model = fsdp2_wrap(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times, mem = [], None
    with Ledger(track_activations=False) as ledger:
        if method.startswith("zero3"):
            model.watch(ledger, opt)
        for step in range(steps):
            x, y = task_batch(tok, task, sample_words(task, BATCH, step))
            x, y = shard_batch(x, y, rank=rank, world_size=world)
            start = time.perf_counter()
            model(input_ids=x, labels=y).loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
            if step == steps - 1:
                mem = (
                    memory_by_kind(ledger.snapshot("end"))
                    if method.startswith("zero3")
                    else fsdp2_memory(model, opt)
                )
            opt.zero_grad()
    return {"time": float(np.median(times[1:])), "mem": mem, "numel": numel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    z = launch(worker, args.world_size, "zero3", args.steps)
    f = launch(worker, args.world_size, "fsdp2", args.steps)
    z0 = launch(worker, args.world_size, "zero3-no-prefetch", args.steps)
    want = zero_memory_formula(z["numel"], 3, args.world_size)
    print(f"OPT Ψ={z['numel']:,} on {args.world_size} CPU ranks, {args.steps} steps, fp32 Adam")
    print(
        f"  ZeRO-3 (cai_labs): step {1e3 * z['time']:.1f} ms, model states/rank "
        f"{z['mem']['total']:,} B"
    )
    print(f"  ZeRO-3 without prefetch: step {1e3 * z0['time']:.1f} ms")
    print(
        f"  FSDP2 (PyTorch):   step {1e3 * f['time']:.1f} ms, model states/rank "
        f"{f['mem']['total']:,} B"
    )
    print(f"  formula (4+4+8)Ψ/N = {want['total']:,.0f} B")
    print(f"ZeRO-3 / FSDP2 step-time ratio: {z['time'] / f['time']:.2f}")
    print(
        f"ZeRO-3 / FSDP2 memory ratio:    {z['mem']['total'] / f['mem']['total']:.3f} "
        "(goal: within 5% of 1)"
    )
    print(
        f"ZeRO-3 prefetch on / off step-time ratio: {z['time'] / z0['time']:.2f} "
        "(gloo on shared CPU cores: overlap may not show)"
    )


if __name__ == "__main__":
    main()
