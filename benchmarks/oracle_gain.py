"""What would a perfect generator give? The augmentation protocol's gain at `all` when the
added images are new real images of the same users (simulated datasets only).

    python benchmarks/oracle_gain.py --data_dir outputs/pipeline/data --manifest outputs/pipeline/dataset_manifest.json \
        [--generated_dir outputs/pipeline/generated] [--images_per_user 20] [--max_train_steps N --patience P]

The simulator draws further images of every user (image indices past the dataset's, with
the settings of its dataset_card.json): images from exactly the users' distribution, which
no generator can beat. The evaluation's classifier (sized by --preset) is trained on the
whole real train split, on it plus the new real images and, with --generated_dir, on it plus
the generated images: the same seeds, initialisation and steps in every row, as in
inference/evaluate.py's protocol. Each addition's paired gain on the real test split is
printed with its 95% interval and verdict. If the new real images do not help, no generated
image can be expected to, at these classifier settings.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as `python benchmarks/oracle_gain.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks._measure import add_output_arguments, publish
from utils import classifier as clf
from utils.cli import UsageError, resolve_device, run
from utils.data_loader import add_split_arguments, check_data_dir, stage_manifest, user_number
from utils.distribution import paired_interval
from utils.evaluation import interval_text, verdict
from utils.gait_simulator import CARD_NAME, image_name, read_settings, simulate_image, user_folder
from utils.presets import PRESET_NAMES, PRESETS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The protocol's gain at 'all' from new real images of the same users "
                                            "(simulated datasets only).")
    p.add_argument("--data_dir", required=True, help="a dataset folder written by utils.gait_simulator")
    p.add_argument("--generated_dir", help="also score this folder of generated images (FOLDER/<user>/*.png)")
    p.add_argument("--images_per_user", type=int, default=20, help="new real images per user (default 20)")
    p.add_argument("--preset", choices=PRESET_NAMES, default="quick", help="sizes the classifier (default quick)")
    p.add_argument("--max_train_steps", type=int, help="classifier steps of every row (default: the preset's)")
    p.add_argument("--patience", type=int, help="validations without improvement before a classifier stops "
                                                 "(default: the preset's)")
    p.add_argument("--seeds", type=int, default=5, help="paired classifier seeds (default 5)")
    add_split_arguments(p)
    add_output_arguments(p)
    return p.parse_args(argv)


def write_new_images(settings, users, per_user, folder):
    """`per_user` images of each user numbered past the dataset's, in the dataset layout."""
    for name in users:
        number = user_number(name)
        if number is None:
            raise UsageError(f"user folder {name} is not named as the simulator names its users (ID_k)")
        (Path(folder) / user_folder(number)).mkdir(parents=True)
        for index in range(settings.images_per_user, settings.images_per_user + per_user):
            image, _ = simulate_image(settings, number, index)
            image.save(Path(folder) / user_folder(number) / image_name(number, index), compress_level=1)


def main(args):
    if args.seeds < 2 or args.images_per_user < 1 or any(v is not None and v < 1 for v in (args.max_train_steps,
                                                                                           args.patience)):
        raise UsageError("--seeds must be at least 2 (an interval needs them); --images_per_user, --max_train_steps "
                         "and --patience at least 1")
    data_dir = check_data_dir(args.data_dir)
    if not (data_dir / CARD_NAME).is_file():
        raise UsageError(f"{data_dir} has no {CARD_NAME}: new real images can be drawn for a simulated dataset only")
    simulation = read_settings(data_dir)
    manifest = stage_manifest(args, data_dir)
    if simulation.windows_per_recording != 1:
        raise UsageError("a dataset of recordings: new windows of a user would not be independent of the train split")
    settings = dict(PRESETS[args.preset]["classifier"])
    for name in ("max_train_steps", "patience"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    device = resolve_device(args.device)
    settings["mixed_precision"] = clf.resolve_precision(settings["mixed_precision"], device)
    started = time.perf_counter()
    side, loaded = settings["resolution"], PRESETS[args.preset]["vae"]["resolution"]

    def load(folder=None, split=None):
        # As inference/evaluate.py does: loaded at the generated images' side, then resized for the classifier.
        images, labels = (clf.load_split(data_dir, manifest, split, loaded) if folder is None else
                          clf.load_image_folder(folder, manifest, loaded)[:2])
        return clf.resize(images, side), labels

    train, val, test = (load(split=s) for s in ("train", "val", "test"))
    added = {}
    with tempfile.TemporaryDirectory() as scratch:
        write_new_images(simulation, manifest.users, args.images_per_user, scratch)
        added[f"{args.images_per_user} new real images per user"] = load(scratch)
    if args.generated_dir:
        added[f"generated images ({args.generated_dir})"] = load(args.generated_dir)
    jobs = {}
    for seed in range(args.seeds):
        jobs["real", seed] = clf.Job(train, val, seed, f"real, seed {seed}")
        for name, (images, labels) in added.items():
            jobs[name, seed] = clf.Job((torch.cat([train[0], images]), torch.cat([train[1], labels])), val, seed,
                                       f"real + {name}, seed {seed}")
    models = dict(zip(jobs, clf.train_classifiers(list(jobs.values()), manifest.users, settings, device)))
    accuracy = {name: [clf.accuracy(models[name, seed], *test) for seed in range(args.seeds)]
                for name in ["real", *added]}
    lines = [f"{len(test[1])} test images, classifier at {side}x{side}, {settings['max_train_steps']} steps, "
             f"{args.seeds} paired seeds; real only {np.mean(accuracy['real']):.1%}"]
    gains = {}
    for name in added:
        interval = paired_interval(np.subtract(accuracy[name], accuracy["real"]))
        gains[name] = {**interval, "verdict": verdict(interval), "counts": len(added[name][1])}
        lines.append(f"real + {name}: {np.mean(accuracy[name]):.1%}, {interval_text(interval)}: {gains[name]['verdict']}")
    result = {"data_dir": str(data_dir), "classifier": settings, "seeds": args.seeds, "accuracy": accuracy,
              "gain": gains, "seconds": time.perf_counter() - started}
    return publish(result, "\n".join(lines), args.out)


if __name__ == "__main__":
    run(main, parse_args())
