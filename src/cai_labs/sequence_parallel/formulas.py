"""Sequence (context) parallelism's costs: the bytes each attention layer sends, per rank.

``N`` ranks each hold ``L/N`` tokens. One *chunk* ``E`` is the bytes of one rank's key (or
value) block: ``b (L/N) H_kv D`` elements. Per attention layer and training step:

* **ring** (Li et al. 2021; context parallelism of Megatron/torchtitan): forward passes the key and
  value chunks ``N-1`` times each, backward passes them again and sends the two gradient
  accumulators around: ``6 (N-1) E`` sent by every rank;
* **all-to-all** (DeepSpeed-Ulysses): four all-to-alls forward (q, k, v, output) and four
  backward, each sending ``(N-1)/N`` of one chunk: ``8 (N-1)/N E``;
* the padding mask ``[b, L]`` (int64 here) is all-gathered once per layer: ``(N-1)/N`` of it.

Around the layers (the BERT of :mod:`~cai_labs.sequence_parallel.pipelined`, ``A`` the bytes of
a replica's local activation ``(B/dp) (L/N) h``): pipeline stages send ``A`` forward and back
(:func:`cai_labs.pipeline.formulas.p2p_sent_bytes`), and the gradient sum is one ring
all-reduce over the stage's ``N dp`` replicas, or two (SP group, then DP group).
"""

from __future__ import annotations

from cai_labs.data_parallel.formulas import ring_allreduce_sent, ring_gather_sent

__all__ = [
    "ATTENTION_KINDS",
    "attention_sent_bytes",
    "mask_gather_sent_bytes",
    "replica_grad_sent_bytes",
    "RING_KINDS",
    "ring_flash_sent_bytes",
    "score_bytes",
    "saved_activation_bytes",
    "longest_sequence",
]

ATTENTION_KINDS = ("ring", "all_to_all")


def attention_sent_bytes(kind: str, n: int, chunk_bytes: int) -> float:
    """Bytes one rank sends in one attention layer's forward + backward (mask not included)."""
    if n < 1:
        raise ValueError(f"a sequence-parallel group has at least one rank; got {n}")
    if kind == "ring":
        return 6 * (n - 1) * chunk_bytes
    if kind == "all_to_all":
        return 8 * (n - 1) / n * chunk_bytes
    raise ValueError(f"attention kind must be one of {ATTENTION_KINDS}; got {kind!r}")


def mask_gather_sent_bytes(n: int, mask_bytes: int) -> float:
    """Bytes sent to all-gather a ``mask_bytes`` padding mask (whole sequence) over ``n``."""
    return ring_gather_sent(mask_bytes, n)


def replica_grad_sent_bytes(param_bytes: int, sp: int, dp: int, two_step: bool = False) -> float:
    """Bytes one rank sends to sum a stage's gradients over its ``sp x dp`` replicas: one ring
    all-reduce over all ``sp dp`` (``2 (n-1)/n P``), or with ``two_step`` one over the SP group
    then one over the DP group (``2 (sp-1)/sp P + 2 (dp-1)/dp P``)."""
    if two_step:
        return ring_allreduce_sent(param_bytes, sp) + ring_allreduce_sent(param_bytes, dp)
    return ring_allreduce_sent(param_bytes, sp * dp)


RING_KINDS = ("seed", "flash")


def ring_flash_sent_bytes(n: int, chunk_bytes: int, grad_chunk_bytes: int | None = None) -> dict:
    """Bytes one rank sends in one online-softmax ring layer, per pass.

    ``{"forward": 2(N-1)E, "backward": 2(N-1)E + 2(N-1)G}``: keys and values travel the ring
    in each pass; in backward the dK/dV accumulators follow them (``G`` one chunk in the
    accumulation dtype, float32 or wider; ``G = E`` by default, as for float32/64 inputs).
    """
    if n < 1:
        raise ValueError(f"a context-parallel group has at least one rank; got {n}")
    g = chunk_bytes if grad_chunk_bytes is None else grad_chunk_bytes
    return {"forward": 2 * (n - 1) * chunk_bytes, "backward": 2 * (n - 1) * (chunk_bytes + g)}


def _check_split(seq_len: int, n: int) -> int:
    if n < 1 or seq_len % (2 * n):
        raise ValueError(
            f"sequence length {seq_len} must be a multiple of 2N = {2 * n} for N = {n} ranks"
        )
    return seq_len // n


def score_bytes(kind: str, b: int, h: int, seq_len: int, n: int, itemsize: int) -> int:
    """Bytes of the largest score tensor one rank holds: the seed's ``[b, H, C, L]`` matrix,
    or one online-softmax block ``[b, H, C/2, C/2]`` (transient, never saved)."""
    c = _check_split(seq_len, n)
    if kind == "seed":
        return b * h * c * seq_len * itemsize
    if kind == "flash":
        return b * h * (c // 2) ** 2 * itemsize
    raise ValueError(f"ring kind must be one of {RING_KINDS}; got {kind!r}")


def saved_activation_bytes(
    kind: str, b: int, h: int, seq_len: int, d: int, n: int, itemsize: int
) -> int:
    """Bytes one rank saves for backward in one attention layer (see the module docstring)."""
    c = _check_split(seq_len, n)
    chunk = b * h * c * d * itemsize
    if kind == "seed":
        return 3 * chunk + score_bytes("seed", b, h, seq_len, n, itemsize) + c * seq_len
    if kind == "flash":
        return 4 * chunk + b * h * c * max(itemsize, 4)
    raise ValueError(f"ring kind must be one of {RING_KINDS}; got {kind!r}")


def longest_sequence(
    kind: str, budget_bytes: int, b: int, h: int, d: int, n: int, itemsize: int
) -> int:
    """Longest sequence (a multiple of ``2N``) whose saved attention activations fit
    ``budget_bytes`` per rank; 0 if none does. Both sizes grow with ``L``, so step until over."""
    step = 2 * n

    def fits(length: int) -> bool:
        return saved_activation_bytes(kind, b, h, length, d, n, itemsize) <= budget_bytes

    lo, hi = 0, step
    while fits(hi):  # double, then bisect over multiples of 2N
        lo, hi = hi, 2 * hi
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
