"""Does the augmentation carry identity, and does it help? (docs/design.md, evaluation protocol)

    python inference/evaluate.py --data_dir data/simulated --generated_dir outputs/generated \\
        --output_dir outputs/evaluation --preset quick [--classifier_path C] [--compare_dir G2 ...]

Every number is measured on the real test split of the dataset manifest the generator
was trained with (read from the generated folder's manifest.json; the test split was
never seen by any model). A --manifest or --classifier_path on another split stops with
exit 2: their test images would be the generator's training images. Person-ID
classifiers (utils/classifier.py) are trained here from scratch, sized by --preset:

  identity    classifiers trained on real train (--num_seeds seeds, or the one given by
              --classifier_path): accuracy on real test, and on generated images labelled
              with the user they were generated for (overall, per user, confusion matrix);
  vae         the identity kept through the VAE: the real-train classifiers on VAE
              reconstructions of the test images; with --vae_classifiers (preset) also
              classifiers trained on reconstructions of the train split, whose accuracy on
              reconstructed test vs on generated images separates what the VAE loses
              (texture) from what the diffusion model loses (identity);
  tstr        trained on generated images only, tested on real test;
  gain        real train vs real train + all generated images, at --budgets real images per
              user, paired by seed over --gain_seeds seeds, with a 95% t interval;
  distribution  Frechet distance and precision/recall/density/coverage (k=5) in the
              reference classifier's feature space; memorisation in pixel space.

The classifiers are independent: on a CPU they train side by side, one single-thread
process per core (utils.classifier.train_classifiers).

The sections and the Markdown renderer are in utils/evaluation.py. Writes
OUTPUT/report.json, OUTPUT/report.md with PNG plots, and OUTPUT/classifier/ (the
first reference classifier, reusable with --classifier_path and generate.py's
--filter_classifier). --compare_dir adds the identity numbers of other generated folders
(another guidance scale, another sampler) measured with the very same classifiers.
"""

import argparse
import json
import sys
import time
from pathlib import Path

if not __package__:  # run as `python inference/evaluate.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from utils import classifier as clf
from utils import evaluation as sections
from utils.cli import UsageError, resolve_device, run
from utils.data_loader import MANIFEST_NAME, SPLIT_DEFAULTS, SPLIT_SOURCES, DatasetManifest, add_split_arguments, check_data_dir, \
    is_image_file, stage_manifest
from utils.evaluation import pct
from utils.files import atomic_folder, output_folder
from utils.image_grid import labelled_grid, to_pil_images
from utils.leakage import leak_check, pairs_grid
from utils.presets import PRESET_NAMES, PRESETS
from utils.sampling import DTYPES, inference_dtype


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Identity, TSTR, augmentation gain and distribution metrics of generated "
                                            "images against the real test split (see the module docstring).")
    p.add_argument("--data_dir", required=True, help="the real dataset (user folders)")
    p.add_argument("--generated_dir", required=True, help="output of inference/generate.py (user folders)")
    p.add_argument("--output_dir", required=True, help="where report.md, report.json and the plots go")
    p.add_argument("--classifier_path", help="a train_classifier.py folder to use as the reference classifier")
    p.add_argument("--compare_dir", nargs="+", default=[], help="more generated folders, scored by the same classifiers")
    p.add_argument("--vae_path", help="stage-1 VAE for the reconstruction classifiers (default: the generator's)")
    p.add_argument("--preset", choices=PRESET_NAMES, default="quick", help="sizes the classifiers and the protocol")
    p.add_argument("--budgets", nargs="+", help="real images per user for the gain, integers or 'all' (preset)")
    p.add_argument("--num_seeds", type=int, help="classifier seeds for identity, vae and tstr (preset)")
    p.add_argument("--vae_classifiers", action=argparse.BooleanOptionalAction,
                   help="also train classifiers on VAE reconstructions of the train split (preset: standard yes, "
                        "quick no)")
    p.add_argument("--gain_seeds", type=int, help="paired seeds for the augmentation gain (preset)")
    p.add_argument("--max_train_steps", type=int, help="classifier training steps (preset)")
    p.add_argument("--classifier_resolution", type=int, help="side the classifiers see, images resized to it (preset)")
    p.add_argument("--balance_users", action="store_true",
                   help="every classifier draws every user equally often (users with unequal image counts)")
    p.add_argument("--mixed_precision", choices=clf.PRECISIONS,
                   help="the classifiers' training: auto = bf16 autocast where the device computes bf16 natively "
                        "(preset)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="the VAE's weights for the reconstructions: auto = bf16 where the device computes it natively "
                        "(faster there, the same PSNR: docs/experiments.md), else fp32")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    group = add_split_arguments(p)
    group.description = ("default: the split of the model that generated the images; a --manifest must agree with it. "
                         "The split flags only make a new split for a generated folder without a model record.")
    return p.parse_args(argv)


