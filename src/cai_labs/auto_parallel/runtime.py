"""Step 5: rewrite the traced graph for one rank under a plan, and run it SPMD.

Every rank builds the same rewritten graph and runs it on its own shards (SPMD: single program,
multiple data). :func:`parallelize` walks the serial ``fx`` graph in order and, for each node:

* inserts a ``reshard`` node before any input whose layout differs from what the node's strategy
  needs (all-gather and slice steps of :func:`~cai_labs.auto_parallel.strategies.reshard_steps`);
* replaces each module with its sharded twin holding only this rank's slice of the weights
  (:class:`ShardedLinear`, :class:`ShardedConv2d`, :class:`ShardedBatchNorm2d`,
  :class:`ShardedAttention`), which perform the op's own collectives (Megatron's *f* and *g*,
  synchronised batch-norm statistics);
* registers, for every parameter that is replicated along an axis whose ranks see different
  samples (a batch split), a hook that all-reduces its gradient along that axis once it is
  accumulated.

The output is gathered to be whole on every rank, so a loss written for the serial model works
unchanged, and ``loss.backward()`` produces on every rank the gradient slices of the serial
gradient. Every collective is a mapping of :mod:`cai_labs.comm`, whose backward is its exact
transpose:

==========================  ==========================  ==========================
op                          forward                     backward
==========================  ==========================  ==========================
gather (split -> whole)     all-gather                  keep own chunk (a copy)
slice (whole -> split)      keep own chunk (a copy)     all-gather
f (column input)            identity                    all-reduce
g (row output)              all-reduce                  identity
==========================  ==========================  ==========================
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import fx, nn
from torch.autograd.function import FunctionCtx

from cai_labs.auto_parallel.strategies import (
    Mesh,
    Strategy,
    StrategyGraph,
    axes_of,
    reshard_steps,
)
from cai_labs.comm import (
    all_reduce_,
    copy_to_group,
    gather_from_group,
    reduce_from_group,
    scatter_to_group,
)
from cai_labs.devices import device
from cai_labs.models.gpt import CausalSelfAttention

__all__ = [
    "MeshGroups",
    "reshard",
    "Reshard",
    "parallelize",
    "SPMDModule",
    "ShardedLinear",
    "ShardedConv2d",
    "ShardedBatchNorm2d",
    "ShardedAttention",
    "measure_step",
]


class MeshGroups:
    """The process groups of a :class:`Mesh` for this rank (create on every rank, same order)."""

    def __init__(self, mesh: Mesh) -> None:
        if dist.get_world_size() != mesh.size:
            raise ValueError(
                f"a {mesh.shape[0]} x {mesh.shape[1]} mesh needs {mesh.size} ranks; "
                f"launched with {dist.get_world_size()}"
            )
        self.mesh, self.rank = mesh, dist.get_rank()
        self._groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        for axes in ((0,), (1,), (0, 1)):
            seen = set()
            for r in range(mesh.size):
                ranks = tuple(mesh.group_ranks(axes, r))
                if ranks in seen:
                    continue
                seen.add(ranks)
                g = dist.new_group(list(ranks))
                if self.rank in ranks:
                    self._groups[axes] = g

    def group(self, axes: tuple[int, ...]) -> dist.ProcessGroup:
        return self._groups[tuple(axes)]

    def ranks(self, axes: tuple[int, ...]) -> list[int]:
        return self.mesh.group_ranks(tuple(axes), self.rank)

    def chunk(self, axes: tuple[int, ...]) -> int:
        return self.mesh.chunk(tuple(axes), self.rank)

    def ways(self, axes: tuple[int, ...]) -> int:
        return self.mesh.ways(tuple(axes))


# -- resharding: the gather / slice mappings of cai_labs.comm ---------------------------------
def reshard(x: torch.Tensor, src: tuple, dst: tuple, mg: MeshGroups) -> torch.Tensor:
    """Change ``x``'s layout from ``src`` to ``dst`` (the steps of ``reshard_steps``)."""
    for kind, dim, axes in reshard_steps(src, dst, x.dim()):
        move = gather_from_group if kind == "gather" else scatter_to_group
        x = move(x, mg.group(axes), dim, copy=True)
    return x


class Reshard(nn.Module):
    """A graph node changing its input's layout from ``src`` to ``dst`` (see :func:`reshard`)."""

    def __init__(self, src: tuple, dst: tuple, mg: MeshGroups) -> None:
        super().__init__()
        self.src, self.dst, self.mg = src, dst, mg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reshard(x, self.src, self.dst, self.mg)

    def extra_repr(self) -> str:
        return f"{''.join(self.src)} -> {''.join(self.dst)}"


