"""Random valid (model, GPU, layout) configurations: what the calculator page is compared on.

The calculator's JavaScript (``docs/_static/scale_model.js``) must give the Python scale model's
numbers; the tests draw configurations here and compare the two on each.
"""

from __future__ import annotations

import dataclasses
import random

from cai_labs.scale.hardware import GPUS
from cai_labs.scale.layout import ScaleLayout
from cai_labs.scale.models import MODELS
from cai_labs.scale.predict import predict

__all__ = ["presets", "random_layout", "random_configs"]

_MODES = {"1d": [1, 2, 4, 8, 16], "2d": [4, 16], "2.5d": [8, 18], "3d": [8, 27]}


def presets() -> dict:
    """Models and GPUs as plain dicts (what the page's generated presets file holds)."""
    return {
        "models": {k: dataclasses.asdict(m) for k, m in MODELS.items()},
        "gpus": {k: dataclasses.asdict(g) for k, g in GPUS.items()},
    }


def random_layout(rng: random.Random) -> tuple[str, str, ScaleLayout]:
    model = rng.choice(sorted(MODELS))
    mode = rng.choice(sorted(_MODES))
    tp = rng.choice(_MODES[mode])
    depth = 2 if (mode == "2.5d" and tp == 8) else 2 if mode == "2.5d" else 1
    pp, sp, dp, mbs = (rng.choice(v) for v in ([1, 2, 4, 8], [1, 2, 4], [1, 2, 4, 8], [1, 2]))
    layout = ScaleLayout(
        dp=dp,
        tp=tp,
        tp_mode=mode,
        tp_depth=depth,
        pp=pp,
        schedule=rng.choice(["gpipe", "1f1b", "interleaved"]),
        chunks=rng.choice([1, 2]),
        sp=sp,
        zero=rng.choice([0, 1, 2, 3]),
        offload=rng.random() < 0.2,
        recompute=rng.choice(["none", "selective", "full"]),
        precision=rng.choice(["bf16", "bf16", "fp32"]),
        micro_batch_size=mbs,
        global_batch=dp * mbs * rng.choice([1, 4, 8, 16]),
        seq=rng.choice([None, 1024, 4096]),
        sequence_parallel=rng.random() < 0.7,
    )
    return model, rng.choice(sorted(GPUS)), layout


def random_configs(n: int, seed: int = 0) -> list[tuple[str, str, ScaleLayout]]:
    """``n`` configurations the Python model accepts (impossible ones are drawn and skipped)."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        model, gpu, layout = random_layout(rng)
        try:
            predict(model, gpu, layout)
        except ValueError:
            continue
        out.append((model, gpu, layout))
    return out
