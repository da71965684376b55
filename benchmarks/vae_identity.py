"""Does a user's identity survive the VAE? (stage-1 target: >= 90% of the accuracy kept)

    python benchmarks/vae_identity.py --vae_path outputs/vae/final_model [--preset quick] [--resolution 64]

Trains the evaluation's person-ID classifier (utils/classifier.py, sized by --preset) on
the real train split of the model's manifest, once per seed, and prints its accuracy on
the real test images and on their VAE reconstructions (posterior mode), and the share
kept. --resolution sets the side the classifier sees (default: the preset's); at the
VAE's own resolution it sees the speckle texture a smooth decoder loses, below it mostly
the gait pattern. inference/evaluate.py reports the same share at the preset's resolution.
"""

import argparse
import sys
import time
from pathlib import Path

if not __package__:  # run as `python benchmarks/vae_identity.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks._measure import add_output_arguments, publish
from utils import classifier as clf
from utils.cli import UsageError, resolve_device, run
from utils.data_loader import check_data_dir
from utils.presets import PRESET_NAMES, PRESETS
from utils.vae import load_vae, load_vae_manifest, reconstruct_uint8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Person-ID accuracy on real test images vs their VAE reconstructions.")
    p.add_argument("--vae_path", required=True, help="stage-1 final_model folder (with its dataset manifest)")
    p.add_argument("--data_dir", help="dataset folder (default: the one recorded in the manifest)")
    p.add_argument("--preset", choices=PRESET_NAMES, default="quick", help="sizes the classifier (default quick)")
    p.add_argument("--resolution", type=int, help="side the classifier sees (default: the preset's)")
    p.add_argument("--max_train_steps", type=int, help="classifier training steps (default: the preset's)")
    p.add_argument("--seeds", type=int, default=3, help="classifier seeds to average over (default 3)")
    add_output_arguments(p)
    return p.parse_args(argv)


def main(args):
    settings = dict(PRESETS[args.preset]["classifier"])
    for name in ("resolution", "max_train_steps"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.seeds < 1 or settings["resolution"] < 8 or settings["max_train_steps"] < 1:
        raise UsageError("--seeds and --max_train_steps must be at least 1, --resolution at least 8")
    vae_path = Path(args.vae_path)
    manifest = load_vae_manifest(vae_path)
    vae = load_vae(vae_path)
    data_dir = check_data_dir(args.data_dir or manifest.data_dir)
    device = resolve_device(args.device)
    started = time.perf_counter()
    # Images at the VAE's resolution, reconstructed there, then resized for the classifier.
    size = vae.config.sample_size
    train, val, test = (clf.load_split(data_dir, manifest, split, size) for split in ("train", "val", "test"))
    reconstructed = reconstruct_uint8(vae, test[0], device)
    side = settings["resolution"]
    train, val = ((clf.resize(x, side), y) for x, y in (train, val))
    test_images, reconstructed = clf.resize(test[0], side), clf.resize(reconstructed, side)
    real, kept_accuracy = [], []
    for seed in range(args.seeds):
        model = clf.train_classifier(train, val, manifest.users, settings, seed, device, desc=f"classifier, seed {seed}")[0]
        real.append(clf.accuracy(model, test_images, test[1]))
        kept_accuracy.append(clf.accuracy(model, reconstructed, test[1]))
        print(f"seed {seed}: real test {real[-1]:.3f}, VAE reconstructions {kept_accuracy[-1]:.3f}", flush=True)
    real_mean, reconstructed_mean = float(np.mean(real)), float(np.mean(kept_accuracy))
    result = {
        "vae_path": str(vae_path), "num_users": manifest.num_users, "test_images": len(test[1]),
        "classifier": settings, "seeds": args.seeds, "real_test_accuracy": real, "reconstruction_accuracy": kept_accuracy,
        "kept": reconstructed_mean / real_mean if real_mean else 0.0, "seconds": time.perf_counter() - started,
    }
    return publish(result, f"person-ID accuracy, {manifest.num_users} users, {len(test[1])} test images, classifier at "
                           f"{side}x{side}, {args.seeds} seeds: real {real_mean:.3f}, VAE reconstructions "
                           f"{reconstructed_mean:.3f} -> {result['kept']:.1%} kept (target >= 90%)", args.out)


if __name__ == "__main__":
    run(main, parse_args())
