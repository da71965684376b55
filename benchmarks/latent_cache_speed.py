"""Stage-2 training steps/s with the latent cache vs encoding every batch on the fly
(the original's design), same UNet and batch, in one run.

    python benchmarks/latent_cache_speed.py --data_dir data/simulated          # 256x256, standard preset
    python benchmarks/latent_cache_speed.py --data_dir data/simulated --preset quick --resolution 64

Both loops run a full optimiser step of the same UNet and condition encoder, with the
trainer's optimiser. "On the fly" also reads and decodes the batch's PNGs and runs the
VAE encoder (no gradient), as the original did every step; "cached" draws a posterior
sample from cached means and standard deviations. The VAE is the preset's architecture
with random weights: its speed does not depend on what it learned.
"""

import argparse
import json
import sys
import time
from pathlib import Path

if not __package__:  # run as `python benchmarks/latent_cache_speed.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from training import train_diffusion, train_vae
from benchmarks._memory import peak_memory_gb
from utils.cli import UsageError, run
from utils.condition_encoder import UserConditionEncoder
from utils.data_loader import SpectrogramDataset, build_manifest, check_data_dir
from utils.presets import PRESET_NAMES, resolve_preset
from utils.training import adamw


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Stage-2 steps/s: latent cache vs VAE encoding on the fly.")
    p.add_argument("--data_dir", required=True, help="dataset folder whose images the on-the-fly loop decodes")
    p.add_argument("--preset", choices=PRESET_NAMES, default="standard", help="VAE and UNet architecture (default standard)")
    p.add_argument("--resolution", type=int, help="image side (default: the preset's VAE resolution)")
    p.add_argument("--batch_size", type=int, help="images per step, both loops (default: the preset's diffusion batch)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per loop (default 3)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", help="also write the numbers as JSON here")
    return p.parse_args(argv)


def stage_args(module, preset, stage, resolution):
    """A stage's training arguments for the preset, as its script resolves them."""
    required = ["--data_dir", "-", "--output_dir", "-", "--preset", preset]
    if stage == "diffusion":
        required += ["--vae_path", "-"]
    args = module.parse_args(required)
    resolve_preset(args, stage)
    args.resolution = resolution or args.resolution
    return args


def main(args):
    data_dir = check_data_dir(args.data_dir)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    vae_args = stage_args(train_vae, args.preset, "vae", args.resolution)
    train_vae.check_architecture(vae_args)
    unet_args = stage_args(train_diffusion, args.preset, "diffusion", None)
    args.batch_size = args.batch_size or unet_args.batch_size
    if args.steps < 1 or args.batch_size < 1:
        raise UsageError("--steps and --batch_size must be at least 1")
    manifest = build_manifest(data_dir)
    dataset = SpectrogramDataset(data_dir, manifest, "train", vae_args.resolution)
    if len(dataset) < args.batch_size * (args.steps + 1):
        raise UsageError(f"{data_dir}: {len(dataset)} train images, too few for {args.steps + 1} batches of {args.batch_size}")

    torch.manual_seed(0)
    vae = train_vae.build_vae(vae_args).to(device).eval()
    factor = 2 ** (len(vae_args.block_out_channels) - 1)
    latent_shape = (vae_args.latent_channels, vae_args.resolution // factor, vae_args.resolution // factor)
    denoiser = train_diffusion.ConditionalDenoiser(
        train_diffusion.build_unet(unet_args, latent_shape[0], latent_shape[1]),
        UserConditionEncoder(manifest.num_users, unet_args.cross_attention_dim, unet_args.num_condition_tokens),
    ).to(device)
    noise_scheduler = train_diffusion.build_noise_scheduler(unet_args)
    optimizer = adamw(denoiser.parameters(), lr=1e-4)  # the trainer's optimiser (fused where torch has it)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True)

    def unet_step(latents, users):
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, unet_args.num_train_timesteps, (len(latents),), device=device)
        prediction = denoiser(noise_scheduler.add_noise(latents, noise, timesteps), timesteps, users)
        torch.nn.functional.mse_loss(prediction, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def on_the_fly(batch):
        with torch.no_grad():
            latents = vae.encode(batch["pixel_values"].to(device)).latent_dist.sample()
        unet_step(latents, batch["user_index"].to(device))

    cache = {"mean": torch.randn(args.batch_size * 4, *latent_shape), "std": torch.rand(args.batch_size * 4, *latent_shape)}

    def cached(step):
        index = torch.randint(0, len(cache["mean"]), (args.batch_size,))
        latents = cache["mean"][index] + cache["std"][index] * torch.randn(args.batch_size, *latent_shape)
        unet_step(latents.to(device), torch.randint(0, manifest.num_users, (args.batch_size,), device=device))

    def timed(loop):
        loop(0)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for step in range(1, args.steps + 1):
            loop(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.steps / (time.perf_counter() - started)

    batches = iter(loader)
    fly = timed(lambda step: on_the_fly(next(batches)))
    fast = timed(cached)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    result = {
        "device": name, "preset": args.preset, "resolution": vae_args.resolution, "latent_shape": list(latent_shape),
        "batch_size": args.batch_size, "steps": args.steps, "on_the_fly_steps_per_second": fly,
        "cached_steps_per_second": fast, "speedup": fast / fly, "peak_memory_gb": peak_memory_gb(device),
    }
    print(
        f"stage-2 {args.preset} UNet on {name}, {vae_args.resolution}x{vae_args.resolution} images -> "
        f"{'x'.join(map(str, latent_shape))} latents, batch {args.batch_size}:\n"
        f"  encoding on the fly {fly:.3f} steps/s, latent cache {fast:.3f} steps/s -> {fast / fly:.1f}x (target >= 5x)"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    run(main, parse_args())
