"""A training layout on a GPU cluster, checked against a model and a GPU count.

Ranks are ordered with tensor parallelism innermost, then sequence/context parallelism, then
pipeline stages, then data-parallel replicas (Megatron-LM's order), so a TP group of at most
one node's GPUs stays on NVLink. The checks raise the same errors as the CPU code
(:func:`cai_labs.tensor_parallel.grid.grid_shape`, :func:`~cai_labs.tensor_parallel.grid.
check_divisible`, :func:`cai_labs.pipeline.formulas.bubble_fraction`).
"""

from __future__ import annotations

from dataclasses import dataclass

from cai_labs.pipeline.formulas import PIPELINE_SCHEDULES, bubble_fraction
from cai_labs.scale.models import ModelShape
from cai_labs.tensor_parallel.formulas import RECOMPUTE
from cai_labs.tensor_parallel.grid import check_divisible, grid_shape

__all__ = ["ScaleLayout", "PRECISIONS"]

PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class ScaleLayout:
    """Sizes of each dimension and the choices of each technique.

    ``sp`` is context (sequence) parallelism over ``sp`` ranks with ring attention;
    ``sequence_parallel`` is Megatron's split of the norms and dropouts inside the TP group
    (on by default with TP 1D). ``microbatches`` defaults to ``global_batch / (dp mbs)``.
    """

    dp: int = 1
    tp: int = 1
    tp_mode: str = "1d"
    tp_depth: int = 1
    pp: int = 1
    schedule: str = "1f1b"
    microbatches: int | None = None
    chunks: int = 1
    sp: int = 1
    zero: int = 0
    offload: bool = False
    recompute: str = "none"
    precision: str = "bf16"
    micro_batch_size: int = 1
    global_batch: int | None = None
    seq: int | None = None
    sequence_parallel: bool = True

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp * self.sp

    def seq_len(self, model: ModelShape) -> int:
        return model.seq if self.seq is None else self.seq

    def n_micro(self) -> int:
        if self.microbatches is not None:
            return self.microbatches
        if self.global_batch is None:
            return 1
        return self.global_batch // (self.dp * self.micro_batch_size)

    def batch(self) -> int:
        """Global batch in samples."""
        return self.dp * self.micro_batch_size * self.n_micro()

    def validate(self, model: ModelShape, gpus: int) -> None:
        """Raise a ValueError that says what to change if the layout cannot run."""
        self._check_sizes(gpus)
        grid_shape(self.tp_mode, self.tp, self.tp_depth)  # 2D square, 3D cube, 2.5D q*q*d
        if self.schedule not in PIPELINE_SCHEDULES:
            raise ValueError(f"schedule must be one of {PIPELINE_SCHEDULES}; got {self.schedule!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}; got {self.recompute!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}; got {self.precision!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"zero must be 0 (data parallel), 1, 2 or 3; got {self.zero}")
        self._check_batch()
        if self.pp > 1:
            bubble_fraction(self.schedule, self.pp, self.n_micro(), self.chunks)
        if model.is_transformer:
            self._check_model(model)

    def _check_sizes(self, gpus: int) -> None:
        for what in ("dp", "tp", "pp", "sp", "chunks", "micro_batch_size"):
            v = getattr(self, what)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{what} must be a positive integer; got {v!r}")
        if self.gpus != gpus:
            raise ValueError(
                f"dp x tp x pp x sp = {self.dp} x {self.tp} x {self.pp} x {self.sp} = "
                f"{self.gpus} GPUs, but --gpus is {gpus}; make the product equal the GPU count"
            )

    def _check_batch(self) -> None:
        if self.global_batch is not None and self.global_batch % (self.dp * self.micro_batch_size):
            raise ValueError(
                f"a global batch of {self.global_batch} does not split into dp={self.dp} "
                f"replicas of micro-batches of {self.micro_batch_size}; use a multiple of "
                f"{self.dp * self.micro_batch_size}"
            )
        if self.n_micro() < 1:
            raise ValueError("the global batch gives no micro-batch per replica; raise it")

    def _check_model(self, model: ModelShape) -> None:
        split = self.tp if self.tp_mode == "1d" else grid_shape(self.tp_mode, self.tp)[-1]
        mode = self.tp_mode.upper()
        check_divisible("heads", model.heads, split, mode)
        check_divisible("hidden", model.hidden, split, mode)
        check_divisible("ffn", model.f, split, mode)
        if self.tp_mode == "1d" and model.kv % self.tp and self.tp % model.kv:
            raise ValueError(
                f"tp={self.tp} neither divides nor is a multiple of kv_heads={model.kv}; change tp"
            )
        if self.pp > model.layers:
            raise ValueError(
                f"pp={self.pp} pipeline stages need at least {self.pp} transformer blocks; the "
                f"model has {model.layers}. Lower pp"
            )
        seq = self.seq_len(model)
        if seq % self.sp:
            raise ValueError(
                f"a sequence of {seq} tokens does not split over sp={self.sp} ranks; "
                f"use a length divisible by {self.sp}"
            )
