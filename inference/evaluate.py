"""Does the augmentation carry identity, and does it help? (DESIGN.md, evaluation protocol)

    python inference/evaluate.py --data_dir data/simulated --generated_dir outputs/generated \\
        --output_dir outputs/evaluation --preset quick [--classifier_path C] [--compare_dir G2 ...]

Every number is measured on the real test split of the dataset manifest the generator
was trained with (read from the generated folder's manifest.json; the test split was
never seen by any model). Person-ID classifiers (utils/classifier.py) are trained here
from scratch, sized by --preset:

  identity    classifiers trained on real train (--num_seeds seeds, or the one given by
              --classifier_path): accuracy on real test, and on generated images labelled
              with the user they were generated for (overall, per user, confusion matrix);
  vae         the same trained on VAE reconstructions of the train split: its accuracy on
              reconstructed test images vs on generated images separates what the VAE
              loses (texture) from what the diffusion model loses (identity);
  tstr        trained on generated images only, tested on real test;
  gain        real train vs real train + all generated images, at --budgets real images per
              user, paired by seed over --gain_seeds seeds, with a 95% t interval;
  distribution  Frechet distance and precision/recall/density/coverage (k=5) in the
              reference classifier's feature space; memorisation in pixel space.

The classifiers are independent: on a CPU they train side by side, one single-thread
process per core (utils.classifier.train_classifiers).

Writes OUTPUT/report.json, OUTPUT/report.md with PNG plots, and OUTPUT/classifier/ (the
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

import numpy as np
import torch

from utils import classifier as clf
from utils.cli import UsageError, resolve_device, run
from utils.data_loader import MANIFEST_NAME, DatasetManifest, build_manifest, check_data_dir, is_image_file
from utils.distribution import frechet_distance, memorisation, paired_interval, prdc
from utils.files import atomic_folder, output_folder
from utils.image_grid import labelled_grid
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
    p.add_argument("--manifest", help="dataset_manifest.json to take the split from (default: the generator's)")
    p.add_argument("--preset", choices=PRESET_NAMES, default="quick", help="sizes the classifiers and the protocol")
    p.add_argument("--budgets", nargs="+", help="real images per user for the gain, integers or 'all' (preset)")
    p.add_argument("--num_seeds", type=int, help="classifier seeds for identity, vae and tstr (preset)")
    p.add_argument("--gain_seeds", type=int, help="paired seeds for the augmentation gain (preset)")
    p.add_argument("--max_train_steps", type=int, help="classifier training steps (preset)")
    p.add_argument("--classifier_resolution", type=int, help="side the classifiers see, images resized to it (preset)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="the VAE's weights for the reconstructions: auto = bf16 where the device computes it natively "
                        "(2x faster on such a CPU; quick VAE test PSNR 22.1581 dB vs 22.1582 in fp32), else fp32")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    return p.parse_args(argv)


def resolve_settings(args):
    settings = dict(PRESETS[args.preset]["classifier"])
    evaluation = PRESETS[args.preset]["evaluation"]
    for name, flag in (("max_train_steps", "max_train_steps"), ("resolution", "classifier_resolution")):
        if getattr(args, flag) is not None:
            settings[name] = getattr(args, flag)
    budgets = args.budgets or [str(b) for b in evaluation["budgets"]]
    for budget in budgets:
        if budget != "all" and not (budget.isdigit() and int(budget) >= 1):
            raise UsageError(f"--budgets takes positive integers or 'all', got {budget!r}")
    num_seeds = args.num_seeds if args.num_seeds is not None else evaluation["num_seeds"]
    gain_seeds = args.gain_seeds if args.gain_seeds is not None else evaluation["gain_seeds"]
    if num_seeds < 1 or gain_seeds < 1 or settings["max_train_steps"] < 1:
        raise UsageError("--num_seeds, --gain_seeds and --max_train_steps must be at least 1")
    if settings["resolution"] < 8:
        raise UsageError(f"--classifier_resolution must be at least 8, got {settings['resolution']}")
    return settings, budgets, num_seeds, gain_seeds


def generator_record(generated_dir):
    """generate.py's manifest.json of a folder, or {} for a folder made some other way."""
    path = Path(generated_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def generator_parts(record):
    """(dataset manifest path, VAE folder) of the model that made the images, when known."""
    paths = [Path(p) for p in record.get("model", {}).get("paths", [])]
    if not paths:
        return None, None
    first = paths[0]  # --model_path: the final_model folder; three-path form: the VAE folder
    manifest = first / MANIFEST_NAME if (first / MANIFEST_NAME).is_file() else None
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


def budget_subset(labels, budget, seed):
    """Indices of `budget` images per user (all when 'all'), drawn with a seed-fixed order."""
    if budget == "all":
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for user in labels.unique():
        index = (labels == user).nonzero().flatten()
        chosen.append(index[torch.randperm(len(index), generator=generator)[:int(budget)]])
    return torch.cat(chosen).sort().values


def identity_scores(model, images, labels, num_users):
    logits, _ = clf.predict(model, images)
    predicted = logits.argmax(1)
    confusion = torch.zeros(num_users, num_users, dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    counts = confusion.sum(1)
    per_user = [(confusion[u, u] / counts[u]).item() if counts[u] else float("nan") for u in range(num_users)]
    return {"accuracy": (predicted == labels).float().mean().item(), "per_user": per_user,
            "confusion": confusion.tolist()}


def mean_std(values):
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "values": values.tolist()}


def to_pil_images(images_uint8):
    from PIL import Image

    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images_uint8]


