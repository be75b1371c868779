"""The scale model: per-GPU memory and step time of real models on real GPU clusters.

Built on the formulas each technique package checks against the ledger on CPU ranks
(``<technique>/formulas.py``), with published model shapes (:mod:`~cai_labs.scale.models`),
datasheet GPUs (:mod:`~cai_labs.scale.hardware`) and a layout (:mod:`~cai_labs.scale.layout`);
:mod:`~cai_labs.scale.published` holds the published runs it is checked against.
``python -m cai_labs.scale --help`` is the command line.
"""

from cai_labs.scale.hardware import GPU, GPUS, get_gpu
from cai_labs.scale.layout import ScaleLayout
from cai_labs.scale.memory import memory_per_gpu, params_per_gpu
from cai_labs.scale.models import MODELS, ModelShape, custom_model, get_model
from cai_labs.scale.predict import Prediction, predict

__all__ = [
    "GPU",
    "GPUS",
    "get_gpu",
    "MODELS",
    "ModelShape",
    "custom_model",
    "get_model",
    "ScaleLayout",
    "memory_per_gpu",
    "params_per_gpu",
    "Prediction",
    "predict",
]
