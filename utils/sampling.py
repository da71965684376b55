"""From user indices and seeds to images: classifier-free guided sampling in the latent
space, then the VAE decoder. Shared by stage-2 validation and inference/generate.py.

Each image's starting noise comes from its own seed, so an image is reproducible from
(user, seed) alone, whatever batch it was generated in (up to the last float bits, which
kernels for another batch size round differently).
"""

import torch

# name -> (diffusers scheduler class name, its default number of steps, options); by name, so that
# the scripts' --help does not wait for diffusers to import.
SAMPLERS = {
    # The default: the fresh noise of a stochastic sampler corrects what the deterministic ones
    # carry along, and it kept more identity than the ODE solvers (docs/experiments.md).
    "dpmsolver_sde": ("DPMSolverMultistepScheduler", 25, {"algorithm_type": "sde-dpmsolver++"}),
    "dpmsolver": ("DPMSolverMultistepScheduler", 25, {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", 50, {}),
    "euler": ("EulerDiscreteScheduler", 30, {}),
    "ddpm": ("DDPMScheduler", 1000, {}),
}
DEFAULT_SAMPLER = "dpmsolver_sde"
DTYPES = ("auto", "fp32", "fp16", "bf16")


def inference_dtype(choice, device):
    """The weights' torch dtype for --dtype. `auto` is bf16 where the device computes it
    natively (a GPU with bf16; a CPU with AMX or AVX512-BF16), else fp32 (emulated bf16 is
    slower). fp16 is for GPUs only: CPUs have no fast fp16 convolutions."""
    from utils.cli import UsageError
    from utils.training import computes_bf16

    if choice == "auto":
        choice = "bf16" if computes_bf16(cpu=device.type != "cuda") else "fp32"
    if choice == "fp16" and device.type != "cuda":
        raise UsageError("--dtype fp16 needs a GPU; use fp32, bf16 or auto on the CPU")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[choice]


def class_labels(unet, user_indices):
    """The user indices (the null index included) for a UNet with a class embedding, which
    then sees the user in every ResNet block; None for one without."""
    return user_indices if unet.config.num_class_embeds else None


def make_sampler(scheduler_config, name=DEFAULT_SAMPLER):
    """A sampling scheduler with the training schedule's betas and prediction type (the
    options are explicit: a config taken from another sampler may carry its own)."""
    import diffusers

    class_name, _, options = SAMPLERS[name]
    return getattr(diffusers, class_name).from_config(scheduler_config, **options)


@torch.no_grad()
def sample_latents(unet, condition_encoder, scheduler, user_indices, seeds, latent_shape, guidance_scale,
                   num_inference_steps, progress=None, start_latents=None, strength=1.0):
    """Latents (B, C, h, w) for the users `user_indices` (B,) from per-image `seeds`.

    guidance_scale 1 is the conditional model alone; above 1 the conditional and the
    null-token predictions come from one batched UNet call and are extrapolated:
    pred = uncond + scale * (cond - uncond) (Ho & Salimans, 2022).

    With `start_latents` (B, C, h, w), image to image: each is noised to the level the
    schedule reaches after `1 - strength` of its steps and denoised from there (SDEdit,
    Meng et al. 2022; DA-Fusion, Trabucco et al. 2023), so the image keeps the source's
    coarse layout and gets new detail of the user's kind; about `strength` x the steps run."""
    device = user_indices.device
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    noise = torch.stack([torch.randn(tuple(latent_shape), generator=g) for g in generators]).to(device)
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    if start_latents is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        skipped = (num_inference_steps - max(1, round(num_inference_steps * strength))) * scheduler.order
        timesteps = timesteps[skipped:]
        if hasattr(scheduler, "set_begin_index"):  # multistep samplers index their sigmas from here
            scheduler.set_begin_index(skipped)
        latents = scheduler.add_noise(start_latents.to(device).float(), noise, timesteps[:1].repeat(len(noise)))
    guided = guidance_scale != 1.0
    tokens, users = condition_encoder(user_indices), user_indices
    if guided:
        null = torch.full_like(user_indices, condition_encoder.config.num_users)
        tokens, users = torch.cat([tokens, condition_encoder(null)]), torch.cat([user_indices, null])
    labels = class_labels(unet, users)
    timesteps = timesteps if progress is None else progress(timesteps)
    for t in timesteps:
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t).to(unet.dtype)
        prediction = unet(model_input, t, encoder_hidden_states=tokens.to(unet.dtype), class_labels=labels).sample.float()
        if guided:
            conditional, unconditional = prediction.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        latents = scheduler.step(prediction, t, latents, generator=generators).prev_sample
    return latents


@torch.no_grad()
def encode_images(vae, images, scaling_factor):
    """Images in [-1, 1] (B, 3, R, R) -> diffusion-space latents: the posterior mean, scaled."""
    return vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean.float() * scaling_factor


@torch.no_grad()
def decode_latents(vae, latents, scaling_factor):
    """Diffusion-space latents -> images in [-1, 1], (B, 3, R, R)."""
    return vae.decode((latents / scaling_factor).to(vae.dtype)).sample.float().clamp(-1, 1)
