"""The scale model against closed forms it does not compute itself: parameter counts of the
Hugging Face model classes built on the meta device (no memory, no download), the FLOP count of
Narayanan et al. 2021 (eq. 3), the activation table of Korthikanti et al. 2022 (Table 2), the
ring all-reduce's cost and the GPipe bubble's overhead ``(p - 1) / m``.

Each test pins a term of :mod:`cai_labs.scale` exactly (or to float rounding), so that a changed
constant in the scale model fails here even where the published runs' tolerance (3 % memory,
25 % throughput) would not notice it.
"""

from __future__ import annotations

import pytest
import torch

from cai_labs.scale import MODELS, ScaleLayout
from cai_labs.scale import step as step_mod
from cai_labs.scale.hardware import get_gpu
from cai_labs.scale.memory import activation_bytes, memory_per_gpu, params_per_gpu
from cai_labs.scale.models import custom_model, get_model

transformers = pytest.importorskip("transformers")


def _meta_count(model_cls, config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in model_cls(config).parameters())


# -- parameters: the Hugging Face classes count them ----------------------------------------------


def test_gpt_shape_counts_what_gpt2_counts():
    """GPT-2's classes (biases, learned positions, tied head) on GPT-3 175B's shape."""
    m = get_model("gpt-3-175b")
    cfg = transformers.GPT2Config(
        n_layer=m.layers, n_embd=m.hidden, n_head=m.heads, vocab_size=m.vocab, n_positions=m.seq
    )
    assert m.total_params() == _meta_count(transformers.GPT2LMHeadModel, cfg)


@pytest.mark.parametrize(
    "name, ffn", [("llama-3-8b", 14336), ("llama-3-70b", 28672), ("llama-3-405b", 53248)]
)
def test_llama_shapes_count_what_llama_counts(name, ffn):
    """Llama's classes (grouped-query attention with 8 KV heads, SwiGLU, RMSNorm, no biases,
    untied head), with the published configuration typed here."""
    m = get_model(name)
    cfg = transformers.LlamaConfig(
        num_hidden_layers=m.layers,
        hidden_size=m.hidden,
        num_attention_heads=m.heads,
        num_key_value_heads=8,
        intermediate_size=ffn,
        vocab_size=128256,
        tie_word_embeddings=False,
    )
    assert m.total_params() == _meta_count(transformers.LlamaForCausalLM, cfg)


@pytest.mark.parametrize("name", ["opt-125m", "opt-1.3b", "opt-13b"])
def test_opt_shapes_count_what_opt_counts(name):
    """OPT's classes; OPT's learned positions have 2 extra rows (an offset of 2)."""
    m = get_model(name)
    cfg = transformers.OPTConfig(
        num_hidden_layers=m.layers,
        hidden_size=m.hidden,
        num_attention_heads=m.heads,
        ffn_dim=4 * m.hidden,
        word_embed_proj_dim=m.hidden,
        vocab_size=50272,
        max_position_embeddings=2048,
    )
    assert m.total_params() + 2 * m.hidden == _meta_count(transformers.OPTForCausalLM, cfg)


def test_params_per_gpu_splits_what_the_model_has():
    """Without pipeline stages the split pieces add back up: TP 1D splits every linear and the
    word embedding over ``t`` ranks and keeps the norms, the row-parallel biases and the learned
    positions whole (Megatron-LM); with stages, the busiest end stage counts."""
    m = custom_model(4, 256, 8, 1024, seq=128)
    assert params_per_gpu(m, ScaleLayout()) == m.total_params()
    t, h, L = 4, m.hidden, m.layers
    whole = L * (2 * 2 * h + 2 * h) + 2 * h + m.seq * h  # norms, row biases; final norm, positions
    split = m.total_params() - whole
    assert split % t == 0
    assert params_per_gpu(m, ScaleLayout(tp=t)) == split // t + whole
    # Two stages: each holds half the layers; the first the embedding, the last the final norm
    # and its own copy of the tied output projection: the first stage is the larger by the
    # positions.
    layer = (m.layer_params() - (2 * 2 * h + 2 * h)) // t + 2 * 2 * h + 2 * h
    first = L // 2 * layer + m.vocab * h // t + m.seq * h
    assert params_per_gpu(m, ScaleLayout(tp=t, pp=2, microbatches=2)) == first


