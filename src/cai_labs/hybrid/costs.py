"""What one rank of a layout holds and sends per training step: the formulas.

For a :class:`~cai_labs.hybrid.layout.Layout` on a GPT of width ``d``, ``L`` blocks, vocabulary
``V``, sequence ``s`` and global batch ``B`` (``m`` micro-batches of ``B / (dp m)`` samples):

* **parameters**: the stage's blocks at the mode's per-rank size
  (:func:`cai_labs.tensor_parallel.formulas.block_cost`); the embeddings ``(V/t_v + s) d`` on the
  first stage, the final norm and head ``2d + (dV + V)/t_v`` on the last, where ``t_v = tp``
  with a vocabulary-parallel embedding and head and ``t_v = 1`` when they are replicated;
* **tensor-parallel traffic** (buffer bytes): the block formula per micro-batch and block;
  for 2D/2.5D/3D the all-gathers of the whole activation ``(B/dp) s d`` before the final norm
  (forward) and of the embeddings' gradient (backward); vocabulary-parallel adds the token
  embedding's all-reduce ``(B/dp) s d`` (first stage), the head input's gradient all-reduce
  ``(B/dp) s d`` and the loss's 3 all-reduces of ``(B/dp) s`` (last stage);
* **pipeline traffic** (bytes sent): ``(B/dp) s d / t`` forward (not on the last stage) and as
  many back (not on the first), ``t = 1`` in 1D, ``t = tp`` in 2D/2.5D/3D;
* **data-parallel traffic**: one all-reduce of this rank's gradients (its parameter bytes).

Everything is in fp32 bytes. The first step also carries a 64-byte shape header per pipeline
link and direction, not counted here. Sequence parallelism and ZeRO are not modelled here.
"""

from __future__ import annotations

from dataclasses import dataclass

from cai_labs.hybrid.layout import Layout
from cai_labs.models.gpt import GPTConfig
from cai_labs.pipeline.partition import partition_layers

__all__ = ["RankCost", "predicted_cost", "classify_comm"]

ELEM = 4


@dataclass(frozen=True)
class RankCost:
    """Bytes for one rank per step: parameters and the traffic of each parallel dimension."""

    param_bytes: int
    tp_bytes: int
    pp_bytes: int
    dp_bytes: int


def predicted_cost(cfg: GPTConfig, layout: Layout, batch: int, rank: int) -> RankCost:
    """The formulas of the module docstring for global ``rank`` with global batch ``batch``."""
    from cai_labs.tensor_parallel.formulas import block_cost, serial_block_params, vocab_loss_cost

    layout.validate(cfg, batch_size=batch)
    if layout.sp > 1 or layout.zero:
        raise ValueError("these formulas cover DP x PP x TP; use sp=1 and zero=0")
    _, s, _ = layout.coords(rank)
    n_blocks = len(partition_layers(cfg.n_layers, layout.pp)[s])
    first, last = s == 0, s == layout.pp - 1
    local = batch // layout.dp
    micro = local // layout.n_micro
    h, seq, V = cfg.d_model, cfg.seq_len, cfg.vocab_size
    act = local * seq * h * ELEM  # the whole activation of this replica's samples

    if layout.tp > 1:
        per_micro = block_cost(
            layout.tp_mode, layout.tp, micro, seq, h, cfg.mlp_ratio, depth=layout.tp_depth
        )
        block_params = per_micro.param_bytes
        tp = n_blocks * layout.n_micro * per_micro.comm_bytes
        split = layout.tp_mode != "1d"
        tp += act * (int(first) + int(last)) if split else 0
        shard = layout.tp if split else 1
    else:
        block_params, tp, shard = serial_block_params(h, cfg.mlp_ratio), 0, 1
    tv = layout.tp if layout.tp > 1 and layout.vocab_parallel else 1
    if tv > 1:  # the embedding's and the head input's all-reduces, the loss's three
        tp += act * (int(first) + int(last))
        tp += int(last) * layout.n_micro * vocab_loss_cost(tv, micro * seq, V).comm_bytes
    params = n_blocks * block_params
    params += (V // tv + seq) * h * ELEM if first else 0
    params += (2 * h + (h * V + V) // tv) * ELEM if last else 0
    pp = (int(not last) + int(not first)) * act // shard if layout.pp > 1 else 0
    dp = params if layout.dp > 1 else 0
    return RankCost(params, tp, pp, dp)


def classify_comm(records: list[dict], layout: Layout) -> dict[str, int]:
    """Split ledger records into ``tp``/``pp``/``dp`` bytes (buffer bytes; sends for ``pp``).

    Point-to-point calls are the pipeline's (only the sender's ``isend``/``send`` is counted);
    collectives over a data-parallel group are ``dp``; every other collective is ``tp``. With
    ``sp > 1`` the ring's sends would count as ``pp``: classify SP traffic with
    :func:`cai_labs.sequence_parallel.pipelined.traffic_by_kind` instead.
    """
    if layout.sp > 1:
        raise ValueError("classify_comm does not split sequence-parallel traffic; use sp=1")
    dp_groups = {tuple(g) for g in layout.dp_rank_lists()} if layout.dp > 1 else set()
    out = {"tp": 0, "pp": 0, "dp": 0}
    for r in records:
        if r["op"] in ("isend", "send"):
            out["pp"] += r["bytes"]
        elif r["op"] in ("irecv", "recv"):
            continue
        elif tuple(r["group"]) in dp_groups:
            out["dp"] += r["bytes"]
        else:
            out["tp"] += r["bytes"]
    return out
