"""Memory per GPU: model states (ZeRO's formula) and activations (Korthikanti et al. 2022).

Built on the technique formulas the tests check against the ledger on CPU ranks:
:func:`cai_labs.tensor_parallel.formulas.linear_cost` (parameters of each split linear),
:func:`cai_labs.zero.formulas.zero_memory_formula` (parameters, gradients, optimizer state per
rank), :func:`cai_labs.tensor_parallel.formulas.layer_activation_bytes` (one layer's saved
activations with TP, SP and recomputation) and
:func:`cai_labs.pipeline.formulas.in_flight_microbatches` (how many a stage holds).

The busiest pipeline stage sets the need: ``ceil(L/pp)`` layers plus the (vocabulary-split)
embedding on the first stage or the head on the last, whichever is larger. ZeRO shards over the
``dp x sp`` ranks that hold the same parameters. The last stage also keeps the fp32 logits of
one micro-batch for the loss (``4 b s V / tp``).
"""

from __future__ import annotations

import math

from cai_labs.pipeline.formulas import in_flight_microbatches
from cai_labs.scale.layout import ScaleLayout
from cai_labs.scale.models import ModelShape
from cai_labs.tensor_parallel.formulas import Cost, layer_activation_bytes, linear_cost
from cai_labs.zero.formulas import zero_memory_formula

__all__ = ["STATE_BYTES", "layer_cost", "params_per_gpu", "memory_per_gpu"]

#: Bytes per parameter of (parameters, gradients, optimizer state): mixed precision keeps fp32
#: master weights and two Adam moments (ZeRO's ``K = 12``); fp32 keeps the two moments.
STATE_BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}


def elem_bytes(layout: ScaleLayout) -> int:
    return 2 if layout.precision == "bf16" else 4


def layer_cost(model: ModelShape, layout: ScaleLayout, rows: int) -> Cost:
    """Parameters and tensor-parallel communication of one layer on one rank, for ``rows``
    tokens per micro-batch: the four linears of :func:`linear_cost` and the two norms."""
    h, mode, t, e = model.hidden, layout.tp_mode, layout.tp, elem_bytes(layout)
    fc1 = 2 * model.f if model.gated else model.f
    linears = [(h, model.qkv_out, "column"), (h, h, "row"), (h, fc1, "column"), (model.f, h, "row")]
    total = Cost(0, 0, 0, 0)
    for k, n, kind in linears:
        c = linear_cost(
            mode, t, rows, k, n, depth=layout.tp_depth, bias=model.bias, kind=kind, elem=e
        )
        total = total + Cost(c.param_bytes, 0, c.comm_bytes, c.comm_calls)
    norm = 2 * (2 * h if model.bias else h) * e
    return total + Cost(norm if mode == "1d" else norm // _side(layout), 0, 0, 0)


def _side(layout: ScaleLayout) -> int:
    from cai_labs.tensor_parallel.grid import grid_shape

    return grid_shape(layout.tp_mode, layout.tp, layout.tp_depth)[-1]


def layers_per_stage(model: ModelShape, layout: ScaleLayout) -> int:
    return math.ceil(model.layers / layout.pp)


def params_per_gpu(model: ModelShape, layout: ScaleLayout) -> int:
    """Parameters (elements) on the busiest GPU before ZeRO sharding."""
    if not model.is_transformer:
        return model.total_params()
    seq = layout.seq_len(model)
    per_layer = layer_cost(model, layout, layout.micro_batch_size * seq).param_bytes
    body = layers_per_stage(model, layout) * per_layer // elem_bytes(layout)
    # The word embedding and the output projection are split over TP (vocabulary-parallel);
    # learned positions and the final norm are replicated (Megatron-LM's layout).
    words = model.vocab * model.hidden
    embed = words // layout.tp + model.embedding_params() - words
    head = model.head_params() - (0 if model.tied else words)  # the final norm
    if layout.pp > 1 or not model.tied:
        head += words // layout.tp  # untied, or tied across stages: the last stage's own copy
    ends = embed + head if layout.pp == 1 else max(embed, head)
    return body + ends


def activation_bytes(model: ModelShape, layout: ScaleLayout) -> float:
    """Activations on the busiest GPU at its peak (0 for models that are not transformers)."""
    if not model.is_transformer:
        return 0.0
    seq, b, e = layout.seq_len(model), layout.micro_batch_size, elem_bytes(layout)
    one_d = layout.tp_mode == "1d"

    # 2D/2.5D/3D split every saved tensor over all tp ranks (rows and features): the 1-rank
    # count divided by tp, whatever the heads per rank.
    tp, split = (layout.tp, 1) if one_d else (1, layout.tp)

    def layer(recompute: str) -> float:
        one = layer_activation_bytes(
            seq // layout.sp,
            b,
            model.hidden,
            model.heads,
            tp,
            layout.sequence_parallel,
            recompute,
            ffn=model.f,
            kv_heads=model.kv,
            gated=model.gated,
            dropout=model.dropout,
            elem=e,
            kv_seq=seq,
        )
        return one / split

    in_flight = 1.0
    if layout.pp > 1:
        in_flight = in_flight_microbatches(
            layout.schedule, 0, layout.pp, layout.n_micro(), layout.chunks
        )
    stage = layers_per_stage(model, layout) * layer(layout.recompute) * in_flight
    if layout.recompute == "full":
        stage += layer("none")  # one layer's activations while it is recomputed
    logits = 4 * b * (seq // layout.sp) * model.vocab / layout.tp
    return stage + logits


def memory_per_gpu(model: ModelShape, layout: ScaleLayout) -> dict[str, float]:
    """``params``, ``grads``, ``optimizer``, ``activations``, ``total`` (bytes), and
    ``host_optimizer`` (bytes in host memory under offload)."""
    pb, gb, ob = STATE_BYTES[layout.precision]
    numel = params_per_gpu(model, layout)
    states = zero_memory_formula(numel, layout.zero, layout.dp * layout.sp, pb, gb, ob)
    host = 0.0
    if layout.offload:
        host, states["optimizer"] = states["optimizer"], 0.0
    act = activation_bytes(model, layout)
    total = states["params"] + states["grads"] + states["optimizer"] + act
    return {
        "params": states["params"],
        "grads": states["grads"],
        "optimizer": states["optimizer"],
        "activations": act,
        "total": total,
        "host_optimizer": host,
    }