# -- FLOPs: Narayanan et al. 2021, eq. 3 ----------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt-3-175b", "opt-13b"])
def test_step_flops_follow_narayanan_eq_3(name):
    """``72 B s l h^2 (1 + s/(6h) + V/(12 l h))`` model FLOPs per step; with full recomputation
    ``96 B s l h^2 (1 + s/(6h) + V/(16 l h))`` hardware FLOPs (the paper's eq. 3)."""
    m = get_model(name)
    B, s, L, h, V = 64, m.seq, m.layers, m.hidden, m.vocab
    layout = ScaleLayout(dp=8, micro_batch_size=2, global_batch=B, recompute="full")
    model_flops, hw = step_mod.step_flops(m, layout)
    assert model_flops == pytest.approx(
        72 * B * s * L * h**2 * (1 + s / (6 * h) + V / (12 * L * h))
    )
    assert hw == pytest.approx(96 * B * s * L * h**2 * (1 + s / (6 * h) + V / (16 * L * h)))
    # Selective recomputation repeats only the attention scores' forward: 4 s h per token, layer.
    _, sel = step_mod.step_flops(m, ScaleLayout(dp=8, micro_batch_size=2, global_batch=B,
                                               recompute="selective"))  # fmt: skip
    assert sel - model_flops == pytest.approx(B * s * L * 4 * s * h)
    assert step_mod.step_flops(m, ScaleLayout(dp=8, micro_batch_size=2, global_batch=B)) == (
        model_flops,
        model_flops,
    )


def test_models_without_a_flop_count_are_refused():
    with pytest.raises(ValueError, match="no published FLOP count"):
        step_mod.step_flops(get_model("sd-1.5-unet"), ScaleLayout())


# -- activations: Korthikanti et al. 2022, Table 2 ------------------------------------------------


@pytest.mark.parametrize(
    "recompute, per_layer",
    [
        ("selective", lambda s, b, h, a, t: s * b * h * 34 / t),
        ("none", lambda s, b, h, a, t: s * b * h * (34 / t + 5 * a * s / (h * t))),
    ],
)
def test_activations_follow_korthikanti_table_2(recompute, per_layer):
    """GPT-3 175B, TP 8 with sequence parallelism, 1F1B on 8 stages: the first stage holds
    ``p`` micro-batches of ``L/p`` layers, ``L`` layers' worth (the paper's section 4.2.3), plus
    the fp32 logits of one micro-batch split over TP (``4 b s V / t``)."""
    m = get_model("gpt-3-175b")
    s, b, h, a, t, L, V = m.seq, 1, m.hidden, m.heads, 8, m.layers, m.vocab
    layout = ScaleLayout(dp=1, tp=t, pp=8, microbatches=16, recompute=recompute)
    want = L * per_layer(s, b, h, a, t) + 4 * b * s * V / t
    assert activation_bytes(m, layout) == pytest.approx(want, rel=1e-12)


def test_full_recomputation_keeps_each_layers_input_and_one_layer():
    """Full recomputation: ``2 s b h / t`` per layer (the input, split by SP), ``p`` micro-batches
    in flight, and one layer's whole activations while it is recomputed."""
    m = get_model("gpt-3-175b")
    s, b, h, a, t, L, V = m.seq, 1, m.hidden, m.heads, 8, m.layers, m.vocab
    layout = ScaleLayout(tp=t, pp=8, microbatches=16, recompute="full")
    one_layer = s * b * h * (34 / t + 5 * a * s / (h * t))
    want = L * 2 * s * b * h / t + one_layer + 4 * b * s * V / t
    assert activation_bytes(m, layout) == pytest.approx(want, rel=1e-12)


def test_model_states_follow_zero_and_offload_moves_the_optimizer():
    """ZeRO-3 over ``N`` ranks: ``(2 + 2 + 12) Psi / N`` bytes; offload moves the 12 to the host."""
    m = custom_model(4, 256, 8, 1024, seq=128)
    psi, n = m.total_params(), 4
    mem = memory_per_gpu(m, ScaleLayout(dp=n, zero=3))
    assert (mem["params"], mem["grads"], mem["optimizer"]) == pytest.approx(
        (2 * psi / n, 2 * psi / n, 12 * psi / n),
        rel=1e-3,  # shards rounded up to whole elements
    )
    off = memory_per_gpu(m, ScaleLayout(dp=n, zero=3, offload=True))
    assert off["optimizer"] == 0 and off["host_optimizer"] == pytest.approx(mem["optimizer"])
    assert mem["total"] == pytest.approx(
        mem["params"] + mem["grads"] + mem["optimizer"] + mem["activations"]
    )
    fp32 = memory_per_gpu(m, ScaleLayout(precision="fp32"))  # fp32 Adam: 4 + 4 + 8 bytes
    assert (fp32["params"], fp32["grads"], fp32["optimizer"]) == (4 * psi, 4 * psi, 8 * psi)


# -- communication: the ring all-reduce and the bubble --------------------------------------------


def test_data_parallel_time_is_the_ring_all_reduce_cost():
    """With nothing to overlap, ``2 (n-1)/n`` of the gradient bytes over the link and ``2 (n-1)``
    latencies (Patarasuk and Yuan 2009); over more than one node, InfiniBand's."""
    gpu, numel = get_gpu("h100"), 10**9
    for n, (alpha, beta) in (
        (8, (gpu.nvlink_latency, gpu.nvlink_bandwidth)),
        (16, (gpu.ib_latency, gpu.ib_bandwidth)),
    ):
        t = step_mod._dp_time(numel, ScaleLayout(dp=n), gpu, compute=0.0)
        assert t == pytest.approx(2 * (n - 1) / n * numel * 2 / beta + 2 * (n - 1) * alpha)
    assert step_mod._dp_time(numel, ScaleLayout(dp=1), gpu, compute=0.0) == 0.0


