"""Stage-2 training memory (and speed) for a preset: does `standard` at batch 16 in fp16
fit a 16 GB GPU?

    python benchmarks/diffusion_memory.py --preset standard --batch_size 16 --mixed_precision fp16

On a GPU: the CUDA allocator's peak over real training steps (UNet + condition encoder,
AdamW, EMA), and steps/s. On a CPU, where fp16 training does not run, an estimate:
  weights, gradients and AdamW moments in fp32 (16 bytes per parameter) + the EMA copy
  (4 bytes per parameter) + every tensor autograd saves for the backward pass, counted
  through saved-tensor hooks during one forward under bf16 autocast (2-byte activations,
  as fp16 on a GPU), without double-counting shared storage or the weights themselves.
Temporary buffers freed during the backward are not counted; allow some margin.
"""

import argparse
import json
import sys
import time
from pathlib import Path

if not __package__:  # run as `python benchmarks/diffusion_memory.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from training import train_diffusion
from utils.cli import UsageError, run
from utils.condition_encoder import UserConditionEncoder
from utils.presets import PRESET_NAMES, resolve_preset

GIB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Stage-2 training memory and speed for a preset.")
    p.add_argument("--preset", choices=PRESET_NAMES, default="standard")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="fp16")
    p.add_argument("--latent_shape", type=int, nargs=3, default=[4, 32, 32], help="C H W (default 4 32 32: 256x256, factor 8)")
    p.add_argument("--num_users", type=int, default=31)
    p.add_argument("--steps", type=int, default=3, help="timed steps on a GPU (default 3)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", help="also write the numbers as JSON here")
    return p.parse_args(argv)


def build(args, device):
    config = train_diffusion.parse_args(["--data_dir", "-", "--vae_path", "-", "--output_dir", "-", "--preset", args.preset])
    resolve_preset(config, "diffusion")
    channels, height, _ = args.latent_shape
    torch.manual_seed(0)
    denoiser = train_diffusion.ConditionalDenoiser(
        train_diffusion.build_unet(config, channels, height),
        UserConditionEncoder(args.num_users, config.cross_attention_dim, config.num_condition_tokens),
    ).to(device)
    return config, denoiser


def saved_activation_bytes(forward, parameters):
    """Bytes of the distinct storages autograd saves for the backward pass of `forward()`."""
    weights = {p.untyped_storage().data_ptr() for p in parameters}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and storage.device.type != "meta":
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    return sum(saved.values()), output


def main(args):
    if args.batch_size < 1 or args.steps < 1:
        raise UsageError("--batch_size and --steps must be at least 1")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and device.type != "cuda":
        raise UsageError("--device cuda but no CUDA GPU is visible")
    config, denoiser = build(args, device)
    parameters = list(denoiser.parameters())
    count = sum(p.numel() for p in parameters)
    latents = torch.randn(args.batch_size, *args.latent_shape, device=device)
    users = torch.randint(0, args.num_users, (args.batch_size,), device=device)
    timesteps = torch.randint(0, 1000, (args.batch_size,), device=device)
    result = {"preset": args.preset, "batch_size": args.batch_size, "mixed_precision": args.mixed_precision,
              "latent_shape": args.latent_shape, "parameters_millions": count / 1e6}

    if device.type == "cuda":
        from diffusers.training_utils import EMAModel

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
        optimizer = torch.optim.AdamW(parameters, lr=1e-4)
        ema = EMAModel(parameters)
        ema.to(device)
        scaler = torch.amp.GradScaler("cuda", enabled=args.mixed_precision == "fp16")

        def step():
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = torch.nn.functional.mse_loss(denoiser(latents, timesteps, users).float(), latents)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            ema.step(parameters)

        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / args.steps
        result.update(device=torch.cuda.get_device_name(device), method="measured: CUDA allocator peak",
                      peak_memory_gb=torch.cuda.max_memory_allocated() / GIB, steps_per_second=1 / seconds,
                      images_per_second=args.batch_size / seconds)
    else:
        # bf16 autocast on the CPU stands in for fp16 on a GPU: both keep 2-byte activations.
        low_precision = args.mixed_precision != "no"
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low_precision):
            activations, output = saved_activation_bytes(lambda: denoiser(latents, timesteps, users), parameters)
        del output
        static = count * (16 + 4)
        result.update(device=f"CPU ({torch.get_num_threads()} threads)",
                      method="estimated: 20 bytes/parameter (fp32 weights, grads, AdamW, EMA) + saved activations "
                             + ("at 2 bytes (bf16 autocast)" if low_precision else "in fp32"),
                      static_gb=static / GIB, activations_gb=activations / GIB,
                      peak_memory_gb=(static + activations) / GIB)
    fits = result["peak_memory_gb"] < 16 * 0.93  # a 16 GB card exposes about 14.9 GiB
    result["fits_16gb"] = fits
    print(
        f"stage-2 {args.preset} preset, batch {args.batch_size}, {args.mixed_precision}, latents "
        f"{'x'.join(map(str, args.latent_shape))}, {count / 1e6:.1f} M parameters on {result['device']}:\n"
        f"  peak memory {result['peak_memory_gb']:.2f} GiB ({result['method']})"
        + (f"\n  {result['steps_per_second']:.2f} steps/s = {result['images_per_second']:.1f} images/s" if "steps_per_second" in result else "")
        + f"\n  fits a 16 GB GPU (about 14.9 GiB usable): {'yes' if fits else 'no'}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    run(main, parse_args())