def resolve_settings(args):
    settings = {**PRESETS[args.preset]["classifier"], "balance_users": args.balance_users}
    evaluation = PRESETS[args.preset]["evaluation"]
    for name, flag in (("max_train_steps", "max_train_steps"), ("resolution", "classifier_resolution"),
                       ("mixed_precision", "mixed_precision")):
        if getattr(args, flag) is not None:
            settings[name] = getattr(args, flag)
    budgets = args.budgets or [str(b) for b in evaluation["budgets"]]
    for budget in budgets:
        if budget != "all" and not (budget.isdigit() and int(budget) >= 1):
            raise UsageError(f"--budgets takes positive integers or 'all', got {budget!r}")
    budgets = sorted(set(budgets), key=lambda b: (b != "all", int(b) if b != "all" else 0))  # the users' case first
    num_seeds = args.num_seeds if args.num_seeds is not None else evaluation["num_seeds"]
    gain_seeds = args.gain_seeds if args.gain_seeds is not None else evaluation["gain_seeds"]
    if num_seeds < 1 or gain_seeds < 1 or settings["max_train_steps"] < 1:
        raise UsageError("--num_seeds, --gain_seeds and --max_train_steps must be at least 1")
    if settings["resolution"] < 2 ** len(settings["widths"]):
        raise UsageError(f"--classifier_resolution must be at least {2 ** len(settings['widths'])} (the classifier "
                         f"halves it {len(settings['widths'])} times), got {settings['resolution']}")
    vae_classifiers = evaluation["vae_classifiers"] if args.vae_classifiers is None else args.vae_classifiers
    return settings, budgets, num_seeds, gain_seeds, dict(evaluation["classic_augmentation"]), vae_classifiers


