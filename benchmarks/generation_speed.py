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
import json
import sys
import time
from pathlib import Path

if not __package__:  # run as `python benchmarks/generation_speed.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._memory import peak_memory_gb, reset_peak_memory
from utils.cli import UsageError, run
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
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="as in generate.py")
    p.add_argument("--out", help="also write the numbers as JSON here")
    return p.parse_args(argv)


def random_pipeline(args):
    """A pipeline of the preset's architecture with random weights (no files needed)."""
    from training import train_diffusion, train_vae
    from utils.condition_encoder import UserConditionEncoder
    from utils.data_loader import DatasetManifest
    from utils.pipeline import UserDiffusionPipeline
    from utils.presets import resolve_preset
    from utils.sampling import make_sampler

    vae_args = train_vae.parse_args(["--data_dir", "-", "--output_dir", "-", "--preset", args.preset])
    resolve_preset(vae_args, "vae")
    vae_args.resolution = args.resolution or vae_args.resolution
    train_vae.check_architecture(vae_args)
    unet_args = train_diffusion.parse_args(["--data_dir", "-", "--vae_path", "-", "--output_dir", "-", "--preset", args.preset])
    resolve_preset(unet_args, "diffusion")
    factor = 2 ** (len(vae_args.block_out_channels) - 1)
    latent_shape = [vae_args.latent_channels, vae_args.resolution // factor, vae_args.resolution // factor]
    torch.manual_seed(0)
    vae = train_vae.build_vae(vae_args).eval()
    unet = train_diffusion.build_unet(unet_args, latent_shape[0], latent_shape[1]).eval()
    encoder = UserConditionEncoder(args.num_users, unet_args.cross_attention_dim, unet_args.num_condition_tokens).eval()
    scheduler = make_sampler(train_diffusion.build_noise_scheduler(unet_args).config, "dpmsolver")
    pipe = UserDiffusionPipeline(vae, unet, encoder, scheduler)
    users = [f"ID_{k}" for k in range(1, args.num_users + 1)]
    pipe.manifest = DatasetManifest(users=users, splits={"train": {}, "val": {}, "test": {}})
    pipe.info = {"latent_shape": latent_shape, "scaling_factor": 1.0, "guidance_scale": args.guidance_scale,
                 "resolution": vae_args.resolution}
    return pipe


def main(args):
    if args.num_images < 1 or args.batch_size < 1:
        raise UsageError("--num_images and --batch_size must be at least 1")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    dtype = inference_dtype(args.dtype, device)
    if args.model_path:
        from utils.pipeline import UserDiffusionPipeline

        pipe = UserDiffusionPipeline.from_pretrained(args.model_path, torch_dtype=dtype)
    else:
        pipe = random_pipeline(args)
        pipe.to(dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    users = pipe.manifest.users
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"generation on {name}, {pipe.info['resolution']}x{pipe.info['resolution']}, "
          f"latents {'x'.join(map(str, pipe.info['latent_shape']))}, guidance {args.guidance_scale}, batch {args.batch_size}, {dtype}")
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
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        results.append({"scheduler": scheduler, "steps": steps, "images": args.num_images, "seconds": seconds,
                        "images_per_second": args.num_images / seconds, "peak_memory_gb": peak_memory_gb(device)})
        print(f"  {scheduler:>9} {steps:4d} steps: {args.num_images / seconds:8.3f} images/s ({seconds:.1f} s for {args.num_images})")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": name, "resolution": pipe.info["resolution"],
                                              "dtype": str(dtype), "batch_size": args.batch_size, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    run(main, parse_args())
