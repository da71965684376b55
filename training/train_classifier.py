"""Train the person-ID classifier that judges generated images (utils/classifier.py).

    python training/train_classifier.py --data_dir data/simulated --output_dir outputs/classifier --preset quick
    # the split of a trained generator, so its test images stay unseen:
    python training/train_classifier.py --data_dir data/simulated --output_dir outputs/classifier \\
        --manifest outputs/diffusion/final_model/dataset_manifest.json

Without --manifest it makes the default split of --data_dir (or the one the split flags
describe) and says so; evaluate.py and generate.py refuse it beside a generator trained
on another split.

Trains from scratch on the train split, keeps the weights with the best val accuracy
(early stopping), prints the test accuracy and writes OUTPUT/{config.json,
model.safetensors, dataset_manifest.json, training.json}. The folder is what
inference/evaluate.py --classifier_path and inference/generate.py --filter_classifier take.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

if not __package__:  # run as `python training/train_classifier.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import classifier as clf
from utils.cli import UsageError, resolve_device, run
from utils.data_loader import add_split_arguments, check_data_dir, stage_manifest
from utils.files import output_folder
from utils.presets import PRESET_NAMES, Config, resolve_preset


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the person-ID classifier on the train split (see the module docstring).")
    p.add_argument("--data_dir", required=True, help="dataset folder with one subfolder per user")
    p.add_argument("--output_dir", required=True, help="the classifier folder to write")
    p.add_argument("--preset", choices=PRESET_NAMES, default="quick")
    p.add_argument("--resolution", type=int, help="side the images are resized to (preset)")
    p.add_argument("--max_train_steps", type=int, help="optimiser steps (preset); early stopping may end sooner")
    p.add_argument("--num_epochs", type=int, help="instead of --max_train_steps: passes over the train split")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--balance_users", action="store_true",
                   help="draw every user equally often (for users with unequal image counts); default: every image once "
                        "per epoch")
    p.add_argument("--mixed_precision", choices=clf.PRECISIONS,
                   help="auto = bf16 autocast where the device computes bf16 natively (preset)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing classifier folder")
    p.add_argument("--dry_run", action="store_true", help="print the resolved configuration and exit")
    add_split_arguments(p)
    return p.parse_args(argv)


SETTINGS = ("widths", "depths", "batch_size", "learning_rate", "weight_decay", "max_train_steps", "eval_every", "patience",
            "mixed_precision")


def resolve_config(args, train_count):
    """The preset's classifier settings under the user's flags, steps from --num_epochs when given."""
    if args.max_train_steps is not None and args.num_epochs is not None:
        raise UsageError("give --max_train_steps or --num_epochs, not both")
    values, _ = resolve_preset("classifier", args.preset, vars(args))
    if args.num_epochs is not None:
        values["max_train_steps"] = args.num_epochs * math.ceil(train_count / values["batch_size"])
    for name in ("resolution", "max_train_steps", "batch_size"):
        if values[name] < 1:
            raise UsageError(f"--{name} must be at least 1")
    if args.num_epochs is not None and args.num_epochs < 1:
        raise UsageError("--num_epochs must be at least 1")
    return Config(values)


def main(args):
    data_dir = check_data_dir(args.data_dir)
    manifest = stage_manifest(args, data_dir)
    train_count = len(manifest.samples("train"))
    config = resolve_config(args, train_count)
    output_dir = output_folder(config.output_dir, config.overwrite)
    device = resolve_device(config.device)
    settings = {**config.pick(*SETTINGS), "balance_users": args.balance_users}
    settings["mixed_precision"] = clf.resolve_precision(settings["mixed_precision"], device)
    split = (f"--manifest {config.manifest}" if config.manifest else
             f"a new split of --data_dir {manifest.describe()}; give --manifest to use a trained model's split")
    print(f"classifier: {manifest.num_users} users, {train_count} train images at {config.resolution}x{config.resolution}, "
          f"CNN widths {settings['widths']} depths {settings['depths']}, up to {config.max_train_steps} steps "
          f"of {config.batch_size}, seed {config.seed}, {device} ({settings['mixed_precision']})\n  split: {split}")
    if config.dry_run:
        print(json.dumps(config.to_dict(), indent=2, default=str))
        return 0

    started = time.perf_counter()
    train, val, test = (clf.load_split(data_dir, manifest, s, config.resolution) for s in ("train", "val", "test"))
    model, history = clf.train_classifier(train, val, manifest.users, settings, config.seed, device)
    test_accuracy, test_balanced = clf.accuracies(model, *test)
    info = {"arguments": config.to_dict(), "resolution": config.resolution, "seed": config.seed, "settings": settings,
            "data_dir": str(data_dir), "counts": {s: len(x[1]) for s, x in zip(("train", "val", "test"), (train, val, test))},
            "test_accuracy": test_accuracy, "test_balanced_accuracy": test_balanced, "seconds": time.perf_counter() - started, **history}
    clf.save_classifier(model.cpu(), output_dir, manifest, info)
    print(f"test accuracy {test_accuracy:.3f} (balanced {test_balanced:.3f}) on {len(test[1])} real test images (best val {history['best_val_accuracy']:.3f} "
          f"at step {history['best_step']}); wrote {output_dir}")
    return 0


if __name__ == "__main__":
    run(main, parse_args())
