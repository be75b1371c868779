"""A text-to-image diffusion model from the real Stable Diffusion classes, at toy size.

Stable Diffusion is four parts, and so is this model:

* a **text encoder**, transformers' :class:`~transformers.CLIPTextModel`: prompt ids
  ``(B, L)`` -> hidden states ``(B, L, text_dim)`` that the UNet attends to;
* a **denoiser**, diffusers' :class:`~diffusers.UNet2DConditionModel`: noisy image ``(B, C, H, W)``,
  timestep ``(B,)`` and text states -> predicted noise ``(B, C, H, W)``; its cross-attention
  blocks are where the prompt steers the image;
* **noise schedulers**: :class:`~diffusers.DDPMScheduler` adds noise for training
  (``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``), and a faster sampler
  (:class:`~diffusers.DDIMScheduler`) walks from noise to an image in a few dozen steps;
* an **autoencoder**, diffusers' :class:`~diffusers.AutoencoderKL`, which Stable Diffusion uses to
  run the UNet on a latent 8x smaller per side. Optional here (``latent_channels=0`` means pixel
  space): see :class:`TinyDiffusionConfig` for when it pays.

Everything is built from configs, offline; :func:`save_components` / :func:`load_components`
write and read the usual ``save_pretrained`` directories, so a reader with real weights can point
:func:`load_components` at them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerBase

from cai_labs.diffusion.tokenizer import build_tokenizer

__all__ = [
    "TinyDiffusionConfig",
    "DiffusionComponents",
    "build_components",
    "save_components",
    "load_components",
]


@dataclass(frozen=True)
class TinyDiffusionConfig:
    """Sizes of every part, and two choices that decide whether the prompt is followed.

    The defaults train on 16x16 digits in about a minute of CPU per rank.

    Pixel space or latent space: an autoencoder helps when it shrinks the image a lot (Stable
    Diffusion: 512x512x3 = 786,432 numbers -> 64x64x4 = 16,384, 48x fewer, so the UNet's cost falls
    by about as much). For a 16x16x1 digit a 2x-downsampling autoencoder gives 8x8x4 = 256 numbers:
    exactly as many as the pixels, so it saves nothing and costs a training stage. Hence
    ``latent_channels=0`` (pixel space) by default; set it to 4 to put an ``AutoencoderKL`` in
    front.

    Following the prompt, in a few hundred steps:

    * ``prediction_type="v_prediction"``: the UNet predicts ``v = sqrt(abar_t) eps -
      sqrt(1 - abar_t) x_0`` instead of the noise ``eps``. Which digit an image becomes is decided
      in the noisiest steps, where ``x_t`` is almost pure noise: there predicting ``eps`` is nearly
      free (``eps ~ x_t``) and an error in the image costs the ``eps`` loss only ``abar_t`` times
      the ``v`` loss, so an ``eps`` model gets almost no gradient for learning the prompt where it
      matters. ``v`` (Stable Diffusion 2's choice) weighs the image there fully.
    * ``text_in_time_embedding=True``: besides the cross-attention blocks, the text states are
      attention-pooled and added to the timestep embedding (diffusers'
      ``addition_embed_type="text"``, as in DeepFloyd IF), which reaches every ResNet block, also
      the full-resolution ones that have no cross-attention.

    ``block_channels`` defaults to ``(16, 32)``: at this budget a smaller UNet that takes more
    steps learns the prompt sooner than a wider one that takes fewer.
    """

    image_size: int = 16
    image_channels: int = 1
    block_channels: tuple[int, ...] = (16, 32)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    text_dim: int = 32
    text_layers: int = 1
    text_heads: int = 2
    max_prompt_length: int = 8
    train_timesteps: int = 1000
    latent_channels: int = 0  # 0: the UNet works on pixels; >0: on an AutoencoderKL latent
    text_in_time_embedding: bool = True
    prediction_type: str = "v_prediction"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image_size % 2 ** (len(self.block_channels) - 1):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**(len(block_channels)-1) = "
                f"{2 ** (len(self.block_channels) - 1)}: each down block but the last halves it"
            )
        if any(c % 8 for c in self.block_channels):
            raise ValueError(
                f"block_channels must be multiples of 8 (GroupNorm of 8 groups); got "
                f"{self.block_channels}"
            )
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type must be 'epsilon' or 'v_prediction'; got {self.prediction_type!r}"
            )
        if self.text_dim % self.text_heads:
            raise ValueError(
                f"text_dim {self.text_dim} must be divisible by text_heads {self.text_heads}"
            )


@dataclass
class DiffusionComponents:
    """The parts of the model, as in a diffusers pipeline."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerBase
    noise_scheduler: DDPMScheduler
    sample_scheduler: DDIMScheduler
    vae: AutoencoderKL | None = None


def build_components(config: TinyDiffusionConfig, seed: int = 0) -> DiffusionComponents:
    """Every part with fresh weights drawn from ``seed`` (the same on every rank)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(config.max_prompt_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_dim,
            intermediate_size=4 * config.text_dim,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_prompt_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    vae = None
    channels = config.image_channels
    sample_size = config.image_size
    if config.latent_channels:
        vae = AutoencoderKL(
            in_channels=config.image_channels,
            out_channels=config.image_channels,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(16, 32),
            latent_channels=config.latent_channels,
            norm_num_groups=8,
            sample_size=config.image_size,
        )
        channels, sample_size = config.latent_channels, config.image_size // 2
    n = len(config.block_channels)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=config.block_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        layers_per_block=config.layers_per_block,
        attention_head_dim=config.attention_head_dim,
        cross_attention_dim=config.text_dim,
        norm_num_groups=8,
        **(
            {"addition_embed_type": "text", "addition_embed_type_num_heads": config.text_heads}
            if config.text_in_time_embedding
            else {}
        ),
    )
    schedule = {
        "num_train_timesteps": config.train_timesteps,
        "beta_schedule": "squaredcos_cap_v2",
        "clip_sample": True,
        "prediction_type": config.prediction_type,
    }
    return DiffusionComponents(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=DDPMScheduler(**schedule),
        sample_scheduler=DDIMScheduler(**schedule),
        vae=vae,
    )


def save_components(parts: DiffusionComponents, path: str | os.PathLike) -> None:
    """Write each part with ``save_pretrained`` under ``path/<part>`` (diffusers' layout)."""
    parts.unet.save_pretrained(os.path.join(path, "unet"))
    parts.text_encoder.save_pretrained(os.path.join(path, "text_encoder"))
    parts.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    parts.noise_scheduler.save_pretrained(os.path.join(path, "scheduler"))
    if parts.vae is not None:
        parts.vae.save_pretrained(os.path.join(path, "vae"))


def load_components(path: str | os.PathLike) -> DiffusionComponents:
    """Read a directory written by :func:`save_components` (or a real Stable Diffusion one)."""
    noise = DDPMScheduler.from_pretrained(os.path.join(path, "scheduler"))
    vae_dir = os.path.join(path, "vae")
    return DiffusionComponents(
        # low_cpu_mem_usage=False: the default path wants `accelerate`, and says so at length.
        unet=UNet2DConditionModel.from_pretrained(
            os.path.join(path, "unet"), low_cpu_mem_usage=False
        ),
        text_encoder=CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder")),
        tokenizer=AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer")),
        noise_scheduler=noise,
        sample_scheduler=DDIMScheduler.from_config(noise.config),
        vae=(
            AutoencoderKL.from_pretrained(vae_dir, low_cpu_mem_usage=False)
            if os.path.isdir(vae_dir)
            else None
        ),
    )


def config_dict(config: TinyDiffusionConfig) -> dict:
    """The config as plain data (for hyper-parameter logging)."""
    return asdict(config)
