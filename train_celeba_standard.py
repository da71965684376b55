"""The recommended stage-1 recipe in one command (the name is the original project's).

    python train_celeba_standard.py                 # finds the data, picks settings for this machine
    python train_celeba_standard.py --dry_run       # only print the train_vae.py command

Data: --data_dir, else /kaggle/input/dataset, else ./data, else the built-in simulated
dataset (written to data/simulated on first use). Output: /kaggle/working/outputs/
vae_celeba_standard on Kaggle, ./outputs/vae_celeba_standard elsewhere. Batch size,
precision and accumulation follow the detected GPU (T4, P100, newer) or the CPU. The
recipe keeps the original README's improvements: KL weight 1e-4, perceptual weight 1.0,
frequency weight 0.1, warmup; its resolution is the original's 64 (--resolution changes
it). Any other flag is passed on to training/train_vae.py unchanged.
"""

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from utils.cli import UsageError, run
from utils.data_loader import is_image_file
from utils.recipes import KAGGLE_DATASET, SIMULATED_DATA, default_vae_output_dir, hardware_recipe


def looks_like_dataset(folder):
    """A folder with at least one subfolder that holds images directly."""
    return folder.is_dir() and any(
        sub.is_dir() and any(is_image_file(f) for f in sub.iterdir()) for sub in folder.iterdir()
    )


def find_data(explicit):
    """(data folder, where it came from); (None, ...) when the simulated set is the fallback."""
    if explicit:
        return Path(explicit), "--data_dir"
    for candidate, source in ((KAGGLE_DATASET, "Kaggle input"), (Path("data"), "./data")):
        if looks_like_dataset(candidate):
            return candidate, source
    return None, "built-in simulated dataset"


def recipe_command(args, data_dir, hardware, passthrough):
    command = [
        sys.executable, "training/train_vae.py",
        "--data_dir", str(data_dir),
        "--output_dir", str(args.output_dir),
        "--preset", "quick" if hardware["device"] == "cpu" else "standard",
        "--resolution", str(args.resolution),
        "--batch_size", str(hardware["batch_size"]),
        "--gradient_accumulation_steps", str(hardware["gradient_accumulation_steps"]),
        "--mixed_precision", hardware["mixed_precision"],
        "--kl_weight", "1e-4",
        "--perceptual_weight", "1.0",
        "--freq_weight", "0.1",
    ]
    if hardware["device"] != "cpu":
        # 64x64 -> 16x16x4 latents: three levels on a GPU, wider than the CPU preset.
        command += ["--block_out_channels", "128", "256", "512", "--num_epochs", "50", "--warmup_steps", "500"]
    return command + passthrough


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Recommended stage-1 recipe: finds the data, adapts to the GPU/CPU, runs training/train_vae.py. "
        "Unknown flags are passed on to train_vae.py.",
    )
    p.add_argument("--data_dir", help="dataset folder (default: /kaggle/input/dataset, ./data, or the simulated set)")
    p.add_argument("--output_dir", default=str(default_vae_output_dir()), help="run folder (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=64, help="image side (default 64, as the original recipe)")
    p.add_argument("--dry_run", action="store_true", help="print the command and exit")
    return p.parse_known_args(argv)


def main(parsed):
    args, passthrough = parsed
    data_dir, source = find_data(args.data_dir)
    hardware = hardware_recipe()
    if data_dir is None:
        data_dir = SIMULATED_DATA
        if not data_dir.is_dir() and not args.dry_run:
            print(f"no dataset found: writing the built-in simulated dataset to {data_dir}")
            simulate = [sys.executable, "-m", "utils.gait_simulator", "--output_dir", str(data_dir)]
            if subprocess.run(simulate).returncode != 0:
                raise UsageError("could not write the simulated dataset")
    command = recipe_command(args, data_dir, hardware, passthrough)
    print(f"data: {data_dir} ({source}); device: {hardware['name']}")
    print("running: " + shlex.join(command))
    if args.dry_run:
        return 0
    return subprocess.run(command).returncode


if __name__ == "__main__":
    run(main, parse_args())
