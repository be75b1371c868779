"""Colossal-AI 0.5.0's components, and where this site implements and teaches each idea.

One row per component: the 0.5.0 APIs that are its entry points (dotted names, resolved by
:func:`cai_labs.colossal.check.check_names`), the cai_labs module that implements the same
idea, the tutorial that teaches it, and the checked snippet that uses it. :func:`draw` lays
the components out as the layers a training script goes through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["Component", "COMPONENTS", "draw"]


@dataclass(frozen=True)
class Component:
    """A component of Colossal-AI and its counterparts on this site."""

    name: str
    apis: tuple[str, ...]
    module: str  # the cai_labs module of the same idea ("" where the site has none)
    tutorial: str  # the tutorial's file stem
    snippet: str  # the checked snippet's function name
    layer: int  # row of the diagram: 0 launch, 1 booster, 2 parallel engines, 3 around them


COMPONENTS = [
    Component(
        "launcher",
        ("colossalai.launch_from_torch", "colossalai.cli.launcher.run"),
        "cai_labs.launcher",
        "tutorial_00_data_parallel",
        "colossalai_worker",
        0,
    ),
    Component(
        "Booster",
        ("colossalai.booster.Booster", "colossalai.booster.plugin.TorchDDPPlugin"),
        "cai_labs.data_parallel",
        "tutorial_00_data_parallel",
        "colossalai_worker",
        1,
    ),
    Component(
        "TorchFSDPPlugin, LowLevelZeroPlugin",
        (
            "colossalai.booster.plugin.TorchFSDPPlugin",
            "colossalai.booster.plugin.LowLevelZeroPlugin",
            "colossalai.zero.LowLevelZeroOptimizer",
        ),
        "cai_labs.zero",
        "tutorial_05_opt_zero_offload",
        "colossalai_finetune",
        2,
    ),
    Component(
        "GeminiPlugin: chunks + HybridAdam",
        (
            "colossalai.booster.plugin.GeminiPlugin",
            "colossalai.zero.gemini.ChunkManager",
            "colossalai.nn.optimizer.HybridAdam",
        ),
        "cai_labs.offload",
        "tutorial_05_opt_zero_offload",
        "colossalai_finetune",
        2,
    ),
    Component(
        "HybridParallelPlugin",
        ("colossalai.booster.plugin.HybridParallelPlugin",),
        "cai_labs.hybrid",
        "tutorial_01_multidim_parallel",
        "colossalai_hybrid_parallel",
        2,
    ),
    Component(
        "MoeHybridParallelPlugin",
        ("colossalai.booster.plugin.MoeHybridParallelPlugin",),
        "cai_labs.moe",
        "tutorial_08_colossalai_system",
        "colossalai_moe",
        2,
    ),
    Component(
        "ShardFormer + policies",
        (
            "colossalai.shardformer.ShardFormer",
            "colossalai.shardformer.ShardConfig",
            "colossalai.shardformer.policies.auto_policy.get_autopolicy",
        ),
        "cai_labs.tensor_parallel.opt_1d",
        "tutorial_05_opt_zero_offload",
        "colossalai_finetune",
        2,
    ),
    Component(
        "sequence parallelism (in HybridParallelPlugin)",
        ("colossalai.shardformer.layer.attn.RingAttention",),
        "cai_labs.sequence_parallel",
        "tutorial_02_sequence_parallel",
        "colossalai_sequence_parallel",
        2,
    ),
    Component(
        "pipeline schedules",
        (
            "colossalai.pipeline.schedule.OneForwardOneBackwardSchedule",
            "colossalai.pipeline.stage_manager.PipelineStageManager",
        ),
        "cai_labs.pipeline",
        "tutorial_01_multidim_parallel",
        "colossalai_hybrid_parallel",
        2,
    ),
    Component(
        "Lars, Lamb",
        ("colossalai.nn.optimizer.Lars", "colossalai.nn.optimizer.Lamb"),
        "cai_labs.optim",
        "tutorial_04_large_batch",
        "colossalai_large_batch",
        3,
    ),
    Component(
        "checkpoint I/O, lazy init",
        ("colossalai.checkpoint_io.GeneralCheckpointIO", "colossalai.lazy.LazyInitContext"),
        "cai_labs.recipes.opt_finetune",
        "tutorial_08_colossalai_system",
        "colossalai_checkpoint",
        3,
    ),
    Component(
        "auto-parallel",
        ("colossalai.auto_parallel.tensor_shard.initialize.autoparallelize",),
        "cai_labs.auto_parallel",
        "tutorial_03_auto_parallel",
        "colossalai_autoparallel",
        3,
    ),
    Component(
        "inference engine",
        ("colossalai.inference.InferenceEngine", "colossalai.inference.InferenceConfig"),
        "cai_labs.serving",
        "tutorial_06_serving",
        "colossalai_generate",
        3,
    ),
]

_LAYERS = ("launch", "Booster + plugin", "parallel engines", "around the training loop")


def draw(ax: Axes) -> None:
    """The components as boxes, one row per layer, on the matplotlib axes ``ax``."""
    ax.set_axis_off()
    rows = [[c for c in COMPONENTS if c.layer == layer] for layer in range(len(_LAYERS))]
    for y, (label, row) in enumerate(zip(_LAYERS, rows)):
        ax.text(-0.02, -y, label, ha="right", va="center", fontsize=9, style="italic")
        for x, comp in enumerate(row):
            left = x / len(row)
            ax.text(
                left + 0.5 / len(row),
                -y,
                comp.name.replace(": ", ":\n").replace(", ", ",\n").replace(" (", "\n("),
                ha="center",
                va="center",
                fontsize=7.5,
                bbox={"boxstyle": "round", "facecolor": f"C{y}", "alpha": 0.25},
            )
        if y:
            ax.annotate("", (0.5, -y + 0.3), (0.5, -y + 0.7), arrowprops={"arrowstyle": "->"})
    ax.set(xlim=(-0.3, 1.0), ylim=(-len(_LAYERS) + 0.4, 0.6))
