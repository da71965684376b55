"""Stage-1 training speed and peak memory for a preset, and what a full run would take.

    python benchmarks/vae_throughput.py --preset standard            # 256x256, the original's scale
    python benchmarks/vae_throughput.py --preset standard --mixed_precision fp16 --batch_size 16

Times full training steps (encoder, decoder, the configured loss terms, backward, AdamW,
through accelerate as train_vae.py does) on random images of the preset's resolution:
the model dominates a step (decoding a 256x256 PNG takes ~3 ms), so the data are left
out. Prints images/s, peak memory (CUDA allocator peak on a GPU, process peak RSS on a
CPU) and the implied time for --epochs epochs of --epoch_images images.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as `python benchmarks/vae_throughput.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from training import train_vae
from benchmarks._memory import peak_memory_gb, reset_peak_memory
from utils.cli import UsageError, run
from utils.presets import PRESET_NAMES, resolve_preset
from utils.training import make_accelerator


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Stage-1 training images/s and peak memory for a preset.")
    p.add_argument("--preset", choices=PRESET_NAMES, default="standard")
    p.add_argument("--batch_size", type=int, help="default: the preset's")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="default: the preset's")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--disc_weight", type=float, help="time the patch discriminator too (default: the preset's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--epochs", type=int, default=50, help="epochs of the implied full run (default 50)")
    p.add_argument("--epoch_images", type=int, default=4650, help="images per epoch (default 4650: 31 users x 150)")
    p.add_argument("--out", help="also write the numbers as JSON here")
    return p.parse_args(argv)


def training_args(args):
    """train_vae.py's own arguments for the preset, so the benchmark times its configuration."""
    argv = ["--data_dir", "-", "--output_dir", "-", "--preset", args.preset, "--device", args.device]
    for name in ("batch_size", "mixed_precision", "disc_weight"):
        if getattr(args, name) is not None:
            argv += [f"--{name}", str(getattr(args, name))]
    config = train_vae.parse_args(argv)
    resolve_preset(config, "vae")
    train_vae.check_architecture(config)
    config.disc_start = 0
    return config


def main(args):
    if args.steps < 1 or args.warmup < 0:
        raise UsageError("--steps must be at least 1 and --warmup at least 0")
    config = training_args(args)
    perceptual = train_vae.resolve_perceptual(config)
    with tempfile.TemporaryDirectory() as scratch:
        accelerator = make_accelerator(config, scratch)
    device = accelerator.device
    torch.manual_seed(0)
    model = train_vae.AutoencoderWithPosterior(train_vae.build_vae(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)
    parts = [model]
    if config.disc_weight > 0:
        discriminator = train_vae.PatchDiscriminator(config.disc_channels, config.disc_layers)
        disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=config.learning_rate, betas=(0.5, 0.9))
        discriminator, disc_optimizer = accelerator.prepare(discriminator, disc_optimizer)
        parts.append(discriminator)
    if perceptual is not None:
        perceptual = perceptual.to(device)
    decoder_out = accelerator.unwrap_model(model).vae.decoder.conv_out.weight
    images = torch.rand(config.batch_size, 3, config.resolution, config.resolution, device=device) * 2 - 1

    def train_step():
        reconstructions, posterior = model(images)
        terms = train_vae.vae_losses(reconstructions, images, posterior, config, perceptual)
        loss = terms["loss"]
        if len(parts) > 1:
            adversarial = train_vae.adversarial_terms(
                accelerator.unwrap_model(discriminator), reconstructions, loss, decoder_out, config.disc_weight
            )
            loss = loss + adversarial["adv_weight"] * adversarial["g_adv"]
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if len(parts) > 1:
            d_loss = train_vae.discriminator_hinge_loss(discriminator(images), discriminator(reconstructions.detach()))
            accelerator.backward(d_loss)
            disc_optimizer.step()
            disc_optimizer.zero_grad(set_to_none=True)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        train_step()
    reset_peak_memory(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        train_step()
    synchronize()
    seconds = time.perf_counter() - started
    images_per_second = args.steps * config.batch_size / seconds
    full_run_hours = args.epochs * args.epoch_images / images_per_second / 3600
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    result = {
        "preset": args.preset, "device": name, "resolution": config.resolution, "batch_size": config.batch_size,
        "mixed_precision": config.mixed_precision, "perceptual_weight": config.perceptual_weight,
        "disc_weight": config.disc_weight, "parameters_millions": sum(p.numel() for p in model.parameters()) / 1e6,
        "seconds_per_step": seconds / args.steps, "images_per_second": images_per_second,
        "peak_memory_gb": peak_memory_gb(device),
        "peak_memory_kind": "CUDA allocator peak" if device.type == "cuda" else "process peak RSS",
        "implied_hours": full_run_hours, "epochs": args.epochs, "epoch_images": args.epoch_images,
    }
    print(
        f"stage-1 {args.preset} preset on {name}: {config.resolution}x{config.resolution}, batch {config.batch_size}, "
        f"precision {config.mixed_precision}, {result['parameters_millions']:.1f} M parameters, "
        f"LPIPS weight {config.perceptual_weight}, discriminator weight {config.disc_weight}\n"
        f"  {seconds / args.steps:.2f} s/step = {images_per_second:.2f} images/s; peak memory "
        f"{result['peak_memory_gb']:.2f} GiB ({result['peak_memory_kind']})\n"
        f"  {args.epochs} epochs x {args.epoch_images} images -> {full_run_hours:.1f} h"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    run(main, parse_args())