def test_tensor_parallel_time_is_four_all_reduces_per_layer():
    """Megatron 1D: two all-reduces of ``b s h`` activations in the forward and two in the
    backward per layer and micro-batch (Shoeybi et al. 2019, Figure 4), each a ring all-reduce;
    full recomputation repeats the forward's two."""
    m, gpu = get_model("gpt-3-175b"), get_gpu("a100-80gb")
    t, pp, micro, b = 8, 4, 8, 1
    layout = ScaleLayout(tp=t, pp=pp, microbatches=micro, sequence_parallel=False)
    one = gpu.nvlink_latency + 2 * (t - 1) / t * b * m.seq * m.hidden * 2 / gpu.nvlink_bandwidth
    want = m.layers // pp * micro * 4 * one
    assert step_mod._tp_time(m, layout, gpu) == pytest.approx(want)
    full = ScaleLayout(tp=t, pp=pp, microbatches=micro, sequence_parallel=False, recompute="full")
    assert step_mod._tp_time(m, full, gpu) == pytest.approx(1.5 * want)


def test_context_parallel_time_is_the_ring_less_what_attention_hides():
    """Ring attention over ``c`` ranks: each rank passes its K and V blocks (``b s/c`` tokens of
    this TP rank's ``a/t`` heads of ``h/a`` each) around the ring ``c - 1`` times in the forward,
    and K, V and their gradients in the backward: ``6 (c-1)`` blocks per layer and micro-batch,
    one link latency each. The attention's own FLOPs hide it: on GPT-3, by Narayanan et al.'s
    eq. 3, attention is ``4 s h`` of the ``24 h^2 + 4 s h + 2 h V / l`` forward FLOPs per token
    and layer."""
    m, gpu = get_model("gpt-3-175b"), get_gpu("a100-80gb")
    t, c, seq, micro, b = 8, 4, 16384, 3, 1
    layout = ScaleLayout(tp=t, sp=c, seq=seq, microbatches=micro, micro_batch_size=b)
    h, a, L, V = m.hidden, m.heads, m.layers, m.vocab
    block = b * seq // c * (a // t) * (h // a) * 2  # bf16
    ring = L * micro * (6 * (c - 1) * block / gpu.ib_bandwidth + gpu.ib_latency)  # 32 GPUs
    share = 4 * seq * h / (24 * h * h + 4 * seq * h + 2 * h * V / L)
    assert step_mod._cp_time(m, layout, gpu, compute=0.0) == pytest.approx(ring)
    for hidden_part in (0.25, 0.5):
        compute = hidden_part * ring / share
        got = step_mod._cp_time(m, layout, gpu, compute=compute)
        assert got == pytest.approx((1 - hidden_part) * ring)
    assert step_mod._cp_time(m, layout, gpu, compute=2 * ring / share) == 0.0
    assert step_mod._cp_time(m, ScaleLayout(tp=t), gpu, compute=0.0) == 0.0
    # Grouped-query attention passes only the KV heads: Llama 3 70B has 8 for 64 query heads.
    llama = get_model("llama-3-70b")
    gqa = step_mod._cp_time(llama, ScaleLayout(tp=t, sp=c, seq=seq), gpu, compute=0.0)
    kv_block = seq // c * 1 * (llama.hidden // llama.heads) * 2  # 8 KV heads over tp=8: one
    assert gqa == pytest.approx(
        llama.layers * (6 * (c - 1) * kv_block / gpu.ib_bandwidth + gpu.ib_latency)
    )


def test_bubble_term_is_p_minus_1_over_m_of_the_pipelined_time():
    """GPipe/1F1B: a step lasts ``(m + p - 1)`` slots for ``m`` slots of work, so the bubble
    adds ``(p - 1) / m`` of the pipelined time (compute and TP communication)."""
    m, gpu = get_model("gpt-3-175b"), get_gpu("a100-80gb")
    p, micro = 8, 16
    out = step_mod.step_times(
        m, ScaleLayout(tp=8, pp=p, dp=2, microbatches=micro), gpu, numel=10**9
    )
    terms = out["terms"]
    work = terms["compute"] + terms["tensor-parallel communication"]
    assert terms["pipeline bubble"] == pytest.approx((p - 1) / micro * work)
    assert out["bubble_fraction"] == pytest.approx((p - 1) / (micro + p - 1))
    assert out["step"] == pytest.approx(sum(terms.values()))


def test_every_preset_has_a_cited_source():
    assert all(m.source for m in MODELS.values())
