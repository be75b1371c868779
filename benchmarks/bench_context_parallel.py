"""Online-softmax ring (cai_labs) against the seed's ring and serial SDPA: step time and memory.

Causal attention, forward + backward, one run. Prints each ring's measured peak activations per
rank (the ledger's count of tensors saved for backward) next to its formula, their ratio, and
step-time ratios against PyTorch's ``scaled_dot_product_attention`` on the whole sequence in one
process (PyTorch's own ``context_parallel`` does not run on CPU). Times are reported, not
asserted: on shared CPU cores they depend on the machine.

    PYTHONPATH=src python benchmarks/bench_context_parallel.py [--world-size 2] [--steps 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.functional import scaled_dot_product_attention

from cai_labs import Ledger, device, launch
from cai_labs.sequence_parallel import formulas, split_sequence
from cai_labs.sequence_parallel.ring_attention import ring_attention
from cai_labs.sequence_parallel.ring_flash import ring_flash_attention, split_layout

B, H, L, D = 1, 4, 1024, 32


def _qkv(rank: int, n: int, kind: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(B, H, L, D, generator=g).to(device()) for _ in range(3)]
    if kind == "seed":
        return [split_sequence(t, rank, n, dim=2).clone().requires_grad_() for t in full]
    if kind == "flash":
        return [split_layout(t, rank, n, 2).requires_grad_() for t in full]
    return [t.requires_grad_() for t in full]


def _attend(kind: str, q, k, v) -> torch.Tensor:
    if kind == "seed":
        return ring_attention(q, k, v, causal=True)
    if kind == "flash":
        return ring_flash_attention(q, k, v)
    return scaled_dot_product_attention(q, k, v, is_causal=True)


def worker(kind: str, steps: int) -> dict:
    rank, n = dist.get_rank(), dist.get_world_size()
    q, k, v = _qkv(rank, n, kind)
    times, peak = [], 0
    for _ in range(steps):
        with Ledger() as ledger:
            start = time.perf_counter()
            _attend(kind, q, k, v).sum().backward()
            times.append(time.perf_counter() - start)
        peak = max(peak, ledger.report()["memory"]["peak_activations"])
    return {"time": float(np.median(times[1:])), "peak": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    n = args.world_size
    got = {kind: launch(worker, n, kind, args.steps) for kind in ("seed", "flash")}
    got["sdpa"] = launch(worker, 1, "sdpa", args.steps)
    print(f"causal attention B={B} H={H} L={L} D={D} fp32 on {n} CPU ranks, {args.steps} steps")
    for kind in ("seed", "flash"):
        model = formulas.saved_activation_bytes(kind, B, H, L, D, n, 4)
        print(
            f"  {kind:5s} ring: step {1e3 * got[kind]['time']:.1f} ms, peak activations/rank "
            f"{got[kind]['peak']:,} B measured, {model:,} B formula"
        )
    print(f"  serial SDPA (1 process, whole sequence): step {1e3 * got['sdpa']['time']:.1f} ms")
    flash, seed, sdpa = got["flash"], got["seed"], got["sdpa"]
    print(f"online / seed ring peak-activation ratio:  {flash['peak'] / seed['peak']:.3f}")
    print(f"online / seed ring step-time ratio:        {flash['time'] / seed['time']:.2f}")
    print(f"online ring / serial SDPA step-time ratio: {flash['time'] / sdpa['time']:.2f}")


if __name__ == "__main__":
    main()
