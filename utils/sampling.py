"""From user indices and seeds to images: classifier-free guided sampling in the latent
space, then the VAE decoder. Shared by stage-2 validation and inference/generate.py.

Each image's starting noise comes from its own seed, so an image is reproducible from
(user, seed) alone, whatever batch it was generated in.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from utils.cli import UsageError
from utils.condition_encoder import UserConditionEncoder
from utils.data_loader import MANIFEST_NAME, DatasetManifest
from utils.vae import load_vae

GENERATOR_INFO = "generator.json"  # in a stage-2 final_model: label map, null index, latent scaling and shape
SAMPLERS = {"dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler}


def make_sampler(scheduler_config, name="dpm"):
    """A sampling scheduler with the training schedule's betas and prediction type."""
    return SAMPLERS[name].from_config(scheduler_config)


@torch.no_grad()
def sample_latents(unet, condition_encoder, scheduler, user_indices, seeds, latent_shape, guidance_scale,
                   num_inference_steps, progress=None):
    """Latents (B, C, h, w) for the users `user_indices` (B,) from per-image `seeds`.

    guidance_scale 1 is the conditional model alone; above 1 the conditional and the
    null-token predictions come from one batched UNet call and are extrapolated:
    pred = uncond + scale * (cond - uncond) (Ho & Salimans, 2022)."""
    device = user_indices.device
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    noise = torch.stack([torch.randn(tuple(latent_shape), generator=g) for g in generators]).to(device)
    scheduler.set_timesteps(num_inference_steps, device=device)
    latents = noise * scheduler.init_noise_sigma
    guided = guidance_scale != 1.0
    tokens = condition_encoder(user_indices)
    if guided:
        null = torch.full_like(user_indices, condition_encoder.config.num_users)
        tokens = torch.cat([tokens, condition_encoder(null)])
    timesteps = scheduler.timesteps if progress is None else progress(scheduler.timesteps)
    for t in timesteps:
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        prediction = unet(model_input, t, encoder_hidden_states=tokens.to(unet.dtype)).sample.float()
        if guided:
            conditional, unconditional = prediction.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        latents = scheduler.step(prediction, t, latents, generator=generators).prev_sample
    return latents


@torch.no_grad()
def decode_latents(vae, latents, scaling_factor):
    """Diffusion-space latents -> images in [-1, 1], (B, 3, R, R)."""
    return vae.decode((latents / scaling_factor).to(vae.dtype)).sample.float().clamp(-1, 1)


@dataclass
class UserGenerator:
    """A stage-2 final_model in memory: everything needed to turn (user, seed) into an image."""

    vae: torch.nn.Module
    unet: torch.nn.Module
    condition_encoder: torch.nn.Module
    scheduler_config: dict
    info: dict  # generator.json
    manifest: DatasetManifest

    def to(self, device):
        for module in (self.vae, self.unet, self.condition_encoder):
            module.to(device)
        return self

    @torch.no_grad()
    def generate(self, user_indices, seeds, guidance_scale=None, num_inference_steps=None, sampler="dpm", progress=None):
        """Images (B, 3, R, R) in [-1, 1] for label-map indices `user_indices` (B,)."""
        device = self.unet.device
        latents = sample_latents(
            self.unet, self.condition_encoder, make_sampler(self.scheduler_config, sampler),
            torch.as_tensor(user_indices, device=device), seeds, self.info["latent_shape"],
            self.info["guidance_scale"] if guidance_scale is None else guidance_scale,
            num_inference_steps or self.info["num_inference_steps"], progress,
        )
        return decode_latents(self.vae, latents, self.info["scaling_factor"])


def load_generator(model_path, flag="--model_path"):
    """A UserGenerator from a stage-2 final_model folder alone (no data folder, no pickles)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    path = Path(model_path)
    if not (path / GENERATOR_INFO).exists():
        raise UsageError(f"{flag} {path} is not a stage-2 final_model: no {GENERATOR_INFO} (train one with training/train_diffusion.py)")
    info = json.loads((path / GENERATOR_INFO).read_text())
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet").eval()
        condition_encoder = UserConditionEncoder.from_pretrained(path / "condition_encoder").eval()
        scheduler_config = DDPMScheduler.load_config(path / "scheduler")
    except (OSError, ValueError, RuntimeError) as error:
        raise UsageError(f"{flag} {path}: cannot load the model ({str(error).splitlines()[0]})") from None
    manifest = DatasetManifest.load(path / MANIFEST_NAME)
    if manifest.label_map != info["label_map"] or condition_encoder.config.num_users != manifest.num_users:
        raise UsageError(f"{flag} {path}: generator.json, the manifest and the condition encoder disagree on the users")
    return UserGenerator(load_vae(path / "vae", flag), unet, condition_encoder, scheduler_config, info, manifest)
