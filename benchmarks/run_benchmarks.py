"""Every benchmark in one table: stage-1 training images/s, stage-2 steps/s with and without
the latent cache, stage-2 training memory, generation images/s per scheduler (with
guidance), and peak memory for each; the machine and versions in the header. Then the
quick preset's profile (benchmarks/stage_profile.py): where each training stage's time goes.

    python benchmarks/run_benchmarks.py --quick                 # a smoke run: under 3 minutes on 2 CPU cores
    python benchmarks/run_benchmarks.py --out results/bench     # the standard presets at 256x256
    bash benchmarks/gpu_check.sh --out results/gpu_check        # the GPU check (fp16 and bf16, 31 x 100 images)

Each benchmark runs as its own script (benchmarks/*.py) in a subprocess, so each peak
memory is its own. Prints a Markdown table; with --out P writes P.md and P.json.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as `python benchmarks/run_benchmarks.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stage_profile import markdown as profile_markdown
from utils.cli import RunFailed, UsageError, resolve_device, run
from utils.training import cpu_model

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Run the benchmarks and print one Markdown table (see the module docstring).")
    p.add_argument("--quick", action="store_true", help="small presets and few steps: a smoke run of every benchmark")
    p.add_argument("--precisions", nargs="+", choices=["no", "fp16", "bf16"], help="training precisions to time "
                   "(default: fp16 on a GPU, no on a CPU)")
    p.add_argument("--generation_images", type=int, help="images timed per scheduler (default 8, --quick 2)")
    p.add_argument("--generation_batch", type=int, default=32, help="generation batch size")
    p.add_argument("--schedulers", nargs="+", help="default: all; --quick skips ddpm's 1000 steps")
    p.add_argument("--goal_images", type=int, help="also time this many dpmsolver_sde images of 31 users at 256x256 "
                                                    "in batches of 128 (the GPU goal: 3100 in <= 60 s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", help="write OUT.md and OUT.json")
    return p.parse_args(argv)


def run_benchmark(script, args, scratch, timeout=1800):
    """Run benchmarks/<script> with --out; its JSON, or RunFailed with its last error line."""
    out = Path(scratch) / f"{script}-{time.monotonic_ns()}.json"
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / script), *map(str, args), "--out", str(out)]
    print("$ " + " ".join(command[1:]), flush=True)
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, PYTHONPATH=""))
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RunFailed(f"{script} failed (exit {result.returncode}): {last}")
    return json.loads(out.read_text())


def header():
    import torch

    gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "no GPU"
    versions = []
    for name in ("torch", "diffusers", "accelerate", "transformers"):
        try:
            from importlib.metadata import version

            versions.append(f"{name} {version(name)}")
        except Exception:
            versions.append(f"{name} ?")
    return {"machine": f"{cpu_model()}, {os.cpu_count()} CPU cores, {gpu}",
            "python": platform.python_version(), "versions": ", ".join(versions),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def markdown(info, rows):
    lines = [f"Machine: {info['machine']}; Python {info['python']}; {info['versions']}; {info['date']}.", "",
             "| benchmark | preset | setting | speed | peak memory |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['benchmark']} | {row['preset']} | {row['setting']} | {row['speed']} | "
                     f"{row['memory']} |")
    return "\n".join(lines)


def main(args):
    if any(n is not None and n < 1 for n in (args.generation_images, args.goal_images)) or args.generation_batch < 1:
        raise UsageError("--generation_images, --goal_images and --generation_batch must be at least 1")
    gpu = resolve_device(args.device).type == "cuda"
    device = ["--device", "cuda" if gpu else "cpu"]
    precisions = args.precisions or (["fp16"] if gpu else ["no"])
    if not gpu and "fp16" in precisions:
        raise UsageError("fp16 training needs a GPU; use --precisions no or bf16 on the CPU")
    presets = ["quick", "standard"]
    images = args.generation_images or (2 if args.quick else 8)
    schedulers = args.schedulers or (["dpmsolver_sde", "dpmsolver", "ddim", "euler"] if args.quick else
                                     ["dpmsolver_sde", "dpmsolver", "ddim", "euler", "ddpm"])
    rows, raw = [], {}

    def memory(result, key="peak_memory_gb"):
        kind = result.get("peak_memory_kind") or result.get("method") or ("CUDA peak" if gpu else "process RSS")
        return f"{result[key]:.2f} GiB ({kind})"

    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(scratch) / "data"
        subprocess.run([sys.executable, "-m", "utils.gait_simulator", "--output_dir", str(data_dir), "--num_users", "4",
                        "--images_per_user", "16", "--resolution", "64" if args.quick else "256"],
                       cwd=REPO_ROOT, check=True, capture_output=True)
        for preset in presets:
            small = args.quick and preset == "standard"  # one step of one image: the smoke run's standard VAE
            for precision in precisions:
                vae = run_benchmark("vae_throughput.py", [
                    "--preset", preset, "--mixed_precision", precision, *(["--steps", 1, "--warmup", 0] if args.quick else []),
                    *(["--batch_size", 1] if small else []), *device], scratch)
                raw[f"vae_{preset}_{precision}"] = vae
                rows.append({"benchmark": "VAE training", "preset": preset,
                             "setting": f"{vae['resolution']}px, batch {vae['batch_size']}, {precision}",
                             "speed": f"{vae['images_per_second']:.2f} images/s", "memory": memory(vae)})
                unet = run_benchmark("diffusion_memory.py", [
                    "--preset", preset, "--mixed_precision", precision, "--steps", 1 if args.quick else 3,
                    *(["--latent_shape", 16, 16, 16, "--batch_size", 32] if preset == "quick" else []), *device], scratch)
                raw[f"diffusion_{preset}_{precision}"] = unet
                speed = f"{unet['steps_per_second']:.2f} steps/s" if "steps_per_second" in unet else "–"
                fits = "fits" if unet["fits_16gb"] else "does NOT fit"
                rows.append({"benchmark": f"diffusion training ({fits} 16 GB)", "preset": preset,
                             "setting": f"latents {'x'.join(map(str, unet['latent_shape']))}, batch "
                                        f"{unet['batch_size']}, {precision}", "speed": speed, "memory": memory(unet)})
        cache_preset = "quick" if args.quick else "standard"
        cache = run_benchmark("latent_cache_speed.py", [
            "--data_dir", data_dir, "--preset", cache_preset, "--steps", 2 if args.quick else 3,
            *(["--batch_size", 8] if args.quick else []), *device], scratch)
        raw["latent_cache"] = cache
        rows.append({"benchmark": "diffusion training: latent cache vs on-the-fly encoding", "preset": cache_preset,
                     "setting": f"{cache['resolution']}px, batch {cache['batch_size']}",
                     "speed": f"{cache['cached_steps_per_second']:.3f} vs {cache['on_the_fly_steps_per_second']:.3f} "
                              f"steps/s = **{cache['speedup']:.1f}x**", "memory": memory(cache)})
        generation_preset = "quick" if args.quick else "standard"
        dtype = "fp16" if gpu else "fp32"
        generation = run_benchmark("generation_speed.py", [
            "--preset", generation_preset, "--schedulers", *schedulers, "--num_images", images,
            "--batch_size", min(args.generation_batch, images), "--dtype", dtype, *device], scratch)
        raw["generation"] = generation
        for result in generation["results"]:
            rows.append({"benchmark": f"generation, {result['scheduler']} {result['steps']} steps, guidance 3",
                         "preset": generation_preset,
                         "setting": f"{generation['resolution']}px, {result['images']} images, {dtype}",
                         "speed": f"{result['images_per_second']:.3f} images/s", "memory": memory(result)})
        if args.goal_images:
            goal = run_benchmark("generation_speed.py", [
                "--preset", "standard", "--resolution", 256, "--num_users", 31, "--schedulers", "dpmsolver_sde",
                "--num_images", args.goal_images, "--batch_size", 128, "--dtype", dtype, *device], scratch)
            raw["generation_goal"] = goal
            result = goal["results"][0]
            verdict = "meets" if result["seconds"] <= 60 * args.goal_images / 3100 else "misses"
            rows.append({"benchmark": f"generation goal: {args.goal_images} images of 31 users ({verdict} <= 60 s "
                                      "per 3100)", "preset": "standard",
                         "setting": f"256px, dpmsolver_sde {result['steps']} steps, guidance 3, batch 128, {dtype}",
                         "speed": f"**{result['seconds']:.1f} s** ({result['images_per_second']:.1f} images/s)",
                         "memory": memory(result)})
        profile = run_benchmark("stage_profile.py", ["--preset", "quick", "--steps", 2 if args.quick else 5, *device],
                                scratch)
        raw["profile"] = profile
    info = header()
    table = (markdown(info, rows) + "\n\nWhere the quick preset's time goes, per step and as the stage's steps "
             "imply:\n\n" + profile_markdown(profile["rows"]))
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(table + "\n")
        out.with_suffix(".json").write_text(json.dumps({**info, "rows": rows, "raw": raw}, indent=2))
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    run(main, parse_args())
