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
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as `python benchmarks/diffusion_memory.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._measure import add_output_arguments, device_name, publish, seconds_per_call
from utils.cli import UsageError, run
from utils.diffusion import build_denoiser, build_diffusion_training, resolve_diffusion_config
from utils.presets import PRESET_NAMES
from utils.training import make_accelerator

GIB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Stage-2 training memory and speed for a preset.")
    p.add_argument("--preset", choices=PRESET_NAMES, default="standard")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="fp16")
    p.add_argument("--latent_shape", type=int, nargs=3, default=[4, 32, 32], help="C H W (default 4 32 32: 256x256, factor 8)")
    p.add_argument("--num_users", type=int, default=31)
    p.add_argument("--steps", type=int, default=3, help="timed steps on a GPU (default 3)")
    add_output_arguments(p)
    return p.parse_args(argv)


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
    # On a CPU the estimate runs in full precision; bf16 autocast stands in for the 2-byte activations.
    cpu_precision = "no" if args.device == "cpu" or not torch.cuda.is_available() else args.mixed_precision
    config = resolve_diffusion_config({"preset": args.preset, "device": args.device, "batch_size": args.batch_size,
                                       "mixed_precision": cpu_precision, "latent_shape": args.latent_shape})
    device = torch.device(config.device)
    torch.manual_seed(0)
    latents = torch.randn(args.batch_size, *args.latent_shape, device=device)
    users = torch.randint(0, args.num_users, (args.batch_size,), device=device)
    result = {"preset": args.preset, "batch_size": args.batch_size, "mixed_precision": args.mixed_precision,
              "latent_shape": args.latent_shape}

    if device.type == "cuda":
        # train_diffusion.py's own step (UNet, encoder, loss, AdamW, EMA) under accelerate's mixed precision.
        with tempfile.TemporaryDirectory() as scratch:
            accelerator = make_accelerator("cuda", args.mixed_precision, 1, "none", scratch)
        training = build_diffusion_training(config, accelerator, args.num_users, args.num_users, args.steps + 1)
        count = sum(p.numel() for p in training.denoiser.parameters())
        batch = {"mean": latents, "std": torch.zeros_like(latents), "user_index": users}

        def step():
            with accelerator.accumulate(*training.modules):
                training.step(batch, 0)

        seconds = seconds_per_call(step, args.steps, 1, device)
        result.update(device=device_name(device), method="measured: CUDA allocator peak",
                      peak_memory_gb=torch.cuda.max_memory_allocated() / GIB, steps_per_second=1 / seconds,
                      images_per_second=args.batch_size / seconds)
    else:
        denoiser = build_denoiser(config, args.num_users)
        parameters = list(denoiser.parameters())
        count = sum(p.numel() for p in parameters)
        timesteps = torch.randint(0, 1000, (args.batch_size,))
        low_precision = args.mixed_precision != "no"
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low_precision):
            activations, output = saved_activation_bytes(lambda: denoiser(latents, timesteps, users), parameters)
        del output
        static = count * (16 + 4)
        result.update(device=device_name(device),
                      method="estimated: 20 bytes/parameter (fp32 weights, grads, AdamW, EMA) + saved activations "
                             + ("at 2 bytes (bf16 autocast)" if low_precision else "in fp32"),
                      static_gb=static / GIB, activations_gb=activations / GIB,
                      peak_memory_gb=(static + activations) / GIB)
    result["parameters_millions"] = count / 1e6
    fits = result["peak_memory_gb"] < 16 * 0.93  # a 16 GB card exposes about 14.9 GiB
    result["fits_16gb"] = fits
    return publish(result, (
        f"stage-2 {args.preset} preset, batch {args.batch_size}, {args.mixed_precision}, latents "
        f"{'x'.join(map(str, args.latent_shape))}, {count / 1e6:.1f} M parameters on {result['device']}:\n"
        f"  peak memory {result['peak_memory_gb']:.2f} GiB ({result['method']})"
        + (f"\n  {result['steps_per_second']:.2f} steps/s = {result['images_per_second']:.1f} images/s" if "steps_per_second" in result else "")
        + f"\n  fits a 16 GB GPU (about 14.9 GiB usable): {'yes' if fits else 'no'}"
    ), args.out)


if __name__ == "__main__":
    run(main, parse_args())
