"""The diffusion model as a Lightning ``LightningModule``: what one training step is.

One step, for a batch of images ``x_0`` ``(B, C, H, W)`` and their captions:

1. drop each caption with probability ``uncond_prob`` (replace it by ``""``), so the same network
   also learns the unconditional model that classifier-free guidance needs at sampling time;
2. encode the captions: ``(B, L)`` ids -> ``(B, L, text_dim)`` states (the text encoder trains too:
   ours starts from random weights, unlike Stable Diffusion's frozen pre-trained CLIP);
3. draw a timestep ``t ~ U{0..T-1}`` and noise ``eps ~ N(0, I)`` per sample and form
   ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (:meth:`DDPMScheduler.add_noise`);
4. the loss is ``|| target - unet(x_t, t, text) ||^2`` with ``target = eps`` (the simplified DDPM
   objective) or, for ``prediction_type="v_prediction"`` (the default, see
   :class:`~cai_labs.diffusion.model.TinyDiffusionConfig`),
   ``target = v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0`` (:meth:`DDPMScheduler.get_velocity`).

The randomness of a step (dropped captions, ``t``, ``eps``) comes from a generator seeded by
``(seed, global_step, rank)``, not from the global RNG. So two strategies that see the same data see
the same noise, and a run resumed from a checkpoint draws what the uninterrupted run would have
drawn: both are things the tests compare exactly.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from cai_labs.diffusion.model import DiffusionComponents, TinyDiffusionConfig, build_components

__all__ = ["DiffusionModule", "collate"]


def collate(
    batch: list[tuple[torch.Tensor, str, int]],
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Stack images, keep captions as a list of strings, stack labels."""
    images, captions, labels = zip(*batch)
    return torch.stack(images), list(captions), torch.tensor(labels)


class DiffusionModule(pl.LightningModule):
    """Text-conditional denoising diffusion on the parts of :func:`build_components`.

    Args:
        config: model sizes.
        lr: AdamW learning rate.
        uncond_prob: fraction of captions replaced by the empty prompt during training.
        seed: weights and per-step noise seed.
        gradient_checkpointing: recompute the UNet's block activations during backward instead of
            storing them (``UNet2DConditionModel.enable_gradient_checkpointing``): less activation
            memory for about one extra forward of compute.
    """

    def __init__(
        self,
        config: TinyDiffusionConfig | None = None,
        lr: float = 2e-3,
        uncond_prob: float = 0.1,
        seed: int = 0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= uncond_prob < 1.0:
            raise ValueError(f"uncond_prob must be in [0, 1); got {uncond_prob}")
        self.config = config or TinyDiffusionConfig()
        self.lr, self.uncond_prob, self.seed = lr, uncond_prob, seed
        parts = build_components(self.config, seed=seed)
        self.unet = parts.unet
        self.text_encoder = parts.text_encoder
        self.tokenizer = parts.tokenizer
        self.noise_scheduler = parts.noise_scheduler
        self.sample_scheduler = parts.sample_scheduler
        self.vae = parts.vae
        if self.vae is not None:
            self.vae.requires_grad_(False)  # trained beforehand, frozen as in Stable Diffusion
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.loss_history: list[float] = []  # this rank's loss, one per optimizer step

    @property
    def parts(self) -> DiffusionComponents:
        """The model as a :class:`DiffusionComponents`, e.g. for :func:`generate`."""
        return DiffusionComponents(
            self.unet,
            self.text_encoder,
            self.tokenizer,
            self.noise_scheduler,
            self.sample_scheduler,
            self.vae,
        )

    def step_generator(self) -> torch.Generator:
        """The generator of this step's randomness: a function of (seed, step, rank) only."""
        key = (self.seed * 1_000_003 + self.global_step) * 1_009 + self.global_rank
        return torch.Generator().manual_seed(key)

    def diffusion_loss(
        self, images: torch.Tensor, captions: list[str], generator: torch.Generator
    ) -> torch.Tensor:
        """The DDPM loss of one batch (steps 1-4 of the module docstring)."""
        b = images.shape[0]
        drop = torch.rand(b, generator=generator) < self.uncond_prob
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        tokens = self.tokenizer(
            captions, padding="max_length", truncation=True, return_tensors="pt"
        )
        text = self.text_encoder(
            tokens.input_ids.to(images.device),
            attention_mask=tokens.attention_mask.to(images.device),
        )
        x0 = images
        if self.vae is not None:
            with torch.no_grad():
                x0 = self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=generator
        ).to(images.device)
        noise = torch.randn(x0.shape, generator=generator).to(images.device)
        xt = self.noise_scheduler.add_noise(x0, noise, t)
        pred = self.unet(xt, t, encoder_hidden_states=text.last_hidden_state).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(x0, noise, t)
        else:
            target = noise
        return F.mse_loss(pred.float(), target)

    def training_step(
        self, batch: tuple[torch.Tensor, list[str], torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        """The diffusion loss of ``batch = (images, captions, labels)``; records it."""
        images, captions, _ = batch
        loss = self.diffusion_loss(images, captions, self.step_generator())
        self.loss_history.append(loss.item())
        return loss

    def zero_units(self) -> list[torch.nn.Module]:
        """Flat units for ZeRO (:class:`~cai_labs.lightning.zero_strategy.ZeroStrategy`): each
        UNet down/up block, its middle block, each text-encoder layer; the rest is the root unit."""
        unet = self.unet
        blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
        return [m for m in (*blocks, *self.text_encoder.encoder.layers) if m is not None]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters (a ZeRO strategy shards it later)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the loss history in the checkpoint, so a resumed run continues the curve."""
        checkpoint["loss_history"] = list(self.loss_history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the loss history saved by :meth:`on_save_checkpoint`."""
        self.loss_history = list(checkpoint.get("loss_history", []))
