"""Stage 1, the AutoencoderKL: its configuration, the model and patch discriminator, one
training step, the latent statistics, and the final_model folder later stages load.

The model is always called through the accelerate-prepared module, so autocast and DDP
apply. The latent scale is measured on the train split after training and stored as
`scaling_factor` in final_model/config.json, never copied from Stable Diffusion.
Evaluation reconstructs through the posterior mode (deterministic), never a sample.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from utils.augment import roll_time
from utils.cli import UsageError
from utils.data_loader import MANIFEST_NAME, DatasetManifest
from utils.files import atomic_folder, write_json
from utils.losses import adversarial_terms, discriminator_hinge_loss, vae_losses
from utils.metrics import LpipsUnavailable, check_lpips, load_lpips
from utils.presets import Config, resolve_preset
from utils.training import adamw, check_optimisation, cosine_schedule, launcher_precision, optimise, resolve_hardware

LATENT_STATS_NAME = "latent_stats.json"
ARCHITECTURE = ("resolution", "block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups")


def perceptual_setting(weight):
    """(weight, note) for --perceptual_weight. 'auto' (the presets' choice) means 1.0 when
    LPIPS and its backbone weights are here and 0 otherwise; an explicit weight > 0
    without them is a usage error: the loss never changes silently."""
    if weight == "auto":
        try:
            check_lpips()
        except LpipsUnavailable as error:
            return 0.0, f"perceptual loss off: {error}"
        return 1.0, "perceptual loss on (LPIPS, AlexNet backbone found)"
    try:
        weight = float(weight)
    except ValueError:
        raise UsageError(f"--perceptual_weight must be a number or 'auto', got {weight!r}") from None
    if weight <= 0:
        return 0.0, "perceptual loss off (--perceptual_weight 0)"
    try:
        check_lpips()
    except LpipsUnavailable as error:
        raise UsageError(str(error)) from None
    return weight, f"perceptual loss on (weight {weight})"


def downsampling_factor(block_out_channels):
    return 2 ** (len(block_out_channels) - 1)


def check_architecture(values):
    factor = downsampling_factor(values["block_out_channels"])
    if values["resolution"] < 8 or values["resolution"] % factor:
        raise UsageError(
            f"--resolution {values['resolution']} must be a multiple of {factor}: the encoder halves it "
            f"{len(values['block_out_channels']) - 1} times "
            f"(--block_out_channels {' '.join(map(str, values['block_out_channels']))})"
        )
    bad = [c for c in values["block_out_channels"] if c % values["norm_num_groups"]]
    if bad:
        raise UsageError(f"--block_out_channels {bad} must be multiples of --norm_num_groups {values['norm_num_groups']}")
    for name in ("layers_per_block", "latent_channels"):
        if values[name] < 1:
            raise UsageError(f"--{name} must be at least 1")
    check_optimisation(values)


def resolve_vae_config(given):
    """Stage 1's configuration from the user's flags (`given`, None = unset): the preset,
    BASE, the architecture checked, device, precision and perceptual weight decided."""
    values, decided = resolve_preset("vae", given.get("preset") or "quick", given)
    check_architecture(values)
    values["device"], values["mixed_precision"] = resolve_hardware(values.get("device", "auto"),
                                                                   launcher_precision(given, values["mixed_precision"]))
    values["perceptual_weight"], values["perceptual_note"] = perceptual_setting(values["perceptual_weight"])
    factor = downsampling_factor(values["block_out_channels"])
    values["latent_shape"] = [values["latent_channels"], values["resolution"] // factor, values["resolution"] // factor]
    return Config({**values, "preset_filled": decided})


def build_vae(resolution, block_out_channels, layers_per_block, latent_channels, norm_num_groups):
    from diffusers import AutoencoderKL

    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=resolution,
    )


class AutoencoderWithPosterior(torch.nn.Module):
    """One forward pass that returns the reconstruction and the posterior, so that DDP
    and autocast see the whole encoder-decoder call."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixel_values):
        posterior = self.vae.encode(pixel_values).latent_dist
        latents = posterior.sample()  # (B, C, R/f, R/f)
        return self.vae.decode(latents).sample, posterior


class PatchDiscriminator(torch.nn.Module):
    """PatchGAN (pix2pix; the latent-diffusion autoencoders' adversarial loss): one real/
    fake logit per overlapping patch, so it judges texture rather than the whole image.
    GroupNorm instead of BatchNorm: no statistics to synchronise across processes."""

    def __init__(self, channels=64, layers=3):
        super().__init__()
        modules = [torch.nn.Conv2d(3, channels, 4, stride=2, padding=1), torch.nn.LeakyReLU(0.2)]
        width = channels
        for level in range(1, layers + 1):
            out = channels * min(2**level, 8)
            stride = 2 if level < layers else 1
            modules += [
                torch.nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                torch.nn.GroupNorm(min(32, out // 4), out),
                torch.nn.LeakyReLU(0.2),
            ]
            width = out
        modules.append(torch.nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = torch.nn.Sequential(*modules)

    def forward(self, images):
        return self.layers(images)  # (B, 1, h, w) logits


@dataclass
class VaeTraining:
    """Stage 1 prepared for training: `step(batch, step)` is what train_loop runs."""

    vae: torch.nn.Module  # the unwrapped AutoencoderKL (for validation and saving)
    modules: list  # the prepared modules accelerate accumulates over
    lr_scheduler: object
    step: object


def build_vae_training(config, accelerator, max_steps):
    """Model, discriminator, optimisers and LR schedule prepared by accelerate, and the
    training step: the loss terms, the adversarial term from `disc_start` on, one
    optimiser step each for the autoencoder and the discriminator."""
    model = AutoencoderWithPosterior(build_vae(**config.pick(*ARCHITECTURE)))
    optimizer = adamw(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    lr_scheduler = cosine_schedule(optimizer, config.warmup_steps, max_steps, accelerator.num_processes)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    modules = [model]
    if config.disc_weight > 0:
        discriminator = PatchDiscriminator(config.disc_channels, config.disc_layers)
        disc_optimizer = adamw(discriminator.parameters(), lr=config.learning_rate, betas=(0.5, 0.9))
        discriminator, disc_optimizer = accelerator.prepare(discriminator, disc_optimizer)
        modules.append(discriminator)
    perceptual = load_lpips().to(accelerator.device) if config.perceptual_weight > 0 else None
    vae = accelerator.unwrap_model(model).vae

    def step(batch, step_number):
        pixel_values = batch["pixel_values"]
        if config.use_augmentation:
            pixel_values = roll_time(pixel_values)
        reconstructions, posterior = model(pixel_values)
        terms = vae_losses(reconstructions, pixel_values, posterior, pixel_loss=config.pixel_loss,
                           kl_weight=config.kl_weight, freq_weight=config.freq_weight, perceptual=perceptual,
                           perceptual_weight=config.perceptual_weight)
        adversarial = len(modules) > 1 and step_number >= config.disc_start
        if adversarial:
            terms.update(adversarial_terms(accelerator.unwrap_model(discriminator), reconstructions, terms["loss"],
                                           vae.decoder.conv_out.weight, config.disc_weight))
            terms["loss"] = terms["loss"] + terms["adv_weight"] * terms["g_adv"]
        optimise(accelerator, terms["loss"], model.parameters(), optimizer, lr_scheduler, config.max_grad_norm)
        if adversarial:
            terms["d_loss"] = discriminator_hinge_loss(discriminator(pixel_values),
                                                       discriminator(reconstructions.detach()))
            optimise(accelerator, terms["d_loss"], discriminator.parameters(), disc_optimizer,
                     max_grad_norm=config.max_grad_norm)
        return terms

    return VaeTraining(vae=vae, modules=modules, lr_scheduler=lr_scheduler, step=step)


@torch.no_grad()
def measure_latent_stats(accelerator, vae, dataset, num_images, batch_size, seed):
    """Mean and std of posterior samples over a seeded subset of `dataset` (the train
    split). The diffusion stage multiplies latents by scaling_factor = 1 / std."""
    vae.eval()
    generator = torch.Generator().manual_seed(seed)
    count = min(len(dataset), num_images)
    indices = torch.randperm(len(dataset), generator=generator)[:count].tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size)
    latents = []
    for batch in tqdm(loader, desc="latent statistics", disable=not accelerator.is_main_process, leave=False):
        with accelerator.autocast():
            posterior = vae.encode(batch["pixel_values"].to(accelerator.device)).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
        latents.append((posterior.mean + posterior.std * noise).float().cpu())
    latents = torch.cat(latents)  # (N, C, h, w)
    per_channel = latents.transpose(0, 1).flatten(1)
    return {
        "num_images": count,
        "mean": latents.mean().item(),
        "std": latents.std().item(),
        "channel_mean": per_channel.mean(1).tolist(),
        "channel_std": per_channel.std(1).tolist(),
        "scaling_factor": 1.0 / latents.std().item(),
        "latent_shape": list(latents.shape[1:]),
    }


def save_vae(vae, manifest, stats, folder):
    """A stage-1 final_model: save_pretrained (config + safetensors) with the measured
    scaling factor, latent_stats.json and the dataset manifest, renamed into place when complete."""
    vae.register_to_config(scaling_factor=stats["scaling_factor"])
    with atomic_folder(folder) as partial:
        vae.save_pretrained(partial, safe_serialization=True)
        write_json(partial / LATENT_STATS_NAME, stats)
        manifest.save(partial / MANIFEST_NAME)
    return Path(folder)


def load_vae(vae_path, flag="--vae_path", torch_dtype=None):
    """An AutoencoderKL from a save_pretrained folder (weights in `torch_dtype`, default as saved), or a clear error."""
    from diffusers import AutoencoderKL

    vae_path = Path(vae_path)
    config_path = vae_path / "config.json"
    if not config_path.exists():
        raise UsageError(f"{flag} {vae_path} is not a VAE folder: no config.json (expected a stage-1 final_model/)")
    try:
        class_name = json.loads(config_path.read_text()).get("_class_name")
    except json.JSONDecodeError:
        class_name = None
    if class_name != "AutoencoderKL":
        raise UsageError(f"{flag} {vae_path} holds a {class_name or 'unknown'} config, not an AutoencoderKL")
    try:
        return AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch_dtype).eval()
    except (OSError, ValueError, RuntimeError) as error:
        raise UsageError(f"{flag} {vae_path}: cannot load the weights ({str(error).splitlines()[0]})") from None


def load_vae_manifest(vae_path, flag="--vae_path"):
    """The dataset manifest stored with a stage-1 final_model (label map and split)."""
    path = Path(vae_path) / MANIFEST_NAME
    if not path.exists():
        raise UsageError(f"{flag} {vae_path} has no {MANIFEST_NAME}: expected a stage-1 final_model/ folder")
    return DatasetManifest.load(path)


def trained_vae(vae_path, manifest_path=None, flag="--vae_path"):
    """(the VAE of a stage-1 final_model, the manifest it was trained on). A `manifest_path`
    (--manifest), when given, must hold that very split: a later stage on another split
    would train or test on images the VAE saw on the other side."""
    vae_path = Path(vae_path)
    if not vae_path.is_dir():
        raise UsageError(f"{flag} {vae_path} does not exist; train one with training/train_vae.py first")
    manifest = load_vae_manifest(vae_path, flag)
    vae = load_vae(vae_path, flag)
    if manifest_path:
        manifest.require_same_split(DatasetManifest.load(manifest_path), f"the VAE {vae_path}",
                                    f"--manifest {manifest_path}")
    return vae, manifest


@torch.no_grad()
def reconstruct(vae, pixel_values):
    """Reconstruction through the posterior mode (deterministic), as evaluation uses."""
    return vae.decode(vae.encode(pixel_values).latent_dist.mode()).sample.clamp(-1, 1)


def reconstruct_uint8(vae, images_uint8, device, batch_size=16):
    """Reconstructions of (N, 3, R, R) uint8 images as uint8, in batches on `device`."""
    # Batches of 16: 1.7x the images/s of 64 on a 2-core CPU at 64x64 (docs/experiments.md).
    vae = vae.to(device)
    out = []
    for start in tqdm(range(0, len(images_uint8), batch_size), desc="VAE reconstructions", unit="batch", leave=False,
                      disable=len(images_uint8) <= batch_size):
        x = (images_uint8[start:start + batch_size].float().to(device) / 127.5 - 1.0).to(vae.dtype)
        out.append(((reconstruct(vae, x).float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images_uint8.clone()
