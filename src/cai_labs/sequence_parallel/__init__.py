"""Sequence parallelism: split one long sequence over N ranks, and attend across the split.

Every layer of a Transformer except attention works on each token alone (embeddings, layer norms,
MLPs, the loss), so those run unchanged on a rank's own chunk of the sequence. Attention is the
one place where tokens meet; two ways to do it across ranks live here:

* :mod:`~cai_labs.sequence_parallel.ring_attention` — ring self-attention (Li et al., 2021, the
  Colossal-AI sequence parallelism): key and value chunks travel around a ring of ranks.
* :mod:`~cai_labs.sequence_parallel.ring_flash` — the same ring with an online softmax
  (context parallelism of long-context training): no ``[C, L]`` scores, causal work balanced
  by zig-zag pieces.
* :mod:`~cai_labs.sequence_parallel.all_to_all_attention` — the DeepSpeed-Ulysses layout: two
  all-to-alls swap "all heads, my tokens" for "my heads, all tokens" and back.

:mod:`~cai_labs.sequence_parallel.chunking` holds how a sequence is cut and the serial twin;
:mod:`~cai_labs.sequence_parallel.bert` runs a transformers ``BertForMaskedLM`` on local chunks;
:mod:`~cai_labs.sequence_parallel.groups` lays ranks out as SP x DP x PP and
:mod:`~cai_labs.sequence_parallel.pipelined` cuts the BERT into pipeline stages whose layers run
sequence-parallel; :mod:`~cai_labs.sequence_parallel.gpt` runs a GPT's causal attention on
chunks (``Layout(sp=...)`` of :mod:`cai_labs.hybrid`).

The attention functions are imported from their modules
(``from cai_labs.sequence_parallel.ring_attention import ring_attention``); the package does not
re-export them, so that ``cai_labs.sequence_parallel.ring_attention`` is always the module.
"""

from cai_labs.sequence_parallel.chunking import (
    check_sequence_split,
    gather_padding_mask,
    serial_attention,
    split_sequence,
)

__all__ = [
    "serial_attention",
    "split_sequence",
    "check_sequence_split",
    "gather_padding_mask",
]
