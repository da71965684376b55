"""Generation images/s for each scheduler at its default step count, with guidance.

    python benchmarks/generation_speed.py --model_path outputs/diffusion_quick/final_model   # a trained model
    python benchmarks/generation_speed.py --preset standard --resolution 256                  # random weights
    python benchmarks/generation_speed.py --preset standard --resolution 256 --num_users 31 \\
        --num_images 3100 --schedulers dpmsolver --batch_size 128 --dtype fp16                 # the GPU goal

Speed does not depend on what a model learned, so without --model_path the preset's VAE
and UNet are built with random weights at --resolution. Images are generated
--batch_size at a time, conditional and unconditional passes batched together (CFG).
"""

import argparse
import sys
import time
from pathlib import Path

if not __package__:  # run as `python benchmarks/generation_speed.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._measure import add_output_arguments, device_name, peak_memory_gb, publish, reset_peak_memory, synchronize
from utils.cli import UsageError, resolve_device, run
from utils.presets import PRESET_NAMES
from utils.sampling import DTYPES, SAMPLERS, inference_dtype


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generation images/s per scheduler (default step counts, with guidance).")
    p.add_argument("--model_path", help="a stage-2 final_model (default: random weights of --preset)")
    p.add_argument("--preset", choices=PRESET_NAMES, default="quick", help="architecture when no --model_path")
    p.add_argument("--resolution", type=int, help="image side when no --model_path (default: the preset's)")
    p.add_argument("--num_users", type=int, default=31)
    p.add_argument("--schedulers", nargs="+", choices=list(SAMPLERS), default=list(SAMPLERS))
    p.add_argument("--num_images", type=int, default=8, help="images timed per scheduler (default 8)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="as in generate.py")
    add_output_arguments(p)
    return p.parse_args(argv)


def random_pipeline(args):
    """A pipeline of the preset's architecture with random weights (no files needed)."""
    from utils.diffusion import build_denoiser, build_noise_scheduler, resolve_diffusion_config
    from utils.pipeline import UserDiffusionPipeline
    from utils.vae import ARCHITECTURE, build_vae, resolve_vae_config

    vae_config = resolve_vae_config({"preset": args.preset, "resolution": args.resolution, "device": "cpu",
                                     "mixed_precision": "no", "perceptual_weight": 0})
    config = resolve_diffusion_config({"preset": args.preset, "device": "cpu", "mixed_precision": "no",
                                       "resolution": vae_config.resolution, "latent_shape": vae_config.latent_shape})
    torch.manual_seed(0)
    vae = build_vae(**vae_config.pick(*ARCHITECTURE)).eval()
    denoiser = build_denoiser(config, args.num_users).eval()
    scheduler = build_noise_scheduler(config.num_train_timesteps, config.prediction_type)
    label_map = {f"ID_{k}": k - 1 for k in range(1, args.num_users + 1)}
    return UserDiffusionPipeline(vae, denoiser.unet, denoiser.condition_encoder, scheduler, label_map=label_map,
                                 null_index=args.num_users, resolution=config.resolution,
                                 latent_shape=config.latent_shape, scaling_factor=1.0,
                                 guidance_scale=args.guidance_scale)


def main(args):
    if args.num_images < 1 or args.batch_size < 1:
        raise UsageError("--num_images and --batch_size must be at least 1")
    device = resolve_device(args.device)
    dtype = inference_dtype(args.dtype, device)
    if args.model_path:
        from utils.pipeline import load_generator

        pipe = load_generator(args.model_path, torch_dtype=dtype)
    else:
        pipe = random_pipeline(args)
        pipe.to(dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    users = pipe.manifest.users
    name = device_name(device)
    print(f"generation on {name}, {pipe.config.resolution}x{pipe.config.resolution}, "
          f"latents {'x'.join(map(str, pipe.config.latent_shape))}, guidance {args.guidance_scale}, batch {args.batch_size}, {dtype}")
    results = []
    for scheduler in args.schedulers:
        pipe.use_scheduler(scheduler)
        steps = SAMPLERS[scheduler][1]
        pipe(users=users[:1], seeds=[0], guidance_scale=args.guidance_scale, num_inference_steps=2)  # warm-up
        reset_peak_memory(device)
        started = time.perf_counter()
        for start in range(0, args.num_images, args.batch_size):
            count = min(args.batch_size, args.num_images - start)
            batch_users = [users[(start + k) % len(users)] for k in range(count)]
            pipe(users=batch_users, seeds=list(range(start, start + count)), guidance_scale=args.guidance_scale,
                 num_inference_steps=steps, output_type="pt")
        synchronize(device)
        seconds = time.perf_counter() - started
        results.append({"scheduler": scheduler, "steps": steps, "images": args.num_images, "seconds": seconds,
                        "images_per_second": args.num_images / seconds, "peak_memory_gb": peak_memory_gb(device)})
        print(f"  {scheduler:>9} {steps:4d} steps: {args.num_images / seconds:8.3f} images/s ({seconds:.1f} s for {args.num_images})")
    return publish({"device": name, "resolution": pipe.config.resolution, "dtype": str(dtype),
                    "batch_size": args.batch_size, "results": results}, f"{len(results)} schedulers timed", args.out)


if __name__ == "__main__":
    run(main, parse_args())
