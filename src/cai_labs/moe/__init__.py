"""Mixture of experts and expert parallelism: ``E`` expert MLPs, ``E/N`` on each of ``N`` ranks.

* :mod:`~cai_labs.moe.router` — the top-k router: softmax gating, capacity, dropped tokens and
  the Switch/GShard load-balancing loss;
* :mod:`~cai_labs.moe.dispatch` — tokens into fixed ``[E, C, d]`` buffers and back;
* :mod:`~cai_labs.moe.layer` — the serial layer (the twin);
* :mod:`~cai_labs.moe.expert_parallel` — the expert-parallel layer: dispatch by all-to-all,
  combine by the inverse all-to-all (:func:`cai_labs.comm.all_to_all_group`);
* :mod:`~cai_labs.moe.formulas` — capacity, all-to-all bytes, expert parameters per rank.
"""

from cai_labs.moe.expert_parallel import ExpertParallelMoE
from cai_labs.moe.layer import Expert, MoELayer
from cai_labs.moe.router import Routing, TopKRouter

__all__ = ["TopKRouter", "Routing", "Expert", "MoELayer", "ExpertParallelMoE"]