def plot_confusion(confusion, users, path):
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion, dtype=np.float64)
    rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    size = max(5, len(users) * 0.28)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    shown = ax.imshow(rows, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(users)), users, rotation=90, fontsize=7)
    ax.set_yticks(range(len(users)), users, fontsize=7)
    ax.set_xlabel("predicted user")
    ax.set_ylabel("user the image was generated for")
    ax.set_title("Generated images: reference classifier (seed 0), rows normalised")
    fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_user(users, real, generated, path):
    import matplotlib.pyplot as plt

    x = np.arange(len(users))
    fig, ax = plt.subplots(figsize=(max(6, len(users) * 0.3), 3.5))
    ax.bar(x - 0.2, real, 0.4, label="real test")
    ax.bar(x + 0.2, generated, 0.4, label="generated")
    ax.set_xticks(x, users, rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (mean over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gain(gain, path):
    import matplotlib.pyplot as plt

    budgets = list(gain)
    x = np.arange(len(budgets))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, label in (("real", "real only"), ("augmented", "real + generated")):
        means = [np.mean(gain[b][key]) for b in budgets]
        stds = [np.std(gain[b][key], ddof=1) if len(gain[b][key]) > 1 else 0 for b in budgets]
        axes[0].errorbar(x, means, yerr=stds, marker="o", capsize=3, label=label)
    axes[0].set_ylabel("real test accuracy")
    axes[0].legend()
    means = [100 * gain[b]["difference"]["mean"] for b in budgets]  # points of accuracy
    low = [100 * (gain[b]["difference"]["mean"] - gain[b]["difference"]["ci_low"]) for b in budgets]
    high = [100 * (gain[b]["difference"]["ci_high"] - gain[b]["difference"]["mean"]) for b in budgets]
    axes[1].errorbar(x, means, yerr=[np.nan_to_num(low), np.nan_to_num(high)], marker="o", capsize=3, color="C2")
    axes[1].axhline(0, color="gray", lw=0.8)
    axes[1].set_ylabel("gain (points of accuracy, 95% CI)")
    for ax in axes:
        ax.set_xticks(x, budgets)
        ax.set_xlabel("real images per user")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pct(value):
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{100 * value:.1f}%"


def spread(stats):
    return f"{pct(stats['mean'])} ± {100 * stats['std']:.1f}"


def write_markdown(report, path):
    r = report
    lines = [
        "# Evaluation of generated spectrograms", "",
        f"Dataset `{r['data_dir']}`: {r['num_users']} users; real test split {r['counts']['test']} images, "
        f"train {r['counts']['train']}, val {r['counts']['val']}. Generated `{r['generated_dir']}`: "
        f"{r['counts']['generated']} images at {r['resolution']}x{r['resolution']}, seen by the classifiers at "
        f"{r['classifier_resolution']}x{r['classifier_resolution']}. Preset `{r['preset']}`; "
        f"mean ± standard deviation over classifier seeds. {r['seconds']:.0f} s.", "",
        "## Identity: does a generated image show the user it was made for?", "",
        "| classifier trained on | seeds | its accuracy on real test | on VAE reconstructions of test | on generated |",
        "|---|---|---|---|---|",
    ]
    identity = r["identity"]
    v = r.get("vae")
    on_reconstructions = spread(v["real_train_classifiers_on_reconstructed_test"]) if v else "–"
    lines.append(f"| real train | {len(identity['real_test']['values'])} | {spread(identity['real_test'])} | "
                 f"{on_reconstructions} | {spread(identity['generated'])} |")
    if v:
        lines.append(f"| VAE reconstructions of train | {len(v['generated']['values'])} | {spread(v['real_test'])} | "
                     f"{spread(v['reconstructed_test'])} | {spread(v['generated'])} |")
    lines += ["", f"Generated accuracy relative to real test accuracy: **{pct(identity['ratio'])}** "
              "(reference classifiers). With the VAE classifier the gap between reconstructed test and generated "
              "is what the diffusion model loses; the gap between real and reconstructed is the VAE's share.", ""]
    if v:
        lines += [f"Identity kept through the VAE: the real-train classifiers keep **{pct(v['identity_kept'])}** "
                  "of their real-test accuracy on VAE reconstructions of the test images.", ""]
    if r["compare"]:
        lines += ["| generated folder | on generated (real-train classifiers) | on generated (VAE classifiers) | "
                  "Frechet distance |", "|---|---|---|---|"]
        for name, c in [(r["generated_dir"], {"identity": identity["generated"], "vae": (r.get("vae") or {}).get(
                "generated"), "frechet_distance": r["distribution"]["frechet_distance"]})] + list(r["compare"].items()):
            vae_cell = spread(c["vae"]) if c.get("vae") else "–"
            lines.append(f"| `{name}` | {spread(c['identity'])} | {vae_cell} | {c['frechet_distance']:.2f} |")
        lines.append("")
    lines += ["![per-user accuracy](per_user_accuracy.png)", "", "![confusion matrix](confusion.png)", ""]
    t = r["tstr"]
    lines += ["## Train on generated, test on real (TSTR)", "",
              f"Classifiers trained on the generated images only: {spread(t['real_test'])} on real test "
              f"(real-train classifiers: {spread(identity['real_test'])}).", ""]
    lines += ["## Augmentation gain", "",
              "Classifiers trained on a budget of real train images per user, alone and with every generated image "
              "added; the same seed draws the same real images and the same initialisation for both, so the gain is "
              "paired. The generator itself was trained on the whole train split: below that budget its images also "
              "carry what it learned from real images the budget classifier never saw, so this measures what the "
              "generated images add for a classifier, not what a generator trained on the budget alone would give.", "",
              "| real images per user | real only | real + generated | gain (points) | 95% CI | seeds |",
              "|---|---|---|---|---|---|"]
    for budget, g in r["gain"].items():
        d = g["difference"]
        lines.append(f"| {budget} | {pct(np.mean(g['real']))} | {pct(np.mean(g['augmented']))} | "
                     f"{100 * d['mean']:+.1f} | [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}] | {d['n']} |")
    lines += ["", "![augmentation gain](augmentation_gain.png)", ""]
    dist, mem = r["distribution"], r["memorisation"]
    lines += ["## Distribution", "",
              f"In the reference classifier's feature space (k = {dist['k']}): Frechet distance generated vs real test "
              f"**{dist['frechet_distance']:.2f}** (real train vs real test, the floor for sets this size: "
              f"{dist['frechet_distance_real_train_vs_test']:.2f}); precision {dist['precision']:.3f}, recall "
              f"{dist['recall']:.3f}, density {dist['density']:.3f}, coverage {dist['coverage']:.3f}.", "",
              f"Memorisation (pixel space): **{pct(mem['share'])}** of generated images are closer to a training "
              f"image than {mem['percentile']:g}% of real test images are (L2 threshold {mem['threshold']:.2f}). "
              "Closest pairs, generated left, nearest training image right:", "",
              "![closest pairs](closest_pairs.png)", "", "## Real vs generated", "",
              "Each row: real test images, then generated images of the same user.", "",
              "![real vs generated](real_vs_generated.png)", ""]
    path.write_text("\n".join(lines))


def main(args):
    started = time.perf_counter()
    settings, budgets, num_seeds, gain_seeds = resolve_settings(args)
    data_dir = check_data_dir(args.data_dir)
    generated_dir = check_folder(args.generated_dir, "--generated_dir")
    compare_dirs = [check_folder(d, "--compare_dir") for d in args.compare_dir]
    output_dir = output_folder(args.output_dir, args.overwrite)
    device = resolve_device(args.device)

    record = generator_record(generated_dir)
    generator_manifest, generator_vae = generator_parts(record)
    resolution = record.get("resolved", {}).get("resolution") or first_image_width(generated_dir)
    reference = None
    if args.classifier_path:
        if args.classifier_resolution is not None:
            raise UsageError("--classifier_resolution and --classifier_path: a given classifier works at the resolution "
                             "it was trained at; drop one of them")
        model, manifest, classifier_resolution = clf.load_classifier(args.classifier_path)
        reference = model.to(device)
    else:
        manifest_path = args.manifest or generator_manifest
        manifest = DatasetManifest.load(manifest_path) if manifest_path else build_manifest(data_dir)
        classifier_resolution = settings["resolution"]
    manifest.check_users_match(data_dir)
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

    # The VAE reconstructions, for the classifiers trained on them.
    vae_path = args.vae_path or generator_vae
    if vae_path:
        from utils.vae import load_vae, reconstruct_uint8

        vae_dtype = inference_dtype(args.dtype, device)
        vae = load_vae(vae_path, torch_dtype=vae_dtype)
        if vae.config.sample_size != resolution:
            raise UsageError(f"the VAE {vae_path} works at {vae.config.sample_size}x{vae.config.sample_size}, the "
                             f"generated images are {resolution}x{resolution}")
        log(f"reconstructing train, val and test through the VAE ({str(vae_dtype).removeprefix('torch.')})")
        recon_train, recon_val, recon_test = (for_classifier(reconstruct_uint8(vae, x, device), y)
                                              for x, y in (train, val, test))

    # Every classifier of the protocol, keyed by (role, ...): independent jobs trained together.
    jobs = {}
    for seed in range(num_seeds):
        if reference is None:
            jobs["real", seed] = (c_train, c_val, seed, f"real-train classifier, seed {seed}")
        if vae_path:
            jobs["vae", seed] = (recon_train, recon_val, seed, f"VAE-reconstruction classifier, seed {seed}")
        jobs["tstr", seed] = (c_gen, c_val, seed, f"generated-only classifier, seed {seed}")
    for budget in budgets:
        for seed in range(gain_seeds):  # paired: the same real subset and the same initialisation
            index = budget_subset(c_train[1], budget, seed)
            subset = (c_train[0][index], c_train[1][index])
            mixed = (torch.cat([subset[0], c_gen[0]]), torch.cat([subset[1], c_gen[1]]))
            jobs["budget real", budget, seed] = (subset, c_val, 1000 + seed, f"budget {budget}, real, seed {seed}")
            jobs["budget augmented", budget, seed] = (mixed, c_val, 1000 + seed,
                                                      f"budget {budget}, augmented, seed {seed}")
    log(f"training {len(jobs)} classifiers at {classifier_resolution}x{classifier_resolution}")
    models = dict(zip(jobs, clf.train_classifiers(list(jobs.values()), users, settings, device)))

    # Identity with classifiers trained on real train.
    references = [reference] if reference is not None else [models["real", seed] for seed in range(num_seeds)]
    scores = [identity_scores(m, *c_gen, num_users) for m in references]
    real_scores = [identity_scores(m, *c_test, num_users) for m in references]
    identity = {
        "real_test": mean_std([s["accuracy"] for s in real_scores]),
        "generated": mean_std([s["accuracy"] for s in scores]),
        "per_user_real_test": np.nanmean([s["per_user"] for s in real_scores], 0).tolist(),
        "per_user_generated": np.nanmean([s["per_user"] for s in scores], 0).tolist(),
        "confusion_generated_seed0": scores[0]["confusion"],
    }
    real_mean = identity["real_test"]["mean"]
    identity["ratio"] = identity["generated"]["mean"] / real_mean if real_mean > 0 else float("nan")
    log(f"identity: real test {pct(identity['real_test']['mean'])}, generated {pct(identity['generated']['mean'])}")

    # The same with classifiers trained on VAE reconstructions.
    vae_report, vae_models = None, []
    if vae_path:
        vae_models = [models["vae", seed] for seed in range(num_seeds)]
        # The stage-1 question: do the real-train classifiers still recognise people in
        # reconstructions of the test images? (the share of their accuracy kept)
        on_reconstructions = mean_std([clf.accuracy(m, *recon_test) for m in references])
        vae_report = {
            "vae_path": str(vae_path), "dtype": str(vae_dtype).removeprefix("torch."),
            "real_train_classifiers_on_reconstructed_test": on_reconstructions,
            "identity_kept": on_reconstructions["mean"] / real_mean if real_mean > 0 else float("nan"),
            "real_test": mean_std([clf.accuracy(m, *c_test) for m in vae_models]),
            "reconstructed_test": mean_std([clf.accuracy(m, *recon_test) for m in vae_models]),
            "generated": mean_std([clf.accuracy(m, *c_gen) for m in vae_models]),
        }
        log(f"vae: real-train classifiers on reconstructed test {pct(on_reconstructions['mean'])} "
            f"({pct(vae_report['identity_kept'])} of real test); reconstruction classifiers: reconstructed test "
            f"{pct(vae_report['reconstructed_test']['mean'])}, generated {pct(vae_report['generated']['mean'])}")

    # Features of the first reference classifier: the space the distances are measured in.
    _, test_features = clf.predict(references[0], c_test[0])
    compare_report = {}
    for name, (images, labels) in compare.items():
        compare_report[name] = {
            "identity": mean_std([clf.accuracy(m, images, labels) for m in references]),
            "vae": mean_std([clf.accuracy(m, images, labels) for m in vae_models]) if vae_models else None,
            "frechet_distance": frechet_distance(test_features, clf.predict(references[0], images)[1]),
        }
        log(f"compare {name}: generated {pct(compare_report[name]['identity']['mean'])}")

    # Train on synthetic, test on real.
    tstr = {"real_test": mean_std([clf.accuracy(models["tstr", seed], *c_test) for seed in range(num_seeds)])}
    log(f"tstr: real test {pct(tstr['real_test']['mean'])}")

    # Augmentation gain, paired by seed.
    gain = {}
    for budget in budgets:
        real_acc = [clf.accuracy(models["budget real", budget, seed], *c_test) for seed in range(gain_seeds)]
        augmented_acc = [clf.accuracy(models["budget augmented", budget, seed], *c_test) for seed in range(gain_seeds)]
        gain[budget] = {"real": real_acc, "augmented": augmented_acc,
                        "difference": paired_interval(np.subtract(augmented_acc, real_acc))}
        d = gain[budget]["difference"]
        log(f"gain at {budget} per user: {100 * d['mean']:+.1f} points, 95% CI [{100 * d['ci_low']:+.1f}, "
            f"{100 * d['ci_high']:+.1f}]")

    # Distribution in the reference classifier's feature space; memorisation in pixels.
    _, train_features = clf.predict(references[0], c_train[0])
    _, gen_features = clf.predict(references[0], c_gen[0])
    distribution = {"k": 5, "frechet_distance": frechet_distance(test_features, gen_features),
                    "frechet_distance_real_train_vs_test": frechet_distance(train_features, test_features),
                    **prdc(test_features, gen_features, k=5)}
    flat = lambda x: clf.to_model_input(x).flatten(1)  # noqa: E731
    copies = memorisation(flat(gen_images), flat(train[0]), flat(test[0]), percentile=1.0)
    closest = copies["distances"].argsort()[:8]
    memo = {"percentile": 1.0, "threshold": copies["threshold"], "share": copies["share"],
            "closest": [{"generated": gen_paths[i], "train": manifest.samples("train")[copies["nearest_train"][i]][0],
                         "distance": copies["distances"][i].item()} for i in closest.tolist()]}
    log(f"distribution: FD {distribution['frechet_distance']:.2f}, memorisation {pct(memo['share'])}")

    report = {
        "data_dir": str(data_dir), "generated_dir": str(generated_dir), "preset": args.preset,
        "resolution": resolution, "classifier_resolution": classifier_resolution, "num_users": num_users,
        "users": users, "classifier": settings,
        "classifier_path": args.classifier_path, "budgets": budgets, "num_seeds": len(references),
        "gain_seeds": gain_seeds, "generator": record.get("resolved", {}),
        "counts": {"train": len(train[1]), "val": len(val[1]), "test": len(test[1]), "generated": len(gen_labels)},
        "identity": identity, "vae": vae_report, "compare": compare_report, "tstr": tstr, "gain": gain,
        "distribution": distribution, "memorisation": memo, "seconds": time.perf_counter() - started,
    }
    with atomic_folder(output_dir) as partial:
        (partial / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        plot_confusion(identity["confusion_generated_seed0"], users, partial / "confusion.png")
        plot_per_user(users, identity["per_user_real_test"], identity["per_user_generated"],
                      partial / "per_user_accuracy.png")
        plot_gain(gain, partial / "augmentation_gain.png")
        pairs = [to_pil_images(torch.stack([gen_images[i], train[0][copies["nearest_train"][i]]])) for i in closest]
        labelled_grid(pairs, [f"{c['distance']:.1f}" for c in memo["closest"]], cell_size=max(96, resolution)).save(
            partial / "closest_pairs.png")
        shown = users[:: max(1, num_users // 6)][:6]
        rows = [to_pil_images(test[0][test[1] == manifest.label_map[u]][:4]) +
                to_pil_images(gen_images[gen_labels == manifest.label_map[u]][:4]) for u in shown]
        labelled_grid(rows, shown, cell_size=max(96, resolution)).save(partial / "real_vs_generated.png")
        write_markdown(report, partial / "report.md")
        if reference is None:
            clf.save_classifier(references[0], partial / "classifier", manifest,
                                {"resolution": classifier_resolution, "seed": 0, "settings": settings,
                                 "data_dir": str(data_dir),
                                 "real_test_accuracy": real_scores[0]["accuracy"]})
    log(f"wrote {output_dir}/report.md: generated {pct(identity['generated']['mean'])} vs real "
        f"{pct(identity['real_test']['mean'])} ({pct(identity['ratio'])} of it)")
    return 0


if __name__ == "__main__":
    run(main, parse_args())
