"""PyTorch's own engines set up on the same GPT, to run side by side with cai_labs.

* :mod:`~cai_labs.peers.dtensor_tp` — 1D tensor parallel with DTensor (``ColwiseParallel`` /
  ``RowwiseParallel`` through ``parallelize_module`` on a ``DeviceMesh``).
* :mod:`~cai_labs.peers.torch_pipelining` — ``torch.distributed.pipelining`` stages with its
  GPipe and 1F1B schedules.
"""