def _f(x: torch.Tensor, mg: MeshGroups, axes: tuple) -> torch.Tensor:
    """Megatron's *f* (column input): identity forward, all-reduce of the gradient."""
    return copy_to_group(x, mg.group(axes)) if axes else x


def _g(x: torch.Tensor, mg: MeshGroups, axes: tuple) -> torch.Tensor:
    """Megatron's *g* (row output): all-reduce of the partial sums, identity backward."""
    return reduce_from_group(x, mg.group(axes)) if axes else x


# -- sharded modules ---------------------------------------------------------------------------
class _Sharded(nn.Module):
    """Keeps, for each local parameter, how to cut it out of (and embed it into) the serial one."""

    def _shard(self, name: str, full: torch.Tensor, index: dict[int, torch.Tensor]) -> None:
        local = full.detach()
        for dim, idx in index.items():
            local = local.index_select(dim, idx.to(local.device))
        self.register_parameter(name, nn.Parameter(local.clone()))
        self.shard_index[name] = index

    def embed(self, name: str, local: torch.Tensor, full_shape: tuple[int, ...]) -> torch.Tensor:
        """A zero tensor of the serial parameter's shape with ``local`` written into its slot."""
        out = torch.zeros(full_shape, dtype=local.dtype, device=local.device)
        index = self.shard_index[name]
        grid = [index.get(d, torch.arange(full_shape[d])) for d in range(len(full_shape))]
        grid = [g.to(local.device) for g in grid]
        out[torch.meshgrid(*grid, indexing="ij")] = local
        return out


def _range(n: int, ways: int, k: int) -> torch.Tensor:
    step = n // ways
    return torch.arange(k * step, (k + 1) * step)


