"""Tensor parallelism in four modes, each checked against the serial GPT block.

* :mod:`~cai_labs.tensor_parallel.grid` — process grids and their groups (1D, 2D, 2.5D, 3D).
* :mod:`~cai_labs.tensor_parallel.layers_1d` — Megatron column/row-parallel linears.
* :mod:`~cai_labs.tensor_parallel.sequence_parallel_1d` — 1D plus sequence parallelism
  (Megatron SP): norms on sequence shards, all-gather / reduce-scatter around the linears.
* :mod:`~cai_labs.tensor_parallel.layers_2d` — SUMMA on a ``q x q`` grid.
* :mod:`~cai_labs.tensor_parallel.layers_2p5d` — Tesseract: ``d`` SUMMA layers, ``q x q x d``.
* :mod:`~cai_labs.tensor_parallel.layers_3d` — ``q x q x q`` cube.
* :mod:`~cai_labs.tensor_parallel.cross_entropy` — the loss of vocabulary-split logits (1D).
* :mod:`~cai_labs.tensor_parallel.opt_1d` — Hugging Face ``OPTForCausalLM`` split in 1D.
* :mod:`~cai_labs.tensor_parallel.modes` — the registry of modes, one :class:`~.modes.TPMode` each.
* :mod:`~cai_labs.tensor_parallel.formulas` — per-rank memory and communication per mode.
* :mod:`~cai_labs.tensor_parallel.check` — compare with the serial twin and measure.

Every mode offers the same entry points: ``parallelize_block(block, grid)``,
``split_input(x, grid)``, ``gather_output(y, grid)`` and ``gather_full(module, grads=False)``;
:func:`~cai_labs.tensor_parallel.modes.tp_mode` gives the :class:`~.modes.TPMode` of a mode.
The collectives and their mappings are in :mod:`cai_labs.comm`; the whole GPT on a grid (and in
any layout) is :func:`cai_labs.parallelize`.
"""

from cai_labs.tensor_parallel.grid import MODES, Grid, build_grids, grid_shape, make_grid

__all__ = ["MODES", "Grid", "build_grids", "grid_shape", "make_grid"]
