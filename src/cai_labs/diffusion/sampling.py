"""Text-to-image sampling with classifier-free guidance, as in Stable Diffusion's pipeline.

Start from Gaussian noise ``x_T`` of shape ``(B, C, H, W)`` and let the sampling scheduler walk it
to an image in ``steps`` steps. At each step the UNet predicts the noise twice, with the prompt and
with the empty prompt, and the two are extrapolated:

    eps = eps_uncond + guidance * (eps_cond - eps_uncond)

``guidance = 1`` is the plain conditional model; larger values trade diversity for adherence to
the prompt. The model learns the unconditional prediction because training drops the caption of
a fraction of samples (see :class:`~cai_labs.diffusion.lightning_module.DiffusionModule`).

Reproducibility: all randomness comes from one ``torch.Generator`` seeded with ``seed`` (the
initial noise; DDIM with ``eta=0`` adds none afterwards), so the same seed and weights give the
same images bit for bit.
"""

from __future__ import annotations

import torch

from cai_labs.diffusion.model import DiffusionComponents

__all__ = ["encode_prompts", "generate"]


def encode_prompts(parts: DiffusionComponents, prompts: list[str]) -> torch.Tensor:
    """Prompts -> text-encoder hidden states ``(len(prompts), max_length, text_dim)``."""
    tokens = parts.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt")
    device = next(parts.text_encoder.parameters()).device
    out = parts.text_encoder(
        tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)
    )
    return out.last_hidden_state


@torch.no_grad()
def generate(
    parts: DiffusionComponents,
    prompts: list[str],
    *,
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
) -> torch.Tensor:
    """Images ``(len(prompts), C, H, W)`` in [-1, 1], one per prompt.

    Raises:
        ValueError: no prompts, ``steps`` < 1, or ``guidance`` < 0.
    """
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt string")
    if steps < 1:
        raise ValueError(f"steps must be at least 1; got {steps}")
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0 (1 = no guidance); got {guidance}")
    unet, scheduler = parts.unet, parts.sample_scheduler
    was_training = unet.training
    unet.eval()
    parts.text_encoder.eval()
    n = len(prompts)
    text = encode_prompts(parts, list(prompts) + [""] * n)  # conditional, then unconditional
    cfg = unet.config
    shape = (n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).to(text.device) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        eps = unet(model_in, t, encoder_hidden_states=text).sample
        eps_cond, eps_uncond = eps.chunk(2)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    if parts.vae is not None:
        x = parts.vae.decode(x / parts.vae.config.scaling_factor).sample
    unet.train(was_training)
    return x.clamp(-1, 1)
