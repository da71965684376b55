"""Stage-2 training steps/s with the latent cache vs encoding every batch on the fly
(the original's design), same UNet and batch, in one run.

    python benchmarks/latent_cache_speed.py --data_dir data/simulated          # 256x256, standard preset
    python benchmarks/latent_cache_speed.py --data_dir data/simulated --preset quick --resolution 64

Both loops run train_diffusion.py's own training step (utils.diffusion), the same UNet,
condition encoder, loss, optimiser and EMA. "On the fly" also reads and decodes the batch's PNGs and runs the
VAE encoder (no gradient), as the original did every step; "cached" draws a posterior
sample from cached means and standard deviations. The VAE is the preset's architecture
with random weights: its speed does not depend on what it learned.
"""

import argparse
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as `python benchmarks/latent_cache_speed.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._measure import add_output_arguments, device_name, peak_memory_gb, publish, seconds_per_call
from utils.cli import UsageError, run
from utils.data_loader import SpectrogramDataset, build_manifest, check_data_dir
from utils.diffusion import build_diffusion_training, resolve_diffusion_config
from utils.presets import PRESET_NAMES
from utils.training import make_accelerator
from utils.vae import ARCHITECTURE, build_vae, resolve_vae_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Stage-2 steps/s: latent cache vs VAE encoding on the fly.")
    p.add_argument("--data_dir", required=True, help="dataset folder whose images the on-the-fly loop decodes")
    p.add_argument("--preset", choices=PRESET_NAMES, default="standard", help="VAE and UNet architecture (default standard)")
    p.add_argument("--resolution", type=int, help="image side (default: the preset's VAE resolution)")
    p.add_argument("--batch_size", type=int, help="images per step, both loops (default: the preset's diffusion batch)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per loop (default 3)")
    add_output_arguments(p)
    return p.parse_args(argv)


def main(args):
    data_dir = check_data_dir(args.data_dir)
    if args.steps < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise UsageError("--steps and --batch_size must be at least 1")
    vae_config = resolve_vae_config({"preset": args.preset, "resolution": args.resolution, "device": args.device,
                                     "mixed_precision": "no", "perceptual_weight": 0})
    config = resolve_diffusion_config({"preset": args.preset, "device": args.device, "mixed_precision": "no",
                                       "batch_size": args.batch_size, "resolution": vae_config.resolution,
                                       "latent_shape": vae_config.latent_shape})
    manifest = build_manifest(data_dir)
    dataset = SpectrogramDataset(data_dir, manifest, "train", config.resolution)
    if len(dataset) < config.batch_size * (args.steps + 1):
        raise UsageError(f"{data_dir}: {len(dataset)} train images, too few for {args.steps + 1} batches of {config.batch_size}")

    with tempfile.TemporaryDirectory() as scratch:
        accelerator = make_accelerator(config.device, config.mixed_precision, 1, "none", scratch)
    device = accelerator.device
    torch.manual_seed(0)
    vae = build_vae(**vae_config.pick(*ARCHITECTURE)).to(device).eval()
    # train_diffusion.py's own step (UNet, condition encoder, Min-SNR loss, AdamW, EMA).
    training = build_diffusion_training(config, accelerator, manifest.num_users, manifest.null_index,
                                        max_steps=2 * (args.steps + 1))
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True))
    shape = (config.batch_size, *config.latent_shape)
    cache = {"mean": torch.randn(4 * shape[0], *shape[1:]), "std": torch.rand(4 * shape[0], *shape[1:])}

    def train_step(batch):
        with accelerator.accumulate(*training.modules):
            training.step(batch, 0)

    def on_the_fly():
        batch = next(loader)
        with torch.no_grad():
            latents = vae.encode(batch["pixel_values"].to(device)).latent_dist.sample()
        train_step({"mean": latents, "std": torch.zeros_like(latents), "user_index": batch["user_index"].to(device)})

    def cached():
        index = torch.randint(0, len(cache["mean"]), (shape[0],))
        train_step({"mean": cache["mean"][index].to(device), "std": cache["std"][index].to(device),
                    "user_index": torch.randint(0, manifest.num_users, (shape[0],), device=device)})

    fly = 1 / seconds_per_call(on_the_fly, args.steps, 1, device)
    fast = 1 / seconds_per_call(cached, args.steps, 1, device)
    name = device_name(device)
    result = {
        "device": name, "preset": args.preset, "resolution": config.resolution, "latent_shape": list(config.latent_shape),
        "batch_size": config.batch_size, "steps": args.steps, "on_the_fly_steps_per_second": fly,
        "cached_steps_per_second": fast, "speedup": fast / fly, "peak_memory_gb": peak_memory_gb(device),
    }
    return publish(result, (
        f"stage-2 {args.preset} UNet on {name}, {config.resolution}x{config.resolution} images -> "
        f"{'x'.join(map(str, config.latent_shape))} latents, batch {config.batch_size}:\n"
        f"  encoding on the fly {fly:.3f} steps/s, latent cache {fast:.3f} steps/s -> {fast / fly:.1f}x (target >= 5x)"
    ), args.out)


if __name__ == "__main__":
    run(main, parse_args())
