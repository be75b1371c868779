"""Stable Diffusion's parts at toy size: tokenizer, captioned digits, model, Lightning module,
guided sampling, and a digit judge that scores generated images."""

from cai_labs.diffusion.model import (
    DiffusionComponents,
    TinyDiffusionConfig,
    build_components,
    load_components,
    save_components,
)
from cai_labs.diffusion.sampling import generate

__all__ = [
    "TinyDiffusionConfig",
    "DiffusionComponents",
    "build_components",
    "save_components",
    "load_components",
    "generate",
]
