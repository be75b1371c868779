"""Step time per GPU: compute at one fraction of peak, alpha-beta communication, the bubble.

* **FLOPs** (Narayanan et al. 2021, eq. 3; Korthikanti et al. 2022, section 6): a training step
  costs 3 forward passes of model FLOPs (:meth:`ModelShape.forward_flops_per_token`); full
  recomputation adds one more forward of the layers, selective recomputation the forward of the
  attention scores (``4 s h`` per token and layer). MFU counts model FLOPs only.
* **Compute** time is the hardware FLOPs over ``GPUs x peak x efficiency``
  (:mod:`~cai_labs.scale.hardware`: one constant per GPU type).
* **Communication** is ``alpha`` per call plus bytes sent over the link's bandwidth, NVLink when
  the group fits in one node, else InfiniBand. Bytes come from the technique formulas:
  tensor parallel (:func:`~cai_labs.scale.memory.layer_cost`, not overlapped; full
  recomputation repeats the forward's), context parallel (ring attention
  :func:`~cai_labs.sequence_parallel.formulas.attention_sent_bytes`, overlapped with the
  attention it feeds), pipeline p2p (:func:`~cai_labs.pipeline.formulas.p2p_sent_bytes`, not
  overlapped), data parallel / ZeRO (:func:`~cai_labs.zero.formulas.zero_sent_factor`,
  overlapped with the last micro-batch's backward, or with the whole step under ZeRO-3) and
  offload (:func:`~cai_labs.offload.formulas.offload_step_link_bytes` over PCIe).
* **Bubble** (:func:`~cai_labs.pipeline.formulas.bubble_fraction`) stretches the pipelined
  part: ``(compute + TP + CP) / (1 - bubble)``.
"""

from __future__ import annotations

from cai_labs.data_parallel.formulas import ring_allreduce_sent
from cai_labs.offload.formulas import offload_step_link_bytes
from cai_labs.pipeline.formulas import bubble_fraction, p2p_sent_bytes
from cai_labs.scale.hardware import GPU
from cai_labs.scale.layout import ScaleLayout
from cai_labs.scale.memory import STATE_BYTES, elem_bytes, layer_cost, layers_per_stage
from cai_labs.scale.models import ModelShape
from cai_labs.sequence_parallel.formulas import attention_sent_bytes
from cai_labs.zero.formulas import zero_sent_factor

__all__ = ["step_flops", "step_times"]


def step_flops(model: ModelShape, layout: ScaleLayout) -> tuple[float, float]:
    """``(model FLOPs, hardware FLOPs)`` of one training step of the whole cluster."""
    seq = layout.seq_len(model)
    fwd = model.forward_flops_per_token(seq)
    if fwd is None:
        raise ValueError(f"{model.name}: no published FLOP count; step time is not modeled")
    tokens = layout.batch() * seq
    flops = 3 * fwd * tokens
    extra = 0.0
    if model.is_transformer and layout.recompute == "full":
        extra = model.layers * (2 * model.layer_matmul_params() + 4 * seq * model.hidden)
    elif model.is_transformer and layout.recompute == "selective":
        extra = model.layers * 4 * seq * model.hidden
    return flops, flops + extra * tokens


def _link(gpu: GPU, span: int) -> tuple[float, float]:
    """``(latency, bandwidth)`` of a group spanning ``span`` consecutive GPUs."""
    if span <= gpu.gpus_per_node:
        return gpu.nvlink_latency, gpu.nvlink_bandwidth
    return gpu.ib_latency, gpu.ib_bandwidth


def _tp_time(model: ModelShape, layout: ScaleLayout, gpu: GPU) -> float:
    if layout.tp == 1 or not model.is_transformer:
        return 0.0
    rows = layout.micro_batch_size * layout.seq_len(model) // layout.sp
    c = layer_cost(model, layout, rows)
    sent = ring_allreduce_sent(c.comm_bytes, layout.tp) if layout.tp_mode == "1d" else c.comm_bytes
    repeat = 1.5 if layout.recompute == "full" else 1.0  # the forward's collectives again
    alpha, beta = _link(gpu, layout.tp)
    per_micro = repeat * (c.comm_calls * alpha + sent / beta)
    return layers_per_stage(model, layout) * layout.n_micro() * per_micro


def _cp_time(model: ModelShape, layout: ScaleLayout, gpu: GPU, compute: float) -> float:
    """Ring attention's exposed time: what the attention compute cannot hide."""
    if layout.sp == 1:
        return 0.0
    seq = layout.seq_len(model)
    local_kv = max(model.kv // layout.tp, 1)
    chunk = layout.micro_batch_size * seq // layout.sp * local_kv * model.head_dim
    sent = attention_sent_bytes("ring", layout.sp, chunk * elem_bytes(layout))
    alpha, beta = _link(gpu, layout.tp * layout.sp)
    ring = layers_per_stage(model, layout) * layout.n_micro() * (sent / beta + alpha)
    attn_share = 4 * seq * model.hidden / (model.forward_flops_per_token(seq) / model.layers)
    return max(0.0, ring - attn_share * compute)


def _pp_time(model: ModelShape, layout: ScaleLayout, gpu: GPU) -> float:
    if layout.pp == 1:
        return 0.0
    split = layout.tp if (layout.sequence_parallel or layout.tp_mode != "1d") else 1
    act = layout.micro_batch_size * layout.seq_len(model) // layout.sp * model.hidden
    act = act * elem_bytes(layout) // split
    alpha, beta = _link(gpu, layout.tp * layout.sp * layout.pp)
    sent = p2p_sent_bytes(act, 1 if layout.pp > 2 else 0, layout.pp)
    return layout.n_micro() * (sent / beta + 2 * alpha)


def _dp_time(numel: int, layout: ScaleLayout, gpu: GPU, compute: float) -> float:
    n = layout.dp * layout.sp
    if n == 1:
        return 0.0
    grad_bytes = STATE_BYTES[layout.precision][1]
    sent = zero_sent_factor(layout.zero, n) * numel * grad_bytes
    alpha, beta = _link(gpu, layout.gpus)
    comm = sent / beta + 2 * (n - 1) * alpha
    if layout.zero == 3:
        return max(0.0, comm * layout.n_micro() - compute)
    return max(0.0, comm - 2 / 3 * compute / layout.n_micro())


def step_times(model: ModelShape, layout: ScaleLayout, gpu: GPU, numel: int) -> dict:
    """Seconds of each term of one step and the step itself (``numel``: parameters per GPU)."""
    _, hw = step_flops(model, layout)
    compute = hw / layout.gpus / (gpu.peak(layout.precision) * gpu.efficiency)
    tp = _tp_time(model, layout, gpu)
    cp = _cp_time(model, layout, gpu, compute)
    bubble = 0.0
    if layout.pp > 1:
        bubble = bubble_fraction(layout.schedule, layout.pp, layout.n_micro(), layout.chunks)
    pipelined = (compute + tp + cp) / (1 - bubble)
    terms = {
        "compute": compute,
        "tensor-parallel communication": tp,
        "context-parallel communication": cp,
        "pipeline bubble": pipelined - (compute + tp + cp),
        "pipeline p2p": _pp_time(model, layout, gpu),
        "data-parallel communication": _dp_time(numel, layout, gpu, compute),
        "offload (host link)": 0.0,
    }
    if layout.offload:
        link = offload_step_link_bytes(numel, layout.dp * layout.sp)
        terms["offload (host link)"] = (link["d2h"] + link["h2d"]) / gpu.pcie_bandwidth
    return {"terms": terms, "step": sum(terms.values()), "bubble_fraction": bubble}