def generator_record(generated_dir):
    """generate.py's manifest.json of a folder, or {} for a folder made some other way."""
    path = Path(generated_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def generator_parts(record):
    """(dataset manifest, VAE folder) of the model that made the images, when known."""
    paths = [Path(p) for p in record.get("model", {}).get("paths", [])]
    if not paths:
        return None, None
    first = paths[0]  # --model_path: the final_model folder; three-path form: the VAE folder
    manifest = DatasetManifest.load(first / MANIFEST_NAME) if (first / MANIFEST_NAME).is_file() else None
    vae = first / "vae" if (first / "vae" / "config.json").is_file() else first if (first / "config.json").is_file() else None
    return manifest, vae


def first_image_width(folder):
    from PIL import Image

    first = next(f for d in sorted(Path(folder).iterdir()) if d.is_dir() for f in sorted(d.iterdir()) if is_image_file(f))
    with Image.open(first) as image:
        return image.width


def check_folder(path, flag):
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{flag} {path} is not a folder")
    if not any(is_image_file(f) for d in path.iterdir() if d.is_dir() for f in d.iterdir()):
        raise UsageError(f"{flag} {path} holds no images in user folders (expected {path}/<user>/*.png)")
    return path


def evaluation_manifest(args, data_dir, generator_manifest, classifier_manifest):
    """The split every number is measured on: the generator's when known, which --manifest
    and a given classifier must share; else theirs; else a new split from the split flags."""
    stored = [(manifest, name) for manifest, name in (
        (generator_manifest, "the generator of --generated_dir"),
        (DatasetManifest.load(args.manifest) if args.manifest else None, f"--manifest {args.manifest}"),
        (classifier_manifest, f"--classifier_path {args.classifier_path}"),
    ) if manifest is not None]
    if not stored:
        return stage_manifest(args, data_dir)
    new_split = [f"--{name}" for name in (*SPLIT_DEFAULTS, *SPLIT_SOURCES) if getattr(args, name) is not None]
    if new_split:
        raise UsageError(f"{' '.join(new_split)} would make a new split, but {stored[0][1]} fixes it; drop them")
    manifest, name = stored[0]
    if args.train_images_per_user not in (None, manifest.train_images_per_user):
        raise UsageError(f"--train_images_per_user {args.train_images_per_user}, but {name} was trained with "
                         f"{manifest.train_images_per_user or 'every'} train image(s) per user; drop the flag")
    for other, other_name in stored[1:]:
        manifest.require_same_split(other, name, other_name)
    manifest.check_matches(data_dir)
    return manifest


def main(args):
    started = time.perf_counter()
    settings, budgets, num_seeds, gain_seeds, classic, vae_classifiers = resolve_settings(args)
    data_dir = check_data_dir(args.data_dir)
    generated_dir = check_folder(args.generated_dir, "--generated_dir")
    compare_dirs = [check_folder(d, "--compare_dir") for d in args.compare_dir]
    output_dir = output_folder(args.output_dir, args.overwrite)
    device = resolve_device(args.device)
    settings["mixed_precision"] = clf.resolve_precision(settings["mixed_precision"], device)  # the report says which

    record = generator_record(generated_dir)
    generator_manifest, generator_vae = generator_parts(record)
    resolution = record.get("resolved", {}).get("resolution") or first_image_width(generated_dir)
    reference, classifier_manifest, classifier_resolution = None, None, settings["resolution"]
    if args.classifier_path:
        if args.classifier_resolution is not None:
            raise UsageError("--classifier_resolution and --classifier_path: a given classifier works at the resolution "
                             "it was trained at; drop one of them")
        reference, classifier_manifest, classifier_resolution = clf.load_classifier(args.classifier_path)
        reference = reference.to(device)
    manifest = evaluation_manifest(args, data_dir, generator_manifest, classifier_manifest)
    users, num_users = manifest.users, manifest.num_users

    def log(message):
        print(f"[evaluate {time.perf_counter() - started:6.0f}s] {message}", flush=True)

    # Every image is loaded at the generated images' resolution (the VAE's, pixel-space
    # memorisation and the grids work there); the classifiers see the same arrays resized
    # to their own resolution, real and generated alike.
    log(f"loading images at {resolution}x{resolution} (classifiers at {classifier_resolution}x{classifier_resolution})")
    train, val, test = (clf.load_split(data_dir, manifest, s, resolution) for s in ("train", "val", "test"))
    gen_images, gen_labels, gen_paths = clf.load_image_folder(generated_dir, manifest, resolution)

    def for_classifier(images, labels):
        return clf.resize(images, classifier_resolution), labels

    compare = {str(d): for_classifier(*clf.load_image_folder(d, manifest, resolution, "--compare_dir")[:2])
               for d in compare_dirs}
    c_train, c_val, c_test, c_gen = (for_classifier(*pair) for pair in (train, val, test, (gen_images, gen_labels)))

    # The VAE reconstructions: of test for the identity kept, of train and val for the classifiers trained on them.
    vae_path = args.vae_path or generator_vae
    reconstructions = None
    if vae_path:
        from utils.vae import load_vae, reconstruct_uint8

        vae_dtype = inference_dtype(args.dtype, device)
        vae = load_vae(vae_path, torch_dtype=vae_dtype)
        if vae.config.sample_size != resolution:
            raise UsageError(f"the VAE {vae_path} works at {vae.config.sample_size}x{vae.config.sample_size}, the "
                             f"generated images are {resolution}x{resolution}")
        log(f"reconstructing {'train, val and test' if vae_classifiers else 'test'} through the VAE "
            f"({str(vae_dtype).removeprefix('torch.')})")
        recon_test = for_classifier(reconstruct_uint8(vae, test[0], device), test[1])
        if vae_classifiers:
            reconstructions = tuple(for_classifier(reconstruct_uint8(vae, x, device), y) for x, y in (train, val))

    # A budget that every user's train split fits in is the whole split: "all" measures it.
    most = max(manifest.train_counts())
    dropped = [b for b in budgets if b != "all" and int(b) >= most]
    budgets = [b for b in budgets if b not in dropped]
    if dropped:
        log(f"budgets {' '.join(dropped)} hold every train image (at most {most} per user): measured as 'all'")

    # Every classifier of the protocol, keyed by (role, ...): independent jobs trained together. The
    # real-only rows at "all" are the reference classifiers of the identity section too.
    jobs = sections.evaluation_jobs(c_train, c_val, c_gen, budgets, gain_seeds, num_seeds, classic,
                                    settings["max_train_steps"], reconstructions, reference is not None)
    log(f"training {len(jobs)} classifiers at {classifier_resolution}x{classifier_resolution}")
    models = dict(zip(jobs, clf.train_classifiers(list(jobs.values()), users, settings, device)))

    references = [reference] if reference is not None else [models["real", "all", seed] for seed in range(num_seeds)]
    identity = sections.identity_section(references, c_test, c_gen, num_users)
    log(f"identity: real test {pct(identity['real_test']['mean'])}, generated {pct(identity['generated']['mean'])}")
    vae_report, vae_models = None, []
    if vae_path:
        vae_models = [models["vae", seed] for seed in range(num_seeds)] if reconstructions else []
        vae_report = {"vae_path": str(vae_path), "dtype": str(vae_dtype).removeprefix("torch."),
                      **sections.vae_section(references, vae_models, c_test, recon_test, c_gen,
                                             identity["real_test"]["mean"])}
        log(f"vae: {pct(vae_report['identity_kept'])} of the identity survives the VAE" + (
            f"; reconstruction classifiers: reconstructed test {pct(vae_report['reconstructed_test']['mean'])}, "
            f"generated {pct(vae_report['generated']['mean'])}" if vae_models else ""))
    compare_report = sections.compare_section(references, vae_models, c_test, compare)
    tstr = sections.tstr_section([models["tstr", seed] for seed in range(num_seeds)], c_test)
    log(f"tstr: real test {pct(tstr['real_test']['mean'])}")
    generator_counts = generator_manifest.train_counts() if generator_manifest else None
    gain = sections.gain_section(models, c_test, budgets, gain_seeds, generator_counts, num_users)
    for budget, g in gain.items():
        for name, c in g["comparisons"].items():
            log(f"{budget} per user, {name}: {sections.interval_text(c)}: {c['verdict']}")
    distribution = sections.distribution_section(references[0], c_train, c_test, c_gen)
    memo, pairs = sections.memorisation_section(gen_images, train[0], test[0], gen_paths,
                                                [path for path, _ in manifest.samples("train")])
    log(f"distribution: FD {distribution['frechet_distance']:.2f}, memorisation {pct(memo['share'])}")
    train_paths, test_paths = ([path for path, _ in manifest.samples(s)] for s in ("train", "test"))
    leak = leak_check(train, test, train_paths, test_paths)
    log(leak["message"])

    report = {
        "data_dir": str(data_dir), "generated_dir": str(generated_dir), "preset": args.preset,
        "resolution": resolution, "classifier_resolution": classifier_resolution, "num_users": num_users,
        "users": users, "classifier": settings, "classifier_path": args.classifier_path, "budgets": budgets,
        "num_seeds": len(references), "gain_seeds": gain_seeds, "generator": record.get("resolved", {}),
        "classic_augmentation": classic,
        "split": {"seed": manifest.seed, "val_fraction": manifest.val_fraction, "test_fraction": manifest.test_fraction,
                  "train_images_per_user": manifest.train_images_per_user, "description": manifest.describe(),
                  "test_dir": manifest.test_dir or None},
        "leak_check": leak,
        "generator_saw": None if generator_manifest is None else {
            "train_images": len(generator_manifest.files(["train"])),
            "per_user": dict(zip(generator_manifest.users, generator_counts)),
            "files": sorted(generator_manifest.files(["train"]))},
        "verdict": {budget: {"against real only": g["comparisons"]["generated vs real only"]["verdict"],
                             "on top of classic augmentation":
                                 g["comparisons"]["generated on top of classic augmentation"]["verdict"]}
                    for budget, g in gain.items()},
        "counts": {"train": len(train[1]), "val": len(val[1]), "test": len(test[1]), "generated": len(gen_labels)},
        "identity": identity, "vae": vae_report, "compare": compare_report, "tstr": tstr, "gain": gain,
        "distribution": distribution, "memorisation": memo, "seconds": time.perf_counter() - started,
    }
    report["headline"] = sections.headline(report)
    with atomic_folder(output_dir) as partial:
        (partial / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        sections.write_plots(report, partial)
        shown = [to_pil_images(torch.stack([gen_images[i], train[0][j]])) for i, j in pairs]
        labelled_grid(shown, [f"{c['distance']:.1f}" for c in memo["closest"]], cell_size=max(96, resolution)).save(
            partial / "closest_pairs.png")
        pairs_grid(leak, train[0], test[0], cell_size=max(96, resolution)).save(partial / "leak_pairs.png")
        grid_users = users[:: max(1, num_users // 6)][:6]
        rows = [to_pil_images(test[0][test[1] == manifest.label_map[u]][:4]) +
                to_pil_images(gen_images[gen_labels == manifest.label_map[u]][:4]) for u in grid_users]
        labelled_grid(rows, grid_users, cell_size=max(96, resolution)).save(partial / "real_vs_generated.png")
        (partial / "report.md").write_text(sections.render_markdown(report))
        if reference is None:
            clf.save_classifier(references[0], partial / "classifier", manifest,
                                {"resolution": classifier_resolution, "seed": 0, "settings": settings,
                                 "data_dir": str(data_dir), "real_test_accuracy": identity["real_test"]["values"][0]})
    log(f"wrote {output_dir}/report.md: generated {pct(identity['generated']['mean'])} vs real "
        f"{pct(identity['real_test']['mean'])} ({pct(identity['ratio'])} of it)")
    for sentence in report["headline"]:
        print(sentence.replace("**", ""))
    from utils.pipeline import record_evaluation

    model_folders = [Path(p) for p in record.get("model", {}).get("paths", [])][:1]
    if model_folders and record_evaluation(model_folders[0], [*report["headline"], "", f"Report: {output_dir / 'report.md'}"]):
        log(f"model card updated: {model_folders[0] / 'README.md'}")
    return 0


if __name__ == "__main__":
    run(main, parse_args())
