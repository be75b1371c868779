"""Tensor + sequence parallelism (cai_labs) against 1D tensor parallelism alone and DTensor's
``SequenceParallel``: saved activations, bytes sent and step time of one GPT block.

One run, forward + backward of one :class:`~cai_labs.models.gpt.Block` in fp32. Prints per rank
the ledger's saved activations (measured) next to their formulas, the bytes sent (the sockets'
counters, measured, and the ring model), and step-time medians; the TP+SP / TP and
cai_labs / DTensor ratios. Times are reported, not asserted: on shared CPU cores they depend on
the machine.

    PYTHONPATH=src python benchmarks/bench_tensor_sequence_parallel.py [--world-size 2]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch
import torch.distributed as dist

from cai_labs import Ledger, device, launch
from cai_labs.models.gpt import Block, GPTConfig
from cai_labs.peers.dtensor_tp import interleave_qkv_rows
from cai_labs.tensor_parallel import layers_1d, make_grid
from cai_labs.tensor_parallel import sequence_parallel_1d as sp
from cai_labs.tensor_parallel.formulas import (
    block_activation_bytes,
    block_sent_bytes,
    sequence_parallel_block_activation_bytes,
)

CFG = GPTConfig(seq_len=128, d_model=512, n_heads=8)
BATCH = 4


def _dtensor_sp_block(block: Block, n: int) -> Block:
    """``block`` under DTensor: ``SequenceParallel`` norms, column/row linears with the
    sequence sharded on dim 1 between them (PyTorch's Megatron SP)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    mesh = init_device_mesh(device().type, (n,))
    with torch.no_grad():
        block.attn.qkv.weight.copy_(interleave_qkv_rows(block.attn.qkv.weight, n))
        block.attn.qkv.bias.copy_(interleave_qkv_rows(block.attn.qkv.bias, n))
    plan = {
        "ln1": SequenceParallel(),
        "attn.qkv": ColwiseParallel(input_layouts=Shard(1)),
        "attn.proj": RowwiseParallel(output_layouts=Shard(1)),
        "ln2": SequenceParallel(),
        "mlp.fc1": ColwiseParallel(input_layouts=Shard(1)),
        "mlp.fc2": RowwiseParallel(output_layouts=Shard(1)),
    }
    parallelize_module(block, mesh, plan)
    block.attn.n_heads = CFG.n_heads // n
    return block


def _serial_saved_bytes() -> int:
    torch.manual_seed(0)
    block = Block(CFG)
    x = torch.randn(BATCH, CFG.seq_len, CFG.d_model, requires_grad=True)
    with Ledger(model=block) as ledger:
        block(x).sum().backward()
    return ledger.report()["memory"]["peak_activations"]


def worker(kind: str, steps: int) -> dict:
    n = dist.get_world_size()
    torch.manual_seed(0)
    block = Block(CFG).to(device())
    x = torch.randn(BATCH, CFG.seq_len, CFG.d_model, generator=torch.Generator().manual_seed(1))
    grid = make_grid("1d")
    if kind == "tp":
        model, xin = layers_1d.parallelize_block(block, grid), x
    else:
        xin = x.chunk(n, dim=1)[dist.get_rank()]
        model = sp.parallelize_block(block, grid) if kind == "sp" else _dtensor_sp_block(block, n)
    xin = xin.to(device()).contiguous().requires_grad_()
    times, peak, sent, first = [], 0, None, None
    for step in range(steps + 1):
        measure = step == 0 and kind != "dtensor"  # the ledger on one step, outside the timing
        with Ledger(model=model) if measure else contextlib.nullcontext() as ledger:
            start = time.perf_counter()
            y = model(xin)
            y = y.to_local() if hasattr(y, "to_local") else y
            y.sum().backward()
            times.append(time.perf_counter() - start)
        first = y.detach().cpu() if first is None else first
        if measure:
            rep = ledger.report()
            peak, sent = rep["memory"]["peak_activations"], rep["wire"].get("sent")
    return {"time": float(np.median(times[1:])), "peak": peak, "sent": sent, "y": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    t, s, h = args.world_size, CFG.seq_len, CFG.d_model
    got = {k: launch(worker, t, k, args.steps) for k in ("tp", "sp", "dtensor")}
    size = (t, BATCH, s, h, CFG.n_heads, CFG.mlp_ratio)
    model = {
        "tp": block_activation_bytes("1d", *size),
        "sp": sequence_parallel_block_activation_bytes(*size),
    }
    ring = {
        "tp": block_sent_bytes(t, BATCH, s, h),
        "sp": block_sent_bytes(t, BATCH, s, h, sequence_parallel=True),
    }
    print(f"one GPT block b={BATCH} s={s} h={h} heads={CFG.n_heads} fp32, {t} CPU ranks")
    for k, name in (("tp", "1D TP      "), ("sp", "TP + SP    ")):
        g = got[k]
        print(
            f"  {name}: step {1e3 * g['time']:.1f} ms; saved activations/rank {g['peak']:,} B "
            f"measured, {model[k]:,} B formula; sent/rank {g['sent']:,} B measured (gloo), "
            f"{ring[k]:,} B ring model"
        )
    gap = (got["dtensor"]["y"] - got["sp"]["y"]).abs().max().item()
    print(
        f"  DTensor SP : step {1e3 * got['dtensor']['time']:.1f} ms; max |y - cai_labs y| {gap:.1e}"
    )
    tp, spr = got["tp"], got["sp"]
    serial = _serial_saved_bytes()
    print(f"  serial     : saved activations {serial:,} B measured (one process)")
    print(f"TP+SP saved activations x {t} / serial (measured): {t * spr['peak'] / serial:.4f}")
    print(f"TP+SP / TP saved-activation ratio (measured): {spr['peak'] / tp['peak']:.3f}")
    print(f"TP+SP / TP bytes sent ratio (measured):       {spr['sent'] / tp['sent']:.3f}")
    print(f"TP+SP / TP step-time ratio:                   {spr['time'] / tp['time']:.2f}")
    print(
        f"cai_labs / DTensor SP step-time ratio:        {spr['time'] / got['dtensor']['time']:.2f}"
    )


if __name__ == "__main__":
    main()