class ShardedLinear(_Sharded):
    """``nn.Linear`` split by column axes ``c`` (output features) and row axes ``w`` (input)."""

    def __init__(self, mod: nn.Module, c: tuple, w: tuple, mg: MeshGroups) -> None:
        super().__init__()
        self.c, self.w, self.mg, self.shard_index = c, w, mg, {}
        out_f, in_f = mod.weight.shape[:2]
        rows = _range(out_f, mg.ways(c), mg.chunk(c)) if c else None
        cols = _range(in_f, mg.ways(w), mg.chunk(w)) if w else None
        self._shard(
            "weight", mod.weight, {d: i for d, i in ((0, rows), (1, cols)) if i is not None}
        )
        self.has_bias = mod.bias is not None
        if self.has_bias:
            self._shard("bias", mod.bias, {0: rows} if rows is not None else {})

    def _op(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _g(self._op(_f(x, self.mg, self.c)), self.mg, self.w)
        return self._add_bias(y) if self.has_bias else y


class ShardedConv2d(ShardedLinear):
    """``nn.Conv2d`` split by output channels (``c``) and input channels (``w``)."""

    def __init__(self, mod: nn.Conv2d, c: tuple, w: tuple, mg: MeshGroups) -> None:
        super().__init__(mod, c, w, mg)
        self.conf = dict(stride=mod.stride, padding=mod.padding, dilation=mod.dilation)

    def _op(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, None, **self.conf)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.bias.view(1, -1, 1, 1)


class _SyncBN(torch.autograd.Function):
    """Batch norm whose statistics are summed over the ranks that hold other parts of the batch.

    Saves only the input and per-channel statistics (like PyTorch's batch norm). Returns local
    (partial) weight and bias gradients; the gradient hooks sum them over the batch axes.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        eps: float,
        mg: MeshGroups,
        axes: tuple[int, ...],
    ) -> torch.Tensor:
        group = mg.group(axes)
        dims = (0, 2, 3)
        count = x.numel() // x.shape[1] * mg.ways(axes)
        s = all_reduce_(x.sum(dims), group)
        mean = s / count
        sq = all_reduce_(((x - mean[None, :, None, None]) ** 2).sum(dims), group)
        var = sq / count
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.args = (count, mg, axes)
        ctx.var = var
        shape = (1, -1, 1, 1)
        return (x - mean.view(shape)) * (invstd * weight).view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx: FunctionCtx, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        count, mg, axes = ctx.args
        shape, dims = (1, -1, 1, 1), (0, 2, 3)
        xhat = (x - mean.view(shape)) * invstd.view(shape)
        local = torch.stack([gy.sum(dims), (gy * xhat).sum(dims)])
        gbias, gweight = local[0].clone(), local[1].clone()
        sum_gy, sum_gy_xhat = all_reduce_(local, mg.group(axes))
        gx = (weight * invstd).view(shape) * (
            gy - sum_gy.view(shape) / count - xhat * sum_gy_xhat.view(shape) / count
        )
        return gx, gweight, gbias, None, None, None


class ShardedBatchNorm2d(_Sharded):
    """Batch norm on this rank's channels (``f`` axes), synchronised over batch axes ``b``."""

    def __init__(self, mod: nn.BatchNorm2d, b: tuple, f: tuple, mg: MeshGroups) -> None:
        super().__init__()
        self.b, self.mg, self.eps, self.momentum, self.shard_index = (
            b,
            mg,
            mod.eps,
            mod.momentum,
            {},
        )
        idx = {0: _range(mod.num_features, mg.ways(f), mg.chunk(f))} if f else {}
        self._shard("weight", mod.weight, idx)
        self._shard("bias", mod.bias, idx)
        for name in ("running_mean", "running_var"):
            buf = getattr(mod, name)
            self.register_buffer(name, buf.index_select(0, idx[0]).clone() if f else buf.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        if not self.b:
            return F.batch_norm(
                x,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                True,
                self.momentum,
                self.eps,
            )
        return _SyncBN.apply(x, self.weight, self.bias, self.eps, self.mg, self.b)


class ShardedAttention(_Sharded):
    """GPT attention on this rank's heads (``h`` axes): column QKV, row output projection."""

    def __init__(self, mod: CausalSelfAttention, h: tuple, mg: MeshGroups) -> None:
        super().__init__()
        self.h, self.mg, self.shard_index = h, mg, {}
        d = mod.proj.weight.shape[0]
        self.dh = d // mod.n_heads
        self.n_heads = mod.n_heads // mg.ways(h)
        heads = _range(mod.n_heads, mg.ways(h), mg.chunk(h))
        cols = (heads[:, None] * self.dh + torch.arange(self.dh)).flatten()  # this rank's dims
        qkv_rows = torch.cat([cols, cols + d, cols + 2 * d])
        self._shard("qkv_weight", mod.qkv.weight, {0: qkv_rows})
        self._shard("qkv_bias", mod.qkv.bias, {0: qkv_rows})
        self._shard("proj_weight", mod.proj.weight, {1: cols})
        self._shard("proj_bias", mod.proj.bias, {})
        self.register_buffer("causal", mod.causal.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        dl = self.n_heads * self.dh
        q, k, v = F.linear(_f(x, self.mg, self.h), self.qkv_weight, self.qkv_bias).split(dl, -1)
        q, k, v = (t.view(b, s, self.n_heads, self.dh).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / self.dh**0.5
        scores = scores.masked_fill(~self.causal[:s, :s], float("-inf"))
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, s, dl)
        return _g(F.linear(out, self.proj_weight), self.mg, self.h) + self.proj_bias


# -- the rewrite -------------------------------------------------------------------------------
class SPMDModule(nn.Module):
    """This rank's program: the rewritten graph, plus maps back to the serial parameters."""

    def __init__(
        self,
        gm: fx.GraphModule,
        origin: dict[str, tuple[str, str, tuple]],
        mg: MeshGroups,
        replicas: dict[str, int],
    ) -> None:
        super().__init__()
        self.gm, self.mg = gm, mg
        self.origin = origin  # local param name -> (module path, its param name, serial shape)
        self.replicas = replicas  # local param name -> ranks holding the same slice

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.gm(*args)

    def full_tensors(self, which: str = "grad") -> dict[str, torch.Tensor]:
        """Serial-shaped parameters (``"data"``) or gradients (``"grad"``), rebuilt on all ranks
        by summing every rank's slice (divided by the number of ranks holding the same slice)."""
        params = dict(self.gm.named_parameters())
        out = {}
        for name, (path, pname, shape) in self.origin.items():
            t = params[name] if which == "data" else params[name].grad
            mod = self.gm.get_submodule(path)
            t = torch.zeros_like(params[name]) if t is None else t.detach()
            full = mod.embed(pname, t, shape) if isinstance(mod, _Sharded) else t.clone()
            dist.all_reduce(full)
            serial_name = f"{path}.{pname}".replace("qkv_", "qkv.").replace("proj_", "proj.")
            out[serial_name] = full / self.replicas[name]
        return out


def _local_module(mod: nn.Module, strategy: Strategy, mg: MeshGroups) -> nn.Module:
    roles = strategy.roles
    if isinstance(mod, nn.Conv2d):
        return ShardedConv2d(mod, axes_of(roles, "C"), axes_of(roles, "W"), mg)
    if isinstance(mod, nn.Linear):
        return ShardedLinear(mod, axes_of(roles, "C"), axes_of(roles, "W"), mg)
    if isinstance(mod, nn.BatchNorm2d):
        return ShardedBatchNorm2d(mod, axes_of(roles, "B"), axes_of(roles, "F"), mg)
    if isinstance(mod, CausalSelfAttention):
        return ShardedAttention(mod, axes_of(roles, "H"), mg)
    return copy.deepcopy(mod)


def parallelize(sg: StrategyGraph, plan: dict[str, int], mg: MeshGroups) -> SPMDModule:
    """Build this rank's :class:`SPMDModule` for ``plan`` (``{node name: strategy index}``), on
    :func:`cai_labs.device`."""
    missing = set(sg.nodes) - set(plan)
    if missing:
        raise ValueError(f"the plan has no strategy for nodes {sorted(missing)[:5]}")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    modules: dict[str, nn.Module] = {}
    origin, replicas = {}, {}
    for node in sg.gm.graph.nodes:
        info = sg.nodes[node.name]
        s = info.strategies[plan[node.name]]
        inputs = node.all_input_nodes
        new_inputs = {}
        for pos, a in enumerate(inputs):
            src = sg.strategy(plan, a.name).out_layout
            dst = s.in_layouts[pos]
            v = env[a.name]
            if src != dst:
                target = f"reshard_{a.name}_to_{node.name}"
                modules[target] = Reshard(src, dst, mg)
                v = graph.call_module(target, (v,))
            new_inputs[a.name] = v
        if node.op == "call_module":
            mod = sg.gm.get_submodule(node.target)
            local = _local_module(mod, s, mg)
            modules[node.target] = local
            sync = axes_of(s.roles, "B") if any(True for _ in local.parameters()) else ()
            for pname, p in local.named_parameters():
                key = f"{node.target}.{pname}"
                shape = tuple(
                    mod.get_parameter(pname.replace("qkv_", "qkv.").replace("proj_", "proj.")).shape
                )
                origin[key] = (node.target, pname, shape)
                held = len(local.shard_index.get(pname, {})) if isinstance(local, _Sharded) else 0
                sharded_axes = _param_axes(s.roles, local, pname) if held else ()
                replicas[key] = mg.mesh.size // mg.ways(sharded_axes)
                if sync:
                    _sync_grad(p, mg, sync)
        new = graph.node_copy(node, lambda a, m=new_inputs: m[a.name])
        env[node.name] = new
    gm = fx.GraphModule(modules, graph)
    return SPMDModule(gm, origin, mg, replicas).to(device())


def _param_axes(roles: tuple[str, ...], local: nn.Module, pname: str) -> tuple[int, ...]:
    """Mesh axes along which a parameter is split (so it is replicated along the others)."""
    if isinstance(local, ShardedLinear):
        ax = axes_of(roles, "C") + (axes_of(roles, "W") if pname == "weight" else ())
        return tuple(sorted(ax))
    if isinstance(local, ShardedBatchNorm2d):
        return axes_of(roles, "F")
    if isinstance(local, ShardedAttention):
        return axes_of(roles, "H")
    return ()


def _sync_grad(p: nn.Parameter, mg: MeshGroups, axes: tuple[int, ...]) -> None:
    """Sum ``p``'s gradient over ``axes`` once backward has accumulated it."""
    group = mg.group(axes)

    def hook(param: torch.Tensor) -> None:
        dist.all_reduce(param.grad, group=group)

    p.register_post_accumulate_grad_hook(hook)


def measure_step(pm: SPMDModule, x: torch.Tensor, steps: int = 3) -> dict:
    """Time forward + backward of ``pm`` on ``x``, then measure this rank's memory with a ledger.

    The timed steps run under a light ledger that only times each collective (no socket
    counters, no activation tracking), so a step splits into seconds in collectives and the
    rest. The first step creates the gradients; the ledger's snapshot after it records
    parameters and gradients, so ``peak_total`` of one more step under a full ledger is
    parameters + gradients + the peak of activations saved for backward (what
    :func:`~cai_labs.auto_parallel.cost_model.plan_cost` predicts). Returns medians over the
    timed steps (the cost model's prices are medians too).
    """
    from cai_labs.ledger import Ledger, comm_totals

    x = x.to(device())

    def step() -> None:
        for p in pm.parameters():
            if p.grad is not None:
                p.grad.zero_()
        pm(x).square().mean().backward()

    step()
    times, comm_times = [], []
    with Ledger(track_activations=False, wire=False) as clock:
        for _ in range(steps):
            dist.barrier()
            first = len(clock.comm)
            start = time.perf_counter()
            step()
            if x.is_cuda:  # the kernels may still run when backward returns
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            comm_times.append(sum(c["seconds"] for c in clock.comm[first:]))
    with Ledger(model=pm) as ledger:
        ledger.snapshot("params and grads")
        step()
    report = ledger.report()
    comm = comm_totals({"comm": [c for c in report["comm"] if c["op"] != "barrier"]})
    return {
        "seconds": float(np.median(times)),
        "comm_seconds": float(np.median(comm_times)),
        "peak_total": report["memory"]["peak_total"],
        "peak_activations": report["memory"]["peak_activations"],
        "static": report["memory"]["snapshots"][0]["total"],
        "comm_calls": sum(v["calls"] for v in comm.values()),
    }
