"""Stage-1 training speed and peak memory for a preset, and what a full run would take.

    python benchmarks/vae_throughput.py --preset standard            # 256x256, the original's scale
    python benchmarks/vae_throughput.py --preset standard --mixed_precision fp16 --batch_size 16

Times train_vae.py's own training step (utils.vae.build_vae_training: encoder, decoder, the
configured loss terms, backward, AdamW, through accelerate) on random images of the preset's resolution:
the model dominates a step (decoding a 256x256 PNG takes ~3 ms), so the data are left
out. Prints images/s, peak memory (CUDA allocator peak on a GPU, process peak RSS on a
CPU) and the implied time for --epochs epochs of --epoch_images images.
"""

import argparse
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as `python benchmarks/vae_throughput.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._measure import add_output_arguments, device_name, peak_memory_gb, publish, seconds_per_call
from utils.cli import UsageError, run
from utils.presets import PRESET_NAMES
from utils.training import make_accelerator
from utils.vae import build_vae_training, resolve_vae_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Stage-1 training images/s and peak memory for a preset.")
    p.add_argument("--preset", choices=PRESET_NAMES, default="standard")
    p.add_argument("--batch_size", type=int, help="default: the preset's")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="default: the preset's")
    p.add_argument("--disc_weight", type=float, help="time the patch discriminator too (default: the preset's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--epochs", type=int, default=50, help="epochs of the implied full run (default 50)")
    p.add_argument("--epoch_images", type=int, default=4650, help="images per epoch (default 4650: 31 users x 150)")
    add_output_arguments(p)
    return p.parse_args(argv)


def main(args):
    if args.steps < 1 or args.warmup < 0:
        raise UsageError("--steps must be at least 1 and --warmup at least 0")
    # train_vae.py's own configuration and step; the adversarial term from the first step on.
    config = resolve_vae_config({"preset": args.preset, "device": args.device, "batch_size": args.batch_size,
                                 "mixed_precision": args.mixed_precision, "disc_weight": args.disc_weight,
                                 "disc_start": 0})
    with tempfile.TemporaryDirectory() as scratch:
        accelerator = make_accelerator(config.device, config.mixed_precision, 1, "none", scratch)
    device = accelerator.device
    torch.manual_seed(0)
    training = build_vae_training(config, accelerator, max_steps=args.warmup + args.steps)
    batch = {"pixel_values": torch.rand(config.batch_size, 3, config.resolution, config.resolution, device=device) * 2 - 1}

    def train_step():
        with accelerator.accumulate(*training.modules):
            training.step(batch, 0)

    seconds = seconds_per_call(train_step, args.steps, args.warmup, device)
    images_per_second = config.batch_size / seconds
    full_run_hours = args.epochs * args.epoch_images / images_per_second / 3600
    name = device_name(device)
    result = {
        "preset": args.preset, "device": name, "resolution": config.resolution, "batch_size": config.batch_size,
        "mixed_precision": config.mixed_precision, "perceptual_weight": config.perceptual_weight,
        "disc_weight": config.disc_weight, "parameters_millions": sum(p.numel() for p in training.vae.parameters()) / 1e6,
        "seconds_per_step": seconds, "images_per_second": images_per_second,
        "peak_memory_gb": peak_memory_gb(device),
        "peak_memory_kind": "CUDA allocator peak" if device.type == "cuda" else "process peak RSS",
        "implied_hours": full_run_hours, "epochs": args.epochs, "epoch_images": args.epoch_images,
    }
    return publish(result, (
        f"stage-1 {args.preset} preset on {name}: {config.resolution}x{config.resolution}, batch {config.batch_size}, "
        f"precision {config.mixed_precision}, {result['parameters_millions']:.1f} M parameters, "
        f"LPIPS weight {config.perceptual_weight}, discriminator weight {config.disc_weight}\n"
        f"  {seconds:.2f} s/step = {images_per_second:.2f} images/s; peak memory "
        f"{result['peak_memory_gb']:.2f} GiB ({result['peak_memory_kind']})\n"
        f"  {args.epochs} epochs x {args.epoch_images} images -> {full_run_hours:.1f} h"
    ), args.out)


if __name__ == "__main__":
    run(main, parse_args())
