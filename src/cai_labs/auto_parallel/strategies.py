"""Step 2: the legal shardings of every op over a 2-D device mesh, with their costs.

The mesh
--------
Four ranks are arranged as a ``2 x 2`` grid; rank ``r`` sits at ``(r // 2, r % 2)``. Mesh *axis
0* groups ranks that differ in the first coordinate (``{0, 2}`` and ``{1, 3}``), *axis 1* those
that differ in the second (``{0, 1}``, ``{2, 3}``). Each axis can shard a different tensor
dimension, which is how 2-D plans such as "data parallel across axis 0, tensor parallel across
axis 1" arise.

Layouts (what is modelled)
--------------------------
A tensor's *layout* says, for each mesh axis, one of

* ``R``: replicated along that axis;
* ``B``: its batch dimension (dim 0) is split along that axis;
* ``F``: its feature dimension is split (channels, dim 1, for ``(b, c, h, w)`` and 2-D tensors;
  the last dim for ``(b, s, d)``).

When both axes split the same dimension it is split 4 ways, chunk ``2 * c0 + c1``. Partial sums
exist only *inside* an op (see row parallel below) and are reduced before the op's output leaves
it. Not modelled: sharding of spatial or sequence dimensions, reduce-scatter outputs (Megatron's
sequence parallelism), pipeline stages, uneven splits.

Strategies per op (``roles``, one per mesh axis)
------------------------------------------------
* conv / linear: ``B`` batch (input and output split on batch, weight replicated, its gradient
  all-reduced along the axis), ``C`` column (input replicated, weight split on output
  features/channels, output split on features; the input gradient is all-reduced in backward,
  Megatron's *f*), ``W`` row (input split on input features, weight split on input features,
  partial outputs all-reduced in forward, Megatron's *g*; bias added after), ``R`` replicate.
* attention (a leaf node of the GPT block): ``B`` batch, ``H`` heads (Megatron attention:
  column-parallel QKV by heads, row-parallel output projection), ``R``.
* batch norm: any layout; a batch split makes it a *synchronised* batch norm (statistics
  all-reduced along the batch axes, so the result equals the serial one).
* layer norm: ``R`` or ``B`` on each axis (it normalises the feature dim, which therefore stays
  whole).
* element-wise ops, pooling, ``add``, ``flatten``: any layout, the same on inputs and output.
* anything else: replicated on every rank (always legal, never cheap).

Costs
-----
Each :class:`Strategy` carries the forward FLOPs and bytes it touches *on one rank*, the bytes of
its parameters on one rank, and the collectives it needs (:class:`Comm`: op, mesh axes, buffer
bytes, forward or backward). :func:`reshard_steps` gives the collectives that turn one layout
into another: all-gather a split dimension (backward: keep one's own chunk), slice it (backward:
all-gather). The machine-dependent prices are in :mod:`cai_labs.auto_parallel.cost_model`.
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from cai_labs.auto_parallel.trace import SavedProfile, node_shape
from cai_labs.models.gpt import CausalSelfAttention

__all__ = [
    "Mesh",
    "Layout",
    "Comm",
    "Strategy",
    "Edge",
    "NodeInfo",
    "StrategyGraph",
    "feature_dim",
    "local_shape",
    "reshard_steps",
    "reshard_comm",
    "build_strategy_graph",
    "ROLE_NAMES",
]

Layout = tuple[str, ...]  # one of "R", "B", "F" per mesh axis
ROLE_NAMES = {
    "B": "batch",
    "C": "column",
    "W": "row",
    "H": "heads",
    "R": "replicate",
    "F": "feature",
}
FLOAT_BYTES = 4


@dataclass(frozen=True)
class Mesh:
    """A 2-D grid of ranks, ``shape = (n0, n1)``; rank ``r`` is at ``(r // n1, r % n1)``."""

    shape: tuple[int, int] = (2, 2)

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def coords(self, rank: int) -> tuple[int, int]:
        return rank // self.shape[1], rank % self.shape[1]

    def ways(self, axes: tuple[int, ...]) -> int:
        """Number of chunks when a dimension is split along ``axes``."""
        return math.prod(self.shape[a] for a in axes)

    def chunk(self, axes: tuple[int, ...], rank: int) -> int:
        """Which chunk rank ``rank`` holds when a dimension is split along ``axes`` (in order)."""
        c, idx = self.coords(rank), 0
        for a in axes:
            idx = idx * self.shape[a] + c[a]
        return idx

    def group_ranks(self, axes: tuple[int, ...], rank: int) -> list[int]:
        """Ranks that share ``rank``'s coordinates on the other axes, ordered by chunk."""
        c = self.coords(rank)
        out = []
        for r in range(self.size):
            rc = self.coords(r)
            if all(rc[a] == c[a] for a in range(2) if a not in axes):
                out.append(r)
        return sorted(out, key=lambda r: self.chunk(axes, r))


def feature_dim(ndim: int) -> int:
    """Dim split by ``F``: channels (1) of NCHW and of 2-D tensors, else the last dim."""
    return 1 if ndim in (2, 4) else ndim - 1


def axes_of(layout: Layout, symbol: str) -> tuple[int, ...]:
    return tuple(a for a, s in enumerate(layout) if s == symbol)


def split_dims(layout: Layout, ndim: int) -> dict[int, tuple[int, ...]]:
    """``{tensor dim: mesh axes splitting it}`` for dims that are split."""
    out = {}
    if axes_of(layout, "B"):
        out[0] = axes_of(layout, "B")
    if axes_of(layout, "F"):
        out[feature_dim(ndim)] = axes_of(layout, "F")
    return out


def local_shape(shape: tuple[int, ...], layout: Layout, mesh: Mesh) -> tuple[int, ...]:
    s = list(shape)
    for d, axes in split_dims(layout, len(shape)).items():
        s[d] //= mesh.ways(axes)
    return tuple(s)


def layout_valid(shape: tuple[int, ...] | None, layout: Layout, mesh: Mesh) -> bool:
    if shape is None or len(shape) < 2:
        return all(s == "R" for s in layout)
    if axes_of(layout, "B") and axes_of(layout, "F") and feature_dim(len(shape)) == 0:
        return False
    return all(shape[d] % mesh.ways(ax) == 0 for d, ax in split_dims(layout, len(shape)).items())


def numel(shape: tuple[int, ...] | None) -> int:
    return math.prod(shape) if shape else 1


@dataclass(frozen=True)
class Comm:
    """One collective: ``op`` over the group of mesh ``axes``; ``nbytes`` is the full buffer."""

    op: str  # "all_reduce" or "all_gather"
    axes: tuple[int, ...]
    nbytes: int
    phase: str  # "fwd" or "bwd"


@dataclass
class Strategy:
    """One way to run a node; ``roles`` per mesh axis (see the module docstring)."""

    roles: tuple[str, ...]
    in_layouts: tuple[Layout, ...]
    out_layout: Layout
    flops: float = 0.0  # forward FLOPs on one rank
    bytes_moved: float = 0.0  # forward bytes read + written on one rank (memory-bound ops)
    param_bytes: int = 0  # parameter bytes on one rank
    comm: tuple[Comm, ...] = ()
    split: int = 1  # how many ways the node's work is divided
    kind: str = "matmul"  # which measured FLOP rate prices ``flops``: "conv" or "matmul"

    @property
    def name(self) -> str:
        return "".join(self.roles)

    def describe(self) -> str:
        return ", ".join(f"axis {a}: {ROLE_NAMES[r]}" for a, r in enumerate(self.roles))


@dataclass
class Edge:
    """Tensor from ``src`` into argument ``pos`` of ``dst``."""

    src: str
    dst: str
    pos: int
    shape: tuple[int, ...] | None
    needs_grad: bool
    consumer_saves: bool = False  # ``dst`` keeps this input for its backward


@dataclass
class NodeInfo:
    name: str
    op: str  # short kind for tables
    node: fx.Node
    strategies: list[Strategy]
    shape: tuple[int, ...] | None
    value_saved: bool = False  # kept by anyone (serial profile)
    internal_saved: int = 0
    self_saved: bool = False  # kept by the node itself (e.g. ReLU keeps its result)


@dataclass
class StrategyGraph:
    """The traced graph with every node's strategies and every edge: the solver's input."""

    gm: fx.GraphModule
    mesh: Mesh
    nodes: dict[str, NodeInfo]
    edges: list[Edge] = field(default_factory=list)

    def strategy(self, plan: dict[str, int], name: str) -> Strategy:
        return self.nodes[name].strategies[plan[name]]


def reshard_steps(src: Layout, dst: Layout, ndim: int) -> list[tuple[str, int, tuple[int, ...]]]:
    """Steps turning layout ``src`` into ``dst``: ``("gather"|"slice", tensor dim, mesh axes)``.

    First every dim whose splitting changes is gathered whole, then it is split the new way. A
    gather's backward keeps the local chunk of the gradient; a slice's backward all-gathers it.
    """
    s, d = split_dims(src, ndim), split_dims(dst, ndim)
    steps = []
    for dim in sorted(set(s) | set(d)):
        if s.get(dim) != d.get(dim) and dim in s:
            steps.append(("gather", dim, s[dim]))
    for dim in sorted(set(s) | set(d)):
        if s.get(dim) != d.get(dim) and dim in d:
            steps.append(("slice", dim, d[dim]))
    return steps


def reshard_comm(
    shape: tuple[int, ...] | None, src: Layout, dst: Layout, mesh: Mesh, needs_grad: bool
) -> list[Comm]:
    """Collectives (with buffer bytes) of :func:`reshard_steps` for a tensor of ``shape``."""
    if shape is None or src == dst:
        return []
    cur = list(local_shape(shape, src, mesh))
    out = []
    for kind, dim, axes in reshard_steps(src, dst, len(shape)):
        if kind == "gather":
            cur[dim] *= mesh.ways(axes)
            out.append(Comm("all_gather", axes, numel(cur) * FLOAT_BYTES, "fwd"))
        else:
            if needs_grad:
                out.append(Comm("all_gather", axes, numel(cur) * FLOAT_BYTES, "bwd"))
            cur[dim] //= mesh.ways(axes)
    return out


# -- strategies per op ------------------------------------------------------------------------
_PASSTHROUGH_MODULES = (
    nn.ReLU,
    nn.GELU,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Identity,
    nn.Flatten,
    nn.Tanh,
    nn.SiLU,
)
_PASSTHROUGH_FUNCS = (
    operator.add,
    torch.add,
    torch.flatten,
    torch.relu,
    nn.functional.relu,
    nn.functional.gelu,
)
ALL_LAYOUTS: list[Layout] = list(itertools.product("RBF", repeat=2))


def _grad_sync(axes: tuple[int, ...], params: list[int]) -> list[Comm]:
    """Gradient all-reduce of replicated parameters used on a batch split (one per tensor)."""
    return [Comm("all_reduce", axes, b, "bwd") for b in params] if axes else []


def _matmul_strategies(
    mod: nn.Module,
    in_shape: tuple[int, ...] | None,
    out_shape: tuple[int, ...] | None,
    mesh: Mesh,
    needs_grad: bool,
) -> list[Strategy]:
    """Conv2d / Linear: roles B, C (column), W (row), R on each axis."""
    w = mod.weight
    fan_in = w[0].numel() // (w.shape[1])  # kernel size (1 for linear)
    full_flops = 2.0 * numel(out_shape) * w.shape[1] * fan_in
    has_bias = mod.bias is not None
    out = []
    for roles in itertools.product("BCWR", repeat=2):
        b_ax, c_ax, w_ax = axes_of(roles, "B"), axes_of(roles, "C"), axes_of(roles, "W")
        in_l = tuple({"B": "B", "C": "R", "W": "F", "R": "R"}[r] for r in roles)
        out_l = tuple({"B": "B", "C": "F", "W": "R", "R": "R"}[r] for r in roles)
        if not (layout_valid(in_shape, in_l, mesh) and layout_valid(out_shape, out_l, mesh)):
            continue
        if w.shape[0] % mesh.ways(c_ax) or w.shape[1] % mesh.ways(w_ax):
            continue
        split = mesh.ways(b_ax) * mesh.ways(c_ax) * mesh.ways(w_ax)
        wb = w.numel() * FLOAT_BYTES // (mesh.ways(c_ax) * mesh.ways(w_ax))
        bb = (mod.bias.numel() * FLOAT_BYTES // mesh.ways(c_ax)) if has_bias else 0
        comm = []
        if c_ax and needs_grad:  # Megatron f: input gradient summed over the column split
            comm.append(
                Comm(
                    "all_reduce",
                    c_ax,
                    numel(local_shape(in_shape, in_l, mesh)) * FLOAT_BYTES,
                    "bwd",
                )
            )
        if w_ax:  # Megatron g: partial outputs summed over the row split
            partial = list(local_shape(out_shape, out_l, mesh))
            comm.append(Comm("all_reduce", w_ax, numel(partial) * FLOAT_BYTES, "fwd"))
        comm += _grad_sync(b_ax, [wb] + ([bb] if has_bias else []))
        out.append(
            Strategy(
                roles,
                (in_l,),
                out_l,
                flops=full_flops / split,
                bytes_moved=numel(out_shape) * FLOAT_BYTES / split,
                param_bytes=wb + bb,
                comm=tuple(comm),
                split=split,
                kind="conv" if isinstance(mod, nn.Conv2d) else "matmul",
            )
        )
    return out


def _attention_strategies(
    mod: CausalSelfAttention, shape: tuple[int, ...], mesh: Mesh, needs_grad: bool
) -> list[Strategy]:
    """GPT attention leaf: roles B (batch), H (heads), R."""
    b, s, d = shape
    full_flops = 2.0 * b * s * d * 3 * d + 4.0 * b * s * s * d + 2.0 * b * s * d * d
    out = []
    for roles in itertools.product("BHR", repeat=2):
        b_ax, h_ax = axes_of(roles, "B"), axes_of(roles, "H")
        lay = tuple("B" if r == "B" else "R" for r in roles)
        if not layout_valid(shape, lay, mesh) or mod.n_heads % mesh.ways(h_ax):
            continue
        split = mesh.ways(b_ax) * mesh.ways(h_ax)
        nh = mesh.ways(h_ax)
        sizes = [
            mod.qkv.weight.numel() // nh,
            mod.qkv.bias.numel() // nh,
            mod.proj.weight.numel() // nh,
        ]
        sizes = [n * FLOAT_BYTES for n in sizes]
        proj_bias = mod.proj.bias.numel() * FLOAT_BYTES
        local = numel(local_shape(shape, lay, mesh)) * FLOAT_BYTES
        comm = []
        if h_ax:
            comm.append(Comm("all_reduce", h_ax, local, "fwd"))
            if needs_grad:
                comm.append(Comm("all_reduce", h_ax, local, "bwd"))
        comm += _grad_sync(b_ax, sizes + [proj_bias])
        out.append(
            Strategy(
                roles,
                (lay,),
                lay,
                flops=full_flops / split,
                bytes_moved=8.0 * b * s * s * mod.n_heads / split,
                param_bytes=sum(sizes) + proj_bias,
                comm=tuple(comm),
                split=split,
            )
        )
    return out


def _norm_strategies(
    mod: nn.Module, shape: tuple[int, ...] | None, mesh: Mesh, allow_feature: bool
) -> list[Strategy]:
    """Batch norm (any layout; batch split = synchronised) or layer norm (no feature split)."""
    out = []
    for lay in ALL_LAYOUTS:
        if (not allow_feature and "F" in lay) or not layout_valid(shape, lay, mesh):
            continue
        b_ax, f_ax = axes_of(lay, "B"), axes_of(lay, "F")
        split = mesh.ways(b_ax) * mesh.ways(f_ax)
        pbytes = [p.numel() * FLOAT_BYTES // mesh.ways(f_ax) for p in mod.parameters()]
        comm = []
        if isinstance(mod, nn.BatchNorm2d) and b_ax:
            c = shape[1] // mesh.ways(f_ax) * FLOAT_BYTES
            comm += [
                Comm("all_reduce", b_ax, c, "fwd"),
                Comm("all_reduce", b_ax, c, "fwd"),
                Comm("all_reduce", b_ax, 2 * c, "bwd"),
            ]
        comm += _grad_sync(b_ax, pbytes)
        out.append(
            Strategy(
                lay,
                (lay,),
                lay,
                flops=8.0 * numel(shape) / split,
                bytes_moved=3.0 * numel(shape) * FLOAT_BYTES / split,
                param_bytes=sum(pbytes),
                comm=tuple(comm),
                split=split,
            )
        )
    return out


def _passthrough_strategies(
    n_inputs: int,
    in_shapes: list[tuple[int, ...] | None],
    out_shape: tuple[int, ...] | None,
    mesh: Mesh,
) -> list[Strategy]:
    out = []
    for lay in ALL_LAYOUTS:
        if all(layout_valid(s, lay, mesh) for s in (*in_shapes, out_shape)):
            split = mesh.ways(axes_of(lay, "B")) * mesh.ways(axes_of(lay, "F"))
            out.append(
                Strategy(
                    lay,
                    (lay,) * n_inputs,
                    lay,
                    flops=numel(out_shape) / split,
                    bytes_moved=2.0 * numel(out_shape) * FLOAT_BYTES / split,
                    split=split,
                )
            )
    return out


def _replicate_strategy(n_inputs: int, out_shape: tuple[int, ...] | None, params: int) -> Strategy:
    rr = ("R", "R")
    return Strategy(
        rr,
        (rr,) * n_inputs,
        rr,
        flops=float(numel(out_shape or ())),
        bytes_moved=2.0 * numel(out_shape or ()) * FLOAT_BYTES,
        param_bytes=params,
    )


def _kind(node: fx.Node, mod: nn.Module | None) -> str:
    if node.op == "call_module":
        return type(mod).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def _passes_through(node: fx.Node, mod: nn.Module | None, in_shapes: list) -> bool:
    """Element-wise or reshaping ops whose output layout is their input's."""
    if isinstance(mod, _PASSTHROUGH_MODULES) or (isinstance(mod, nn.Dropout) and mod.p == 0):
        return True
    return (
        node.op == "call_function"
        and node.target in _PASSTHROUGH_FUNCS
        and (node.target is not torch.flatten or len(in_shapes[0] or ()) == 4)
    )


def _node_strategies(
    node: fx.Node,
    mod: nn.Module | None,
    in_shapes: list,
    shape: tuple[int, ...] | None,
    mesh: Mesh,
    first_needs: bool,
) -> list[Strategy]:
    """The legal strategies of one node; replicate it when none applies."""
    n_in = len(in_shapes)
    if node.op == "placeholder":
        strategies = [Strategy(("R", "R"), (), ("R", "R"))]
    elif node.op == "output":
        strategies = [Strategy(("R", "R"), (("R", "R"),) * n_in, ("R", "R"))]
    elif isinstance(mod, (nn.Conv2d, nn.Linear)) and (
        not isinstance(mod, nn.Conv2d) or mod.groups == 1
    ):
        strategies = _matmul_strategies(mod, in_shapes[0], shape, mesh, first_needs)
    elif isinstance(mod, CausalSelfAttention):
        strategies = _attention_strategies(mod, shape, mesh, first_needs)
    elif isinstance(mod, nn.BatchNorm2d):
        strategies = _norm_strategies(mod, shape, mesh, allow_feature=True)
    elif isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1:
        strategies = _norm_strategies(mod, shape, mesh, allow_feature=False)
    elif _passes_through(node, mod, in_shapes):
        strategies = _passthrough_strategies(n_in, in_shapes, shape, mesh)
    else:
        strategies = []
    if not strategies:  # unknown op, or nothing divides evenly: replicate it
        params = sum(p.numel() for p in mod.parameters()) * FLOAT_BYTES if mod else 0
        strategies = [_replicate_strategy(n_in, shape, params)]
    return strategies


def build_strategy_graph(
    gm: fx.GraphModule, mesh: Mesh, profile: SavedProfile | None = None
) -> StrategyGraph:
    """Enumerate every node's legal strategies on ``mesh`` and list the graph's edges.

    ``gm`` comes from :func:`~cai_labs.auto_parallel.trace.trace` (shapes in ``node.meta``);
    ``profile`` (from :func:`~cai_labs.auto_parallel.trace.profile_saved`) says which values
    autograd keeps, for the memory model.
    """
    if mesh.shape != (2, 2) and any(s % 1 for s in mesh.shape):
        raise ValueError(f"mesh shape must be two positive integers; got {mesh.shape}")
    nodes: dict[str, NodeInfo] = {}
    edges: list[Edge] = []
    grad_values: set[str] = set()  # values that depend on parameters (need gradients)
    for node in gm.graph.nodes:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        tensor_args = [a for a in node.all_input_nodes]
        in_shapes = [node_shape(a) for a in tensor_args]
        shape = node_shape(node)
        needs_grad = any(a.name in grad_values for a in tensor_args)
        if (mod is not None and any(True for _ in mod.parameters())) or needs_grad:
            grad_values.add(node.name)
        first_needs = bool(tensor_args) and tensor_args[0].name in grad_values
        strategies = _node_strategies(node, mod, in_shapes, shape, mesh, first_needs)
        nodes[node.name] = NodeInfo(
            node.name,
            _kind(node, mod),
            node,
            strategies,
            shape,
            value_saved=bool(profile and profile.value_saved.get(node.name)),
            internal_saved=profile.internal_bytes.get(node.name, 0) if profile else 0,
            self_saved=bool(profile and node.name in profile.saved_by.get(node.name, ())),
        )
        if node.op == "output":  # the loss keeps the model's output for its backward
            for a in tensor_args:
                nodes[a.name].value_saved = True
        for pos, a in enumerate(tensor_args):
            keeps = node.op == "output" or bool(
                profile and node.name in profile.saved_by.get(a.name, ())
            )
            edges.append(
                Edge(
                    a.name,
                    node.name,
                    pos,
                    node_shape(a),
                    a.name in grad_values,
                    consumer_saves=keeps,
                )
            )
    return StrategyGraph(gm, mesh, nodes, edges)
