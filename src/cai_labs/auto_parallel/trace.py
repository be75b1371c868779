"""Step 1 of auto-parallelism: turn an ordinary ``nn.Module`` into a graph with shapes.

``torch.fx`` runs the model's ``forward`` with proxy objects instead of tensors and records every
module call and function call as a node: ``placeholder`` (inputs), ``call_module`` (a conv, a
linear, a norm, ...), ``call_function`` (``operator.add``, ``torch.flatten``, ...) and ``output``.
Shape propagation then runs the graph once on *fake* tensors (``FakeTensorMode``: tensors that
carry shape and dtype but no data, so a model of any size is analysed in milliseconds) and stores
each node's output shape in ``node.meta["tensor_meta"]``.

Leaf modules are modules fx does not trace into. The GPT block's attention is one: its reshapes
between ``(b, s, d)`` and ``(b, h, s, d/h)`` are not modelled by the strategies, so attention is
one node with its own strategies (batch or heads; see :mod:`cai_labs.auto_parallel.strategies`).

:func:`profile_saved` measures, on one real run of the serial graph, which values autograd keeps
for backward, so the cost model can predict activation memory without guessing each op's habits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

from cai_labs.models.gpt import CausalSelfAttention

__all__ = ["AutoTracer", "trace", "node_shape", "SavedProfile", "profile_saved"]

DEFAULT_LEAVES: tuple[type[nn.Module], ...] = (CausalSelfAttention,)


class AutoTracer(fx.Tracer):
    """fx tracer that keeps ``leaves`` (and PyTorch's own ``nn`` modules) as single nodes."""

    def __init__(self, leaves: Iterable[type[nn.Module]] = DEFAULT_LEAVES) -> None:
        super().__init__()
        self.leaves = tuple(leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def trace(
    model: nn.Module,
    *example_inputs: torch.Tensor,
    leaves: Iterable[type[nn.Module]] = DEFAULT_LEAVES,
) -> fx.GraphModule:
    """Symbolically trace ``model`` and annotate every node with its output shape.

    ``example_inputs`` give shapes and dtypes only: they are converted to fake tensors, so no
    arithmetic runs. Returns a ``GraphModule`` that shares ``model``'s parameters.
    """
    graph = AutoTracer(leaves).trace(model)
    gm = fx.GraphModule(model, graph)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(t) for t in example_inputs]
    ShapeProp(gm, fake_mode=mode).propagate(*fake)
    return gm


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    """Output shape of a traced node, or None when it is not a single tensor."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


@dataclass
class SavedProfile:
    """What autograd saved for backward in one serial forward, per node name.

    ``value_saved[n]``: node ``n``'s output tensor was kept (by ``n`` itself, e.g. ReLU keeps its
    result, or by a consumer, e.g. a conv keeps its input). ``internal_bytes[n]``: bytes of other
    tensors ``n`` saved (batch-norm statistics, attention scores, ...). Parameters are excluded:
    they are accounted as parameters. ``saved_by[n]``: the nodes that kept ``n``'s output (``n``
    itself included when it keeps its own result); a sharding plan may hand each consumer a
    different copy, so who keeps what matters.
    """

    value_saved: dict[str, bool]
    internal_bytes: dict[str, int]
    saved_by: dict[str, set[str]]


class _SaveRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in gm.parameters()}
        self.out_ptr: dict[int, str] = {}
        self.saved: dict[str, dict[int, int]] = {}

    def run_node(self, n: fx.Node) -> Any:
        record: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() not in self.param_ptrs:
                record[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = super().run_node(n)
        self.saved[n.name] = record
        if isinstance(out, torch.Tensor):
            # the latest producer: a freed tensor's address may be reused by a later one
            self.out_ptr[out.untyped_storage().data_ptr()] = n.name
        return out


def profile_saved(gm: fx.GraphModule, *inputs: torch.Tensor) -> SavedProfile:
    """Run ``gm`` once on real ``inputs`` and attribute every saved tensor to a node."""
    rec = _SaveRecorder(gm)
    rec.run(*inputs)
    value_saved = {n.name: False for n in gm.graph.nodes}
    internal = {n.name: 0 for n in gm.graph.nodes}
    saved_by: dict[str, set[str]] = {n.name: set() for n in gm.graph.nodes}
    for name, record in rec.saved.items():
        for ptr, nbytes in record.items():
            producer = rec.out_ptr.get(ptr)
            if producer is not None:
                value_saved[producer] = True
                saved_by[producer].add(name)
            else:
                internal[name] += nbytes
    return SavedProfile(value_saved, internal, saved_by)
