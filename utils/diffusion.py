"""Stage 2, latent diffusion conditioned on the user: its configuration, the UNet and
noise schedule, the latent cache of the train split, and one training step.

The train split is encoded once into a latent cache (posterior mean and std, scaled by
the VAE's measured factor), so a training step never runs the VAE. The condition encoder
maps a user index to a few cross-attention tokens; per sample, with `condition_dropout`,
the index becomes the null token `num_users` that classifier-free guidance uses.
Loss: MSE on epsilon or v, optionally Min-SNR weighted; DDPM schedule with Stable
Diffusion's scaled-linear betas; EMA of the UNet and the encoder.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from utils.augment import roll_time
from utils.cli import UsageError
from utils.condition_encoder import UserConditionEncoder, drop_conditions
from utils.data_loader import SpectrogramDataset
from utils.files import atomic_path
from utils.losses import diffusion_loss
from utils.presets import Config, resolve_preset
from utils.sampling import class_labels
from utils.training import adamw, check_optimisation, cosine_schedule, launcher_precision, optimise, resolve_hardware

HELDOUT_TIMESTEPS = 4  # per held-out latent, one from each quarter of the schedule
UNET_ARCHITECTURE = ("block_out_channels", "layers_per_block", "attention_levels", "attention_head_dim",
                     "norm_num_groups", "cross_attention_dim", "scale_shift")


def check_arguments(values):
    bad = [c for c in values["block_out_channels"] if c % values["norm_num_groups"]]
    if bad:
        raise UsageError(f"--block_out_channels {bad} must be multiples of --norm_num_groups {values['norm_num_groups']}")
    if not 0 <= values["condition_dropout"] < 1:
        raise UsageError(f"--condition_dropout must be in [0, 1), got {values['condition_dropout']}")
    if not 0 <= values["attention_levels"] <= len(values["block_out_channels"]):
        raise UsageError(f"--attention_levels must be between 0 and the UNet's {len(values['block_out_channels'])} "
                         f"levels (--block_out_channels), got {values['attention_levels']}")
    for name in ("layers_per_block", "cross_attention_dim", "num_condition_tokens", "num_train_timesteps",
                 "num_inference_steps"):
        if values[name] < 1:
            raise UsageError(f"--{name} must be at least 1")
    check_optimisation(values)


def resolve_diffusion_config(given, vae_config=None):
    """Stage 2's configuration from the user's flags (`given`, None = unset): the preset,
    BASE, device and precision decided, and the resolution, latent shape and scaling
    factor taken from the VAE (`vae_config`, a loaded VAE's config; None for benchmarks,
    which give `resolution` and `latent_shape` themselves)."""
    values, decided = resolve_preset("diffusion", given.get("preset") or "quick", given)
    check_arguments(values)
    if vae_config is not None:
        if values.get("resolution") is None:
            values["resolution"] = vae_config.sample_size
        elif values["resolution"] != vae_config.sample_size:
            raise UsageError(
                f"--resolution {values['resolution']} differs from the VAE's {vae_config.sample_size}: "
                "the diffusion model works at the resolution its VAE was trained at"
            )
        factor = 2 ** (len(vae_config.block_out_channels) - 1)
        values["latent_shape"] = [vae_config.latent_channels, values["resolution"] // factor,
                                  values["resolution"] // factor]
        values["latent_scaling_factor"] = vae_config.scaling_factor
    levels = len(values["block_out_channels"]) - 1
    if values["latent_shape"][1] % 2**levels:
        raise UsageError(
            f"the {values['latent_shape'][1]}x{values['latent_shape'][2]} latents cannot be halved {levels} times "
            f"by the UNet (--block_out_channels {' '.join(map(str, values['block_out_channels']))}): use fewer levels"
        )
    values["device"], values["mixed_precision"] = resolve_hardware(values.get("device", "auto"),
                                                                   launcher_precision(given, values["mixed_precision"]))
    return Config({**values, "preset_filled": decided})


def build_unet(latent_channels, latent_size, block_out_channels, layers_per_block, attention_levels,
               attention_head_dim, norm_num_groups, cross_attention_dim, num_class_embeds=None, scale_shift=False):
    """The denoiser's UNet, with (self- and cross-) attention on its `attention_levels`
    lowest-resolution levels and in the mid-block; with `num_class_embeds` (users + the null
    row) a user embedding is added to the timestep embedding, so every ResNet block sees the user;
    with `scale_shift` that embedding scales and shifts each block's normalised features (FiLM,
    as in Dhariwal & Nichol 2021) instead of only being added to them."""
    from diffusers import UNet2DConditionModel

    plain = len(block_out_channels) - attention_levels
    # Attention where the feature map is smallest: its cost grows with the square of the tokens.
    down = ("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * attention_levels
    up = ("CrossAttnUpBlock2D",) * attention_levels + ("UpBlock2D",) * plain
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
        num_class_embeds=num_class_embeds,
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
    )


def build_noise_scheduler(num_train_timesteps, prediction_type):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
    )


class ConditionalDenoiser(torch.nn.Module):
    """UNet and condition encoder as one module, so that DDP, autocast and EMA see both."""

    def __init__(self, unet, condition_encoder):
        super().__init__()
        self.unet = unet
        self.condition_encoder = condition_encoder

    def forward(self, noisy_latents, timesteps, user_indices):
        tokens = self.condition_encoder(user_indices)  # (B, tokens, cross_attention_dim)
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=tokens,
                         class_labels=class_labels(self.unet, user_indices)).sample


def build_denoiser(config, num_users):
    """The UNet and condition encoder of a resolved stage-2 configuration."""
    channels, size, _ = config.latent_shape
    unet = build_unet(channels, size, **config.pick(*UNET_ARCHITECTURE),
                      num_class_embeds=num_users + 1 if config.class_embedding else None)
    encoder = UserConditionEncoder(num_users, config.cross_attention_dim, config.num_condition_tokens)
    return ConditionalDenoiser(unet, encoder)


def cache_key(vae_path, data_dir, manifest, resolution, split="train"):
    """sha256 of the VAE weights and config, the split's file names and bytes and the
    resolution: the cache is rebuilt when any of them changes."""
    digest = hashlib.sha256()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        path = Path(vae_path) / name
        if path.exists():
            digest.update(path.read_bytes())
    digest.update(str(resolution).encode())
    for relative_path, label in manifest.samples(split):
        digest.update(f"{relative_path}\0{label}\0".encode())
        path = Path(data_dir) / relative_path
        digest.update(path.read_bytes() if path.exists() else b"missing")
    return digest.hexdigest()


@torch.no_grad()
def encode_split(vae, dataset, batch_size, device, show_progress):
    """Posterior mean and std of every image of `dataset`, in diffusion units (x the VAE's scaling factor)."""
    scale = vae.config.scaling_factor
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    means, stds, labels = [], [], []
    for batch in tqdm(loader, desc=f"encoding the {dataset.split} split", disable=not show_progress):
        posterior = vae.encode(batch["pixel_values"].to(device)).latent_dist
        means.append((posterior.mean * scale).float().cpu())
        stds.append((posterior.std * scale).float().cpu())
        labels.append(torch.as_tensor(batch["user_index"]))
    return {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(), "user_index": torch.cat(labels).long()}


def load_or_build_cache(accelerator, vae, vae_path, data_dir, manifest, resolution, batch_size, output_dir,
                        split="train"):
    """The run folder's latent cache of `split` (latent_cache/<split>.safetensors) when its key
    matches, else a freshly encoded one. Written by the main process only, atomically; the
    others wait and read it."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = Path(output_dir) / "latent_cache" / f"{split}.safetensors"
    key = cache_key(vae_path, data_dir, manifest, resolution, split)
    if accelerator.is_main_process:
        stored_key = None
        if path.exists():
            with safe_open(str(path), framework="pt") as f:
                stored_key = (f.metadata() or {}).get("key")
        if stored_key != key:
            if stored_key is not None:
                print("the VAE or the data changed since the latent cache was written: encoding again")
            dataset = SpectrogramDataset(data_dir, manifest, split, resolution)
            cache = encode_split(vae.to(accelerator.device), dataset, batch_size, accelerator.device, show_progress=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file(cache, str(tmp), metadata={"key": key, "scaling_factor": str(vae.config.scaling_factor)})
    accelerator.wait_for_everyone()
    return load_file(str(path))


@torch.no_grad()
def heldout_loss(denoiser, noise_scheduler, cache, config, device, batch_size=64):
    """The training loss of `denoiser` on a held-out latent cache (the val split), the same
    draw at every call: posterior means, noise and HELDOUT_TIMESTEPS timesteps per latent
    (one per quarter of the schedule) from a fixed seed, the true user as condition. Falling
    with the training loss, the model learns the users; rising while it falls, it learns
    the train images (memorisation)."""
    generator = torch.Generator().manual_seed(0)
    repeats, steps = HELDOUT_TIMESTEPS, config.num_train_timesteps
    latents = cache["mean"].repeat_interleave(repeats, dim=0)
    users = cache["user_index"].repeat_interleave(repeats)
    quarter = torch.arange(repeats).repeat(len(cache["mean"]))
    timesteps = ((quarter + torch.rand(len(latents), generator=generator)) * steps / repeats).long().clamp(max=steps - 1)
    noise = torch.randn(latents.shape, generator=generator)
    total = 0.0
    for start in range(0, len(latents), batch_size):
        part = slice(start, start + batch_size)
        batch = (tensor[part].to(device) for tensor in (latents, noise, timesteps, users))
        total += denoising_loss(denoiser, noise_scheduler, config, *batch).item() * len(latents[part])
    return total / len(latents)


def denoising_loss(model, noise_scheduler, config, latents, noise, timesteps, conditions):
    """The stage-2 objective on one batch: MSE of the prediction (epsilon or v) on the noised
    latents, Min-SNR weighted when `config.snr_gamma` > 0."""
    if config.prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    prediction = model(noise_scheduler.add_noise(latents, noise, timesteps), timesteps, conditions)
    snr = None
    if config.snr_gamma:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps)
    return diffusion_loss(prediction, target, snr, config.snr_gamma, config.prediction_type)


class LatentDataset(torch.utils.data.Dataset):
    def __init__(self, cache):
        self.cache = cache

    def __len__(self):
        return len(self.cache["user_index"])

    def __getitem__(self, index):
        return {key: value[index] for key, value in self.cache.items()}


@dataclass
class DiffusionTraining:
    """Stage 2 prepared for training: `step(batch, step)` is what train_loop runs."""

    denoiser: torch.nn.Module  # the unwrapped ConditionalDenoiser
    noise_scheduler: object
    modules: list
    lr_scheduler: object
    ema: object
    step: object

    def swap_in_ema(self):
        """Put the EMA weights into the denoiser, the live ones kept aside (no-op without EMA)."""
        if self.ema is not None:
            self.ema.store(self.denoiser.parameters())
            self.ema.copy_to(self.denoiser.parameters())

    def swap_out_ema(self):
        if self.ema is not None:
            self.ema.restore(self.denoiser.parameters())


def build_diffusion_training(config, accelerator, num_users, null_index, max_steps):
    """Denoiser, EMA, optimiser and LR schedule prepared by accelerate, and the training
    step on a batch of cached latents {"mean", "std", "user_index"}."""
    denoiser = build_denoiser(config, num_users)
    noise_scheduler = build_noise_scheduler(config.num_train_timesteps, config.prediction_type)
    optimizer = adamw(denoiser.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    lr_scheduler = cosine_schedule(optimizer, config.warmup_steps, max_steps, accelerator.num_processes)
    ema = None
    if config.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(denoiser.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=2 / 3)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    model, optimizer, lr_scheduler = accelerator.prepare(denoiser, optimizer, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)

    def step(batch, step_number):
        # A fresh posterior sample each time: the cache keeps the VAE's uncertainty.
        latents = batch["mean"] + batch["std"] * torch.randn_like(batch["std"])  # (B, C, h, w)
        if config.use_augmentation:
            latents = roll_time(latents)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, config.num_train_timesteps, (len(latents),), device=latents.device)
        conditions = drop_conditions(batch["user_index"], null_index, config.condition_dropout)
        loss = denoising_loss(model, noise_scheduler, config, latents, noise, timesteps, conditions)
        optimise(accelerator, loss, model.parameters(), optimizer, lr_scheduler, config.max_grad_norm)
        if ema is not None and accelerator.sync_gradients:
            ema.step(unwrapped.parameters())
        return {"loss": loss}

    return DiffusionTraining(denoiser=unwrapped, noise_scheduler=noise_scheduler, modules=[model],
                             lr_scheduler=lr_scheduler, ema=ema, step=step)
