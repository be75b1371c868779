"""Run under torchrun: launch 1, 2, 4 and all ranks in turn, as a page does."""

import os
import sys

import torch
import torch.distributed as dist

from cai_labs import device, launch


def worker(tag: str) -> dict:
    t = torch.ones(1, device=device()) * dist.get_rank()
    dist.all_reduce(t)
    print(f"{tag}: rank {dist.get_rank()} of {dist.get_world_size()} says hi")
    return {
        "tag": tag,
        "world": dist.get_world_size(),
        "sum": t.item(),
        "env_world": int(os.environ["WORLD_SIZE"]),
    }


world = int(os.environ["WORLD_SIZE"])
if len(sys.argv) > 1:  # ask for more ranks than torchrun started
    launch(worker, world + 1, "too many")
for n in sorted({1, 2, 4, world}):
    if n <= world:
        out = launch(worker, n, f"n={n}")
        assert out == {"tag": f"n={n}", "world": n, "sum": n * (n - 1) / 2, "env_world": n}, out
        print(f"launch {n} of {world}: ok {out}")
assert not dist.is_initialized() and int(os.environ["WORLD_SIZE"]) == world
print("all launches done")
big = launch(lambda: torch.arange(3 * 2**20, dtype=torch.float64), 2)  # 24 MiB: several pieces
assert torch.equal(big, torch.arange(3 * 2**20, dtype=torch.float64))
print("a 24 MiB result came back")
# Each process computes its own argument (here its RANK), as a page's serial cells may; every
# member of the launch must get rank 0's, as forked ranks get their parent's.
mine = os.environ["RANK"]


def every_rank_argument(arg: str) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, arg)
    return out


seen = launch(every_rank_argument, 4, mine)
assert seen == ["0"] * 4, seen
print("every member got rank 0's arguments")
