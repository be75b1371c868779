"""The scale model's answer for one model, GPU type, GPU count and layout."""

from __future__ import annotations

from dataclasses import dataclass, field

from cai_labs.scale.hardware import GPU, get_gpu
from cai_labs.scale.layout import ScaleLayout
from cai_labs.scale.memory import memory_per_gpu, params_per_gpu
from cai_labs.scale.models import ModelShape, get_model
from cai_labs.scale.step import step_flops, step_times

__all__ = ["Prediction", "predict"]


@dataclass(frozen=True)
class Prediction:
    """Memory per GPU (bytes), step time (s), throughput and what bounds the step."""

    model: str
    gpu: str
    gpus: int
    memory_per_gpu_bytes: dict[str, float]
    fits: bool
    step_time_s: float | None
    tokens_per_s_per_gpu: float | None
    mfu: float | None
    hardware_flops_per_s_per_gpu: float | None
    bound: str | None
    times_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def predict(model: ModelShape | str, gpu: GPU | str, layout: ScaleLayout) -> Prediction:
    """Validate ``layout`` for ``model`` on ``layout.gpus`` GPUs of type ``gpu``, then predict."""
    model = get_model(model) if isinstance(model, str) else model
    gpu = get_gpu(gpu) if isinstance(gpu, str) else gpu
    layout.validate(model, layout.gpus)
    notes = []
    if not model.is_transformer:
        if layout.tp > 1 or layout.pp > 1 or layout.sp > 1:
            raise ValueError(
                f"{model.name} is not a transformer stack: only data parallelism and ZeRO are "
                "modeled for it; set tp, pp and sp to 1"
            )
        notes.append("activations not modeled for this model (model states only)")
    mem = memory_per_gpu(model, layout)
    fits = mem["total"] <= gpu.hbm_bytes
    if not fits:
        notes.append(f"does not fit: {mem['total'] / 1e9:.1f} GB > {gpu.hbm_bytes / 1e9:.0f} GB")
    if model.forward_flops_per_token(layout.seq_len(model)) is None:
        notes.append("no published FLOP count: step time not modeled")
        return Prediction(
            model.name, gpu.name, layout.gpus, mem, fits, None, None, None, None, None, {}, notes
        )
    t = step_times(model, layout, gpu, params_per_gpu(model, layout))
    flops, hw = step_flops(model, layout)
    step = t["step"]
    tokens = layout.batch() * layout.seq_len(model)
    peak = gpu.peak(layout.precision)
    return Prediction(
        model=model.name,
        gpu=gpu.name,
        gpus=layout.gpus,
        memory_per_gpu_bytes=mem,
        fits=fits,
        step_time_s=step,
        tokens_per_s_per_gpu=tokens / step / layout.gpus,
        mfu=flops / (step * layout.gpus * peak),
        hardware_flops_per_s_per_gpu=hw / (step * layout.gpus),
        bound=max(t["terms"], key=t["terms"].get),
        times_s=t["terms"],
        notes=notes,
    )
