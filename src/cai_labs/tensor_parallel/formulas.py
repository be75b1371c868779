"""Per-rank cost of a linear layer and of a transformer block in each tensor-parallel mode.

Colossal-AI's documentation gives the costs of its four modes as orders of growth
(:data:`COLOSSALAI_TABLE`). Here they are written out *exactly* for the layers in this package,
so that a test can check that the bytes the :class:`cai_labs.Ledger` measures equal the formula.

Conventions (the ledger's): communication is counted in *buffer bytes* per call, summed over
the calls one rank takes part in during one forward + backward: the tensor of an
``all_reduce``/``broadcast``/``reduce``, the gathered output of an ``all_gather``, the unreduced
input of a ``reduce_scatter``. Parameters are this rank's parameter bytes. Activations are the
bytes a linear layer saves for backward (its input shard). Elements are fp32 (4 bytes) unless
``elem`` says otherwise.

Symbols: ``M`` rows (tokens, ``b*s``), ``K`` in features, ``N`` out features, ``P`` ranks of 1D,
``q`` grid side, ``d`` depth of 2.5D, ``h`` model width, ``r`` MLP ratio.

==========  =====================  ============  ===============================================
mode        parameters (elements)  saved input   communication per forward+backward (elements)
==========  =====================  ============  ===============================================
1D column   ``KN/P + N/P``         ``MK``        ``MK`` (all-reduce of dX in backward)
1D row      ``KN/P + N``           ``MK/P``      ``MN`` (all-reduce of Y in forward)
2D          ``KN/q² + N/q``        ``MK/q²``     ``3q(MK/q² + KN/q²) + N/q``
2.5D        ``KN/q² + N/q``        ``MK/(dq²)``  ``3q(MK/(dq²) + KN/q²) + N/q + KN/q² + N/q``
3D          ``KN/q³ + N/q``        ``MK/q³``     ``(3MK + 3KN + 2MN)/q² + 2N/q``
==========  =====================  ============  ===============================================

2D (SUMMA): forward broadcasts ``q`` blocks of ``X`` along rows and ``q`` blocks of ``A`` along
columns; backward does it again for ``dX = dY A^T`` (broadcast ``A``, reduce ``dX`` along rows)
and ``dA = X^T dY`` (broadcast ``X``, reduce ``dA`` along columns): ``3q`` block transfers of
each. The bias, replicated down a column, has its gradient all-reduced there (``N/q``).
2.5D adds the sum of the weight and bias gradients across the ``d`` depth layers.
3D: forward all-gathers ``X`` and ``A`` and reduce-scatters ``Y``; backward all-gathers ``dY``,
re-gathers ``X`` and ``A`` (only shards are kept: activation memory ``1/q³``) and
reduce-scatters ``dX`` and ``dA``; the bias gradient is summed over two axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cai_labs.tensor_parallel.grid import grid_shape

if TYPE_CHECKING:
    from transformers import OPTConfig

__all__ = [
    "COLOSSALAI_TABLE",
    "colossalai_bandwidth_factor",
    "Cost",
    "linear_cost",
    "block_cost",
    "block_activation_bytes",
    "serial_block_params",
    "opt_1d_cost",
    "vocab_loss_cost",
    "RECOMPUTE",
    "layer_activation_bytes",
    "sequence_parallel_block_activation_bytes",
    "sequence_parallel_block_comm",
    "block_sent_bytes",
    "sequence_parallel_block_cost",
]

#: Activation recomputation policies of :func:`layer_activation_bytes`.
RECOMPUTE = ("none", "selective", "full")

#: Colossal-AI documentation, "Efficiency" table of each mode (``P`` ranks, ring algorithms).
COLOSSALAI_TABLE: dict[str, dict[str, str]] = {
    "1d": {
        "computation": "O(1/P)",
        "memory (parameters)": "O(1/P)",
        "memory (activations)": "O(1)",
        "communication (bandwidth)": "O(2(P-1)/P)",
        "communication (latency)": "O(2(P-1))",
    },
    "2d": {
        "computation": "O(1/q^2)",
        "memory (parameters)": "O(1/q^2)",
        "memory (activations)": "O(1/q^2)",
        "communication (bandwidth)": "O(6(q-1)/q)",
        "communication (latency)": "O(6(q-1))",
    },
    "2.5d": {
        "computation": "O(1/(dq^2))",
        "memory (parameters)": "O(1/q^2)",
        "memory (activations)": "O(1/(dq^2))",
        "communication (bandwidth)": "O(3(q-1)(d+1)/(dq))",
        "communication (latency)": "O(6(q-1))",
    },
    "3d": {
        "computation": "O(1/q^3)",
        "memory (parameters)": "O(1/q^3)",
        "memory (activations)": "O(1/q^3)",
        "communication (bandwidth)": "O(6(q-1)/q^3)",
        "communication (latency)": "O(6(q-1))",
    },
}


def colossalai_bandwidth_factor(mode: str, size: int, depth: int = 1) -> float:
    """The number inside the docs' "Communication (bandwidth)" ``O(...)`` for this grid:
    ``2(P-1)/P`` (1D), ``6(q-1)/q`` (2D), ``3(q-1)(d+1)/(dq)`` (2.5D), ``6(q-1)/q³`` (3D).

    An order of growth per unit of activation/weight size, not bytes: put it next to the
    measured bytes to see the trend across grid sizes, not to predict the bytes."""
    q, d = _dims(mode, size, depth)
    if mode == "1d":
        return 2 * (size - 1) / size
    if mode == "2d":
        return 6 * (q - 1) / q
    if mode == "2.5d":
        return 3 * (q - 1) * (d + 1) / (d * q)
    return 6 * (q - 1) / q**3


@dataclass(frozen=True)
class Cost:
    """Bytes on one rank: parameters, activations saved for backward, communication per
    forward+backward (buffer bytes), and the number of collective calls."""

    param_bytes: int
    activation_bytes: int
    comm_bytes: int
    comm_calls: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(a + b for a, b in zip(self._t(), other._t())))

    def _t(self) -> tuple[int, int, int, int]:
        return (self.param_bytes, self.activation_bytes, self.comm_bytes, self.comm_calls)


def _dims(mode: str, size: int, depth: int) -> tuple[int, int]:
    shape = grid_shape(mode, size, depth)
    return shape[-1], (shape[0] if mode == "2.5d" else 1)


def _check_divides(mode: str, size: int, q: int, d: int, M: int, K: int, N: int, kind: str) -> None:
    """Raise unless every block of this mode's split holds a whole number of elements."""
    if mode == "1d":
        need = [("out_features", N, size)] if kind == "column" else [("in_features", K, size)]
    elif mode in ("2d", "2.5d"):  # activations (M/dq, K/q), weights (K/q, N/q), bias N/q
        need = [("rows", M, d * q), ("in_features", K, q), ("out_features", N, q)]
    else:  # 3d: activation and weight blocks of (M K)/q^3 and (K N)/q^3 elements, bias N/q
        need = [("rows x in_features", M * K, q**3), ("in_features x out_features", K * N, q**3)]
        need += [("out_features", N, q)]
    bad = [f"{name}={v} by {by}" for name, v, by in need if v % by]
    if bad:
        raise ValueError(
            f"{mode} on {size} ranks (q={q}, depth={d}) cannot split {', '.join(bad)} evenly: "
            "choose sizes that are multiples of these"
        )


