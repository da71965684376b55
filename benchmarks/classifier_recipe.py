"""Accuracy and cost of a person-ID classifier recipe: the evaluation's reference classifier
(utils/classifier.py) trained on the real train split, tested on real test.

    python benchmarks/classifier_recipe.py --data_dir data/simulated --preset quick
    python benchmarks/classifier_recipe.py --data_dir data/simulated --resolution 64 --max_train_steps 1500 \\
        --widths 32 64 128 256 --seeds 3 --classic
    python benchmarks/classifier_recipe.py --data_dir data/simulated --seeds 2 --classic mixup_probability=0.2

Every flag left unset is the preset's. Prints, per seed, the best validation accuracy (what a
recipe or augmentation is chosen by), the real test accuracy, the steps
run (early stopping may end sooner) and the seconds, then the mean: the numbers behind
the preset's classifier (docs/experiments.md).
"""

import argparse
import sys
import time
from pathlib import Path

if not __package__:  # run as `python benchmarks/classifier_recipe.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks._measure import add_output_arguments, publish
from utils import classifier as clf
from utils.cli import UsageError, resolve_device, run
from utils.data_loader import add_split_arguments, check_data_dir, stage_manifest
from utils.presets import PRESET_NAMES, PRESETS, resolve_preset


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Real test accuracy and training time of a classifier recipe.")
    p.add_argument("--data_dir", required=True, help="dataset folder (user folders)")
    p.add_argument("--preset", choices=PRESET_NAMES, default="quick", help="the recipe's defaults (default quick)")
    p.add_argument("--resolution", type=int, help="side the classifier sees")
    p.add_argument("--widths", type=int, nargs="+", help="channels per stage of the CNN")
    p.add_argument("--depths", type=int, nargs="+", help="convolutions per stage")
    p.add_argument("--max_train_steps", type=int)
    p.add_argument("--batch_size", type=int)
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--weight_decay", type=float)
    p.add_argument("--eval_every", type=int, help="steps between validations (early stopping)")
    p.add_argument("--patience", type=int, help="validations without improvement before stopping")
    p.add_argument("--classic", nargs="*", metavar="KEY=VALUE",
                   help="train with the evaluation's classic augmentation, its preset values overridden by any "
                        "KEY=VALUE given (e.g. mixup_probability=0.2 time_masks=1)")
    p.add_argument("--seeds", type=int, default=1, help="classifier seeds (default 1)")
    add_split_arguments(p)
    add_output_arguments(p)
    return p.parse_args(argv)


def classic_settings(preset, overrides):
    """The preset's classic augmentation with KEY=VALUE overrides (numbers)."""
    settings = dict(preset)
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in settings or not value:
            raise UsageError(f"--classic {item}: expected KEY=VALUE with KEY one of {' '.join(settings)}")
        try:
            number = float(value)
        except ValueError:
            raise UsageError(f"--classic {item}: {value!r} is not a number") from None
        if isinstance(settings[key], int):
            if not number.is_integer():
                raise UsageError(f"--classic {item}: {key} is a count, got {value}")
            number = int(number)
        settings[key] = number
    return settings


def main(args):
    if args.seeds < 1:
        raise UsageError("--seeds must be at least 1")
    data_dir = check_data_dir(args.data_dir)
    manifest = stage_manifest(args, data_dir)
    values, _ = resolve_preset("classifier", args.preset, vars(args))
    settings = {name: values[name] for name in PRESETS[args.preset]["classifier"]}
    classic = None if args.classic is None else classic_settings(PRESETS[args.preset]["evaluation"]["classic_augmentation"],
                                                                 args.classic)
    device = resolve_device(args.device)
    train, val, test = (clf.load_split(data_dir, manifest, split, settings["resolution"])
                        for split in ("train", "val", "test"))
    runs = []
    for seed in range(args.seeds):
        started = time.perf_counter()
        model, history = clf.train_classifier(train, val, manifest.users, settings, seed, device,
                                              desc=f"seed {seed}", augmentation=classic)
        runs.append({"seed": seed, "val_accuracy": history["best_val_accuracy"],
                     "test_accuracy": clf.accuracy(model, *test), "steps_run": history["steps_run"],
                     "best_step": history["best_step"], "seconds": time.perf_counter() - started})
        print(f"seed {seed}: val {runs[-1]['val_accuracy']:.3f}, real test {runs[-1]['test_accuracy']:.3f}, "
              f"{runs[-1]['steps_run']} steps "
              f"(best {runs[-1]['best_step']}), {runs[-1]['seconds']:.0f} s", flush=True)
    accuracies = [r["test_accuracy"] for r in runs]
    result = {"settings": settings, "classic_augmentation": classic, "num_users": manifest.num_users,
              "train_images": len(train[1]), "test_images": len(test[1]), "runs": runs,
              "mean_test_accuracy": float(np.mean(accuracies)),
              "mean_val_accuracy": float(np.mean([r["val_accuracy"] for r in runs])),
              "mean_seconds": float(np.mean([r["seconds"] for r in runs]))}
    return publish(result, f"{settings['resolution']}x{settings['resolution']}, widths {settings['widths']}, depths "
                           f"{settings['depths']}, {settings['max_train_steps']} steps of {settings['batch_size']}, lr "
                           f"{settings['learning_rate']}{f', classic augmentation {classic}' if classic else ''}: val "
                           f"{100 * result['mean_val_accuracy']:.1f}%, real test "
                           f"{100 * result['mean_test_accuracy']:.1f}% over {args.seeds} seed(s), "
                           f"{result['mean_seconds']:.0f} s each", args.out)


if __name__ == "__main__":
    run(main, parse_args())