def linear_cost(
    mode: str,
    size: int,
    rows: int,
    in_features: int,
    out_features: int,
    *,
    depth: int = 1,
    bias: bool = True,
    kind: str = "column",
    elem: int = 4,
) -> Cost:
    """Cost of one linear layer ``(rows, K) -> (rows, N)`` on one rank of a ``size``-rank grid.

    ``kind`` chooses ``"column"`` or ``"row"`` for 1D (ignored by the other modes). Sizes that
    the mode's grid does not split evenly raise ``ValueError`` (the layers refuse them too).
    """
    M, K, N = rows, in_features, out_features
    q, d = _dims(mode, size, depth)
    _check_divides(mode, size, q, d, M, K, N, kind)
    nb = N if bias else 0
    if mode == "1d":
        P = size
        if kind == "column":
            # backward: all-reduce of dX (skipped for a group of one)
            return Cost((K * N + nb) // P * elem, M * K * elem, M * K * elem * (P > 1), int(P > 1))
        if kind == "row":
            return Cost(
                (K * N // P + nb) * elem, M * K // P * elem, M * N * elem * (P > 1), int(P > 1)
            )
        raise ValueError(f"kind must be 'column' or 'row'; got {kind!r}")
    if mode in ("2d", "2.5d"):
        xb, ab = M * K // (d * q * q), K * N // (q * q)
        comm = 3 * q * (xb + ab) * (q > 1)
        calls = 6 * q * (q > 1)
        if bias and q > 1:
            comm, calls = comm + N // q, calls + 1
        if d > 1:
            comm, calls = comm + ab, calls + 1
            if bias:
                comm, calls = comm + N // q, calls + 1
        return Cost((ab + nb // q) * elem, xb * elem, comm * elem, calls)
    if mode == "3d":
        comm = (3 * M * K + 3 * K * N + 2 * M * N) // (q * q) * (q > 1)
        calls = 8 * (q > 1)
        if bias and q > 1:
            comm, calls = comm + 2 * N // q, calls + 2
        return Cost((K * N // q**3 + nb // q) * elem, M * K // q**3 * elem, comm * elem, calls)
    raise ValueError(f"unknown tensor parallel mode {mode!r}")


def _layernorm_cost(mode: str, size: int, rows: int, h: int, depth: int, elem: int) -> Cost:
    """A layer norm: replicated in 1D; in the other modes its features are split, so the mean
    and the variance are all-reduced (forward and backward: 4 calls of ``rows`` elements) and
    the replicated ``weight``/``bias`` shards get their gradients summed over the other axes."""
    q, d = _dims(mode, size, depth)
    if mode == "1d":
        return Cost(2 * h * elem, 0, 0, 0)
    if mode in ("2d", "2.5d"):
        local_rows = rows // (d * q)
        stats = 4 * local_rows * (q > 1)
        params = 2 * (h // q) * ((q > 1) + (d > 1))
        calls = 4 * (q > 1) + 2 * ((q > 1) + (d > 1))
        return Cost(2 * h // q * elem, 0, (stats + params) * elem, calls)
    local_rows = rows // (q * q)
    stats = 4 * local_rows * (q > 1)
    params = 2 * 2 * (h // q) * (q > 1)
    return Cost(2 * h // q * elem, 0, (stats + params) * elem, 8 * (q > 1))


def block_activation_bytes(
    mode: str,
    size: int,
    batch: int,
    seq: int,
    d_model: int,
    n_heads: int,
    mlp_ratio: int = 4,
    *,
    depth: int = 1,
    seq_len: int | None = None,
    elem: int = 4,
) -> int:
    """Bytes one rank saves for backward in one block's forward (what the ledger measures).

    With ``m`` local tokens, ``hl`` local features, ``bl`` local sequences and ``nl`` local heads
    (1D: ``m = b*s``, ``hl = d/P`` inside attention/MLP; 2D: ``m = b*s/q``, ``hl = d/q``;
    2.5D: ``m = b*s/(dq)``; 3D: ``m = b*s/q²``):

    * each layer norm: 1D (replicated, PyTorch's fused kernel) its input, output, mean and
      1/std: ``2*m*d + 2*m``; the split norms of the other modes keep ``x - mean``,
      the normalised ``y``, the output, and 1/std: ``3*m*hl + m``;
    * attention: contiguous copies of q, k, v for the batched matmuls ``3*m*hl``, the softmax
      output ``bl*nl*s²``, the merged heads ``m*hl`` and the causal mask (``seq_len²`` bools);
    * MLP: the ``fc1`` output (GELU's input) and GELU's output: ``2*m*r*hl``.

    Counted per storage, as the ledger does. Depends on which tensors PyTorch's kernels save
    (checked against the ledger for torch 2.x in the tests).
    """
    q, d = _dims(mode, size, depth)
    h, r, s = d_model, mlp_ratio, seq
    if mode == "1d":
        rows_split, feat_split = 1, size
        m = batch * seq
        ln = 2 * m * h + 2 * m
    else:
        rows_split = d * q if mode in ("2d", "2.5d") else q * q
        feat_split = q
        m = batch * seq // rows_split
        ln = 3 * m * (h // q) + m
    hl, bl, nl = h // feat_split, batch // rows_split, n_heads // feat_split
    attn = 3 * m * hl + bl * nl * s * s + m * hl
    mlp = 2 * m * r * hl
    mask = (seq_len or seq) ** 2  # bytes (bool)
    return (2 * ln + attn + mlp) * elem + mask


def block_cost(
    mode: str,
    size: int,
    batch: int,
    seq: int,
    d_model: int,
    mlp_ratio: int = 4,
    *,
    n_heads: int | None = None,
    depth: int = 1,
    seq_len: int | None = None,
    elem: int = 4,
) -> Cost:
    """Parameters, activations and communication of one GPT
    :class:`~cai_labs.models.gpt.Block` per rank (forward + backward).

    The block is ``ln1 -> qkv -> attention -> proj`` and ``ln2 -> fc1 -> GELU -> fc2`` with
    residuals. Attention itself needs no communication in any mode (each rank holds whole heads
    for whole sequences), so the block's communication is that of its four linears and two
    layer norms. ``activation_bytes`` is :func:`block_activation_bytes` when ``n_heads`` is
    given, else 0.
    """
    M, h, r = batch * seq, d_model, mlp_ratio
    lin = [(h, 3 * h, "column"), (h, h, "row"), (h, r * h, "column"), (r * h, h, "row")]
    total = Cost(0, 0, 0, 0)
    for k, n, kind in lin:
        c = linear_cost(mode, size, M, k, n, depth=depth, kind=kind, elem=elem)
        total = total + Cost(c.param_bytes, 0, c.comm_bytes, c.comm_calls)
    ln = _layernorm_cost(mode, size, M, h, depth, elem)
    act = 0
    if n_heads is not None:
        act = block_activation_bytes(
            mode, size, batch, seq, h, n_heads, r, depth=depth, seq_len=seq_len, elem=elem
        )
    return total + ln + ln + Cost(0, act, 0, 0)


def serial_block_params(d_model: int, mlp_ratio: int = 4, elem: int = 4) -> int:
    """Parameter bytes of the serial block (for the ratio parallel / serial)."""
    h, r = d_model, mlp_ratio
    n = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (r * h * h + r * h) + (r * h * h + h)
    return n * elem


def opt_1d_cost(config: OPTConfig, size: int, tokens: int, elem: int = 4) -> Cost:
    """Parameter bytes per rank and communication per forward+backward of an
    ``OPTForCausalLM`` split by :func:`~cai_labs.tensor_parallel.opt_1d.parallelize_opt` over
    ``size`` ranks, for a batch of ``tokens = b*s`` tokens (activations not counted: 0).

    With width ``d``, ``f = ffn_dim``, ``L`` layers, vocabulary ``V``, ``P`` positions and ``N``
    ranks, per rank (biases and layer-norm weights as the config has them):

    * replicated: token embedding ``V d`` (shared with ``lm_head`` when tied), positions
      ``(P + 2) d`` (OPT offsets positions by 2), final layer norm ``2d``, and per layer two
      layer norms ``4d`` and the biases of the row-parallel ``out_proj`` and ``fc2``, ``2d``;
    * split: per layer ``q, k, v, out_proj`` ``4 d^2 / N`` + ``3d/N`` of ``q, k, v`` biases, and
      the MLP ``2 d f / N`` + ``f/N`` of ``fc1``'s bias.

    Communication: per layer four all-reduces of the ``(tokens, d)`` hidden states (forward:
    ``out_proj`` and ``fc2``; backward: the input gradient of attention and of ``fc1``), so
    ``4 L tokens d`` elements in ``4 L`` calls; none for one rank.
    """
    d, f, L = config.hidden_size, config.ffn_dim, config.num_hidden_layers
    N = size
    w = getattr(config, "word_embed_proj_dim", d) or d
    bias = int(getattr(config, "enable_bias", True))
    affine = int(getattr(config, "layer_norm_elementwise_affine", True))
    ln = 2 * d * affine
    replicated = config.vocab_size * w + (config.max_position_embeddings + 2) * d
    if w != d:
        replicated += 2 * d * w  # project_in and project_out
    if not getattr(config, "tie_word_embeddings", True):
        replicated += config.vocab_size * w
    if config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False):
        replicated += ln
    per_layer = 2 * ln + 2 * d * bias + (4 * d * d + 2 * d * f + (3 * d + f) * bias) // N
    calls = 4 * L * (N > 1)
    return Cost((replicated + L * per_layer) * elem, 0, calls * tokens * d * elem, calls)


def vocab_loss_cost(
    size: int, tokens: int, vocab: int, parallel: bool = True, elem: int = 4
) -> Cost:
    """The cross-entropy of 1D logits split by vocabulary ``(tokens, V/P)`` on one rank, for
    one forward+backward (parameters: none). Saved bytes are those of ``reduction="sum"`` or
    ``"none"``; ``"mean"`` adds its divisor (8 bytes) in the parallel version.

    * ``parallel=True`` —
      :func:`~cai_labs.tensor_parallel.cross_entropy.vocab_parallel_cross_entropy`: 3
      all-reduces of ``tokens`` elements (row max, target logit, sum of exponentials); saved:
      the local softmax ``tokens*V/P`` elements and the local target column (int64,
      ``8*tokens`` bytes).
    * ``parallel=False`` — all-gather the logits, then ``F.cross_entropy``: one all-gather of
      ``tokens*V`` elements; saved: PyTorch's ``log_softmax`` output ``tokens*V`` elements,
      the targets (int64) and ``nll_loss``'s one-element total weight.

    Communication counts vanish for one rank. The saved bytes depend on which tensors
    PyTorch's kernels keep (checked against the ledger in the tests).
    """
    P, M, V = size, tokens, vocab
    if V % P:
        raise ValueError(f"the vocabulary V={V} does not split over {P} ranks; change V or P")
    if parallel:
        return Cost(0, M * V // P * elem + 8 * M, 3 * M * elem * (P > 1), 3 * (P > 1))
    return Cost(0, M * V * elem + 8 * M + elem, M * V * elem * (P > 1), int(P > 1))


def layer_activation_bytes(
    seq: int,
    batch: int,
    hidden: int,
    heads: int,
    tp: int = 1,
    sequence_parallel: bool = False,
    recompute: str = "none",
    *,
    ffn: int | None = None,
    kv_heads: int | None = None,
    gated: bool = False,
    dropout: bool = True,
    elem: int = 2,
    kv_seq: int | None = None,
) -> float:
    """Bytes one transformer layer keeps for backward on one rank (Korthikanti et al. 2022,
    *Reducing Activation Recomputation in Large Transformer Models*, section 4 and Table 2).

    With ``s, b, h, a, t`` and 16-bit activations (``elem = 2``; dropout masks 1 byte) the
    paper's per-layer total is ``sbh (10 + 24/t + 5as/(ht))`` with tensor parallelism,
    ``sbh (34/t + 5as/(ht))`` with sequence parallelism, ``sbh (34/t)`` (plus 10 unsplit without
    SP) with selective recomputation (the ``as^2 b`` attention terms recomputed), and ``2 sbh``
    with full recomputation (``2sbh/t`` with SP). The terms, in elements of ``sbh``:

    * not split by TP (split by SP): the inputs of the two layer norms, of the QKV projection and
      of ``fc1`` (4), and the two dropout masks (2 bytes);
    * split by TP: Q, K, V (``1 + 2 kv/a``), the output projection's input (1), and the MLP
      (``2f/h``, or ``3f/h`` for a gated MLP that keeps both halves of ``fc1``);
    * attention scores, split by TP: softmax output ``as^2 b`` elements, dropout mask
      ``as^2 b`` bytes and dropout output ``as^2 b`` elements.

    ``dropout=False`` drops the masks and the dropout output (the GPT of this package, checked
    against the ledger in fp32, ``elem = 4``). ``ffn`` defaults to ``4h``, ``kv_heads`` to ``a``;
    ``kv_seq`` (default ``seq``) is the keys each query sees: the whole sequence when ``seq`` is
    one rank's share under context parallelism.
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}; got {recompute!r}")
    if heads % tp:
        raise ValueError(f"tensor parallel size {tp} does not divide the {heads} attention heads")
    sbh = seq * batch * hidden
    split_seq = tp if sequence_parallel else 1
    if recompute == "full":
        return elem * sbh / split_seq
    f = 4 * hidden if ffn is None else ffn
    g = 1.0 if kv_heads is None else kv_heads / heads
    unsplit = 4 * elem * sbh + (2 * sbh if dropout else 0)
    split = elem * sbh * (2 + 2 * g) + elem * seq * batch * f * (3 if gated else 2)
    total = unsplit / split_seq + split / tp
    if recompute == "none":
        scores = heads * seq * (seq if kv_seq is None else kv_seq) * batch
        total += scores * (2 * elem + 1 if dropout else elem) / tp
    return total


# -- tensor + sequence parallelism (Megatron, Korthikanti et al. 2022) ---------------------------
def _check_sequence_split(size: int, seq: int, n_heads: int | None = None) -> None:
    if seq % size:
        raise ValueError(
            f"sequence parallelism splits the sequence s={seq} into {size} shards; "
            f"choose s divisible by {size}"
        )
    if n_heads is not None and n_heads % size:
        raise ValueError(f"{size} ranks do not divide the {n_heads} attention heads")


def sequence_parallel_block_activation_bytes(
    size: int,
    batch: int,
    seq: int,
    d_model: int,
    n_heads: int,
    mlp_ratio: int = 4,
    *,
    regather: bool = True,
    seq_len: int | None = None,
    elem: int = 4,
) -> int:
    """Bytes one rank saves for backward in one forward of a
    :class:`~cai_labs.tensor_parallel.sequence_parallel_1d.SequenceParallelBlock`.

    With ``t = size`` ranks, ``M = b*s`` tokens, ``m = M/t`` on this rank's shard, width ``h``,
    MLP ratio ``r`` and ``n`` heads (elements unless said):

    * each layer norm, on the shard: its input ``m*h``, mean and 1/std ``2m``, and its output
      ``m*h`` (the shard the column linear keeps and gathers again in backward); with
      ``regather=False`` the column linear keeps the gathered ``M*h`` instead of that output;
    * attention, as in 1D: q, k, v ``3*M*h/t``, the softmax ``b*(n/t)*s^2``, the merged heads
      ``M*h/t``; the MLP: ``fc1``'s output and GELU's ``2*M*r*h/t``;
    * the causal mask, ``seq_len^2`` bools, the same on every rank.

    So with ``regather`` every term is the serial block's divided by ``t`` except the mask:
    ``t * this == serial + (t - 1) * seq_len^2``. Checked against the ledger in the tests.
    """
    _check_sequence_split(size, seq, n_heads)
    t, h, r = size, d_model, mlp_ratio
    M = batch * seq
    m = M // t
    ln = 2 * m * h + 2 * m if regather else m * h + 2 * m + M * h
    attn = 3 * M * h // t + batch * (n_heads // t) * seq * seq + M * h // t
    mlp = 2 * M * r * h // t
    return (2 * ln + attn + mlp) * elem + (seq_len or seq) ** 2


def sequence_parallel_block_comm(
    size: int, batch: int, seq: int, d_model: int, *, regather: bool = True, elem: int = 4
) -> dict[str, dict[str, int]]:
    """Collectives of one forward+backward of a sequence-parallel block on one rank:
    ``{op: {"calls", "bytes", "ring_sent_bytes"}}`` (buffer bytes as the ledger counts them,
    and the ring algorithms' bytes this rank sends, a model). Empty for one rank.

    * ``all_gather`` of ``b*s*h``: before ``qkv`` and ``fc1`` (forward), of ``dY`` after
      ``proj`` and ``fc2`` (backward), and with ``regather`` the two column inputs again;
    * ``reduce_scatter`` of ``b*s*h``: after ``proj`` and ``fc2`` (forward), ``dX`` of ``qkv``
      and ``fc1`` (backward);
    * ``all_reduce`` of ``h``: the gradients of the norms' weights and biases and of the
      row-parallel biases, which each rank computed from its tokens only (6 calls).

    On a ring an all-gather or a reduce-scatter sends ``(t-1)/t`` of its buffer, an all-reduce
    ``2(t-1)/t``: the four of each replace 1D's four all-reduces of ``b*s*h`` at equal volume.
    """
    _check_sequence_split(size, seq)
    t = size
    if t == 1:
        return {}
    act, vec = batch * seq * d_model * elem, d_model * elem
    calls = {"all_gather": 6 if regather else 4, "reduce_scatter": 4, "all_reduce": 6}
    sizes = {"all_gather": act, "reduce_scatter": act, "all_reduce": vec}
    factor = {"all_gather": 1, "reduce_scatter": 1, "all_reduce": 2}
    return {
        op: {
            "calls": n,
            "bytes": n * sizes[op],
            "ring_sent_bytes": n * round(factor[op] * (t - 1) * sizes[op] / t),  # per call
        }
        for op, n in calls.items()
    }


def block_sent_bytes(
    size: int,
    batch: int,
    seq: int,
    d_model: int,
    *,
    sequence_parallel: bool = False,
    regather: bool = True,
    elem: int = 4,
) -> int:
    """Bytes one rank sends in one block's forward+backward on ring algorithms (a model):
    1D tensor parallelism's four all-reduces of ``b*s*h``, ``8 (t-1)/t * b*s*h*elem``, or
    :func:`sequence_parallel_block_comm`'s total (the same plus ``12 (t-1)/t * h*elem`` for the
    replicated gradients, plus ``2 (t-1)/t * b*s*h*elem`` with ``regather``)."""
    if sequence_parallel:
        comm = sequence_parallel_block_comm(size, batch, seq, d_model, regather=regather, elem=elem)
        return sum(c["ring_sent_bytes"] for c in comm.values())
    return 4 * round(2 * (size - 1) * batch * seq * d_model * elem / size)


def sequence_parallel_block_cost(
    size: int,
    batch: int,
    seq: int,
    d_model: int,
    n_heads: int,
    mlp_ratio: int = 4,
    *,
    regather: bool = True,
    seq_len: int | None = None,
    elem: int = 4,
) -> Cost:
    """:class:`Cost` of one sequence-parallel block per rank: the parameters of the 1D block
    (the same split), :func:`sequence_parallel_block_activation_bytes`, and the buffer bytes
    and calls of :func:`sequence_parallel_block_comm`."""
    params = block_cost("1d", size, batch, seq, d_model, mlp_ratio, elem=elem).param_bytes
    act = sequence_parallel_block_activation_bytes(
        size, batch, seq, d_model, n_heads, mlp_ratio, regather=regather, seq_len=seq_len, elem=elem
    )
    comm = sequence_parallel_block_comm(size, batch, seq, d_model, regather=regather, elem=elem)
    return Cost(
        params,
        act,
        sum(c["bytes"] for c in comm.values()),
        sum(c["calls"] for c in comm.values()),
    )
