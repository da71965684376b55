"""The sections of the evaluation, its plots, and the one Markdown renderer of its report.

Each section is a function of trained classifiers and uint8 image tensors (already at the
classifier's resolution) that returns a plain dict; inference/evaluate.py trains the
classifiers, calls the sections and stores their dicts in report.json; `render_markdown`
turns that report into the Markdown that evaluate.py writes as report.md and that
run_pipeline.py embeds in its own report.
"""

import numpy as np
import torch

from utils import classifier as clf
from utils.distribution import frechet_distance, memorisation, paired_interval, prdc

NEAREST_NEIGHBOURS = 5  # k of precision / recall / density / coverage
MEMORISATION_PERCENTILE = 1.0


def mean_std(values):
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "values": values.tolist()}


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


def gain_jobs(train, val, generated, budgets, gain_seeds):
    """The classifier jobs of the augmentation gain, keyed by (role, budget, seed): per seed
    the same real subset and the same initialisation with and without the generated images."""
    jobs = {}
    for budget in budgets:
        for seed in range(gain_seeds):
            index = budget_subset(train[1], budget, seed)
            subset = (train[0][index], train[1][index])
            mixed = (torch.cat([subset[0], generated[0]]), torch.cat([subset[1], generated[1]]))
            jobs["budget real", budget, seed] = (subset, val, 1000 + seed, f"budget {budget}, real, seed {seed}")
            jobs["budget augmented", budget, seed] = (mixed, val, 1000 + seed, f"budget {budget}, augmented, seed {seed}")
    return jobs


def identity_scores(model, images, labels, num_users):
    logits, _ = clf.predict(model, images)
    predicted = logits.argmax(1)
    confusion = torch.zeros(num_users, num_users, dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    counts = confusion.sum(1)
    per_user = [(confusion[u, u] / counts[u]).item() if counts[u] else float("nan") for u in range(num_users)]
    return {"accuracy": (predicted == labels).float().mean().item(), "per_user": per_user,
            "confusion": confusion.tolist()}


def identity_section(references, test, generated, num_users):
    """Classifiers trained on real train: accuracy on real test and on generated images
    labelled with the user they were generated for (overall, per user, confusion)."""
    scores = [identity_scores(m, *generated, num_users) for m in references]
    real_scores = [identity_scores(m, *test, num_users) for m in references]
    section = {
        "real_test": mean_std([s["accuracy"] for s in real_scores]),
        "generated": mean_std([s["accuracy"] for s in scores]),
        "per_user_real_test": np.nanmean([s["per_user"] for s in real_scores], 0).tolist(),
        "per_user_generated": np.nanmean([s["per_user"] for s in scores], 0).tolist(),
        "confusion_generated_seed0": scores[0]["confusion"],
    }
    real_mean = section["real_test"]["mean"]
    section["ratio"] = section["generated"]["mean"] / real_mean if real_mean > 0 else float("nan")
    return section


def vae_section(references, vae_models, test, reconstructed_test, generated, real_mean):
    """How much identity survives the VAE (the real-train classifiers on reconstructions of
    the test images), and classifiers trained on reconstructions of train: their gap
    between reconstructed test and generated images is what the diffusion model loses."""
    on_reconstructions = mean_std([clf.accuracy(m, *reconstructed_test) for m in references])
    return {
        "real_train_classifiers_on_reconstructed_test": on_reconstructions,
        "identity_kept": on_reconstructions["mean"] / real_mean if real_mean > 0 else float("nan"),
        "real_test": mean_std([clf.accuracy(m, *test) for m in vae_models]),
        "reconstructed_test": mean_std([clf.accuracy(m, *reconstructed_test) for m in vae_models]),
        "generated": mean_std([clf.accuracy(m, *generated) for m in vae_models]),
    }


def tstr_section(generated_only_models, test):
    """Train on synthetic, test on real."""
    return {"real_test": mean_std([clf.accuracy(m, *test) for m in generated_only_models])}


def gain_section(models, test, budgets, gain_seeds):
    """Real test accuracy with and without the generated images, per budget, and the
    paired difference with its 95% t interval. `models` as keyed by `gain_jobs`."""
    gain = {}
    for budget in budgets:
        real = [clf.accuracy(models["budget real", budget, seed], *test) for seed in range(gain_seeds)]
        augmented = [clf.accuracy(models["budget augmented", budget, seed], *test) for seed in range(gain_seeds)]
        gain[budget] = {"real": real, "augmented": augmented,
                        "difference": paired_interval(np.subtract(augmented, real))}
    return gain


def distribution_section(reference, train, test, generated):
    """Frechet distance and PRDC in the reference classifier's feature space, beside the
    real-train-vs-real-test distance (the floor for sets this size)."""
    _, train_features = clf.predict(reference, train[0])
    _, test_features = clf.predict(reference, test[0])
    _, generated_features = clf.predict(reference, generated[0])
    return {"k": NEAREST_NEIGHBOURS, "frechet_distance": frechet_distance(test_features, generated_features),
            "frechet_distance_real_train_vs_test": frechet_distance(train_features, test_features),
            **prdc(test_features, generated_features, k=NEAREST_NEIGHBOURS)}


def compare_section(references, vae_models, test, compare):
    """The identity numbers and Frechet distance of other generated folders {name: (images, labels)},
    with the very same classifiers."""
    _, test_features = clf.predict(references[0], test[0])
    return {name: {
        "identity": mean_std([clf.accuracy(m, images, labels) for m in references]),
        "vae": mean_std([clf.accuracy(m, images, labels) for m in vae_models]) if vae_models else None,
        "frechet_distance": frechet_distance(test_features, clf.predict(references[0], images)[1]),
    } for name, (images, labels) in compare.items()}


def memorisation_section(generated_images, train_images, test_images, generated_paths, train_paths, shown=8):
    """Share of generated images closer (pixel L2) to a training image than all but
    MEMORISATION_PERCENTILE % of real test images are, and the closest pairs. Returns
    (section, [(generated index, train index)] of the pairs shown)."""
    flat = lambda x: clf.to_model_input(x).flatten(1)  # noqa: E731
    copies = memorisation(flat(generated_images), flat(train_images), flat(test_images),
                          percentile=MEMORISATION_PERCENTILE)
    closest = copies["distances"].argsort()[:shown].tolist()
    pairs = [(i, int(copies["nearest_train"][i])) for i in closest]
    section = {"percentile": MEMORISATION_PERCENTILE, "threshold": copies["threshold"], "share": copies["share"],
               "closest": [{"generated": generated_paths[i], "train": train_paths[j],
                            "distance": copies["distances"][i].item()} for i, j in pairs]}
    return section, pairs


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


def write_plots(report, folder):
    """The report's plots, as render_markdown links them."""
    import matplotlib

    matplotlib.use("Agg")
    identity = report["identity"]
    plot_confusion(identity["confusion_generated_seed0"], report["users"], folder / "confusion.png")
    plot_per_user(report["users"], identity["per_user_real_test"], identity["per_user_generated"],
                  folder / "per_user_accuracy.png")
    plot_gain(report["gain"], folder / "augmentation_gain.png")


def pct(value):
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{100 * value:.1f}%"


def spread(stats):
    return f"{pct(stats['mean'])} ± {100 * stats['std']:.1f}"


def render_markdown(report, level=1, image_prefix=""):
    """The report as Markdown: a title at heading `level`, its sections one level below,
    pictures linked as `image_prefix` + file name (the plots and grids evaluate.py writes)."""
    r, title, section = report, "#" * level, "#" * (level + 1)

    def picture(name, caption):
        return f"![{caption}]({image_prefix}{name})"

    identity, v = r["identity"], r.get("vae")
    lines = [
        f"{title} Evaluation of generated spectrograms", "",
        f"Dataset `{r['data_dir']}`: {r['num_users']} users; real test split {r['counts']['test']} images, "
        f"train {r['counts']['train']}, val {r['counts']['val']}. Generated `{r['generated_dir']}`: "
        f"{r['counts']['generated']} images at {r['resolution']}x{r['resolution']}, seen by the classifiers at "
        f"{r['classifier_resolution']}x{r['classifier_resolution']}. Preset `{r['preset']}`; "
        f"mean ± standard deviation over classifier seeds. {r['seconds']:.0f} s.", "",
        f"{section} Identity: does a generated image show the user it was made for?", "",
        "| classifier trained on | seeds | its accuracy on real test | on VAE reconstructions of test | on generated |",
        "|---|---|---|---|---|",
        f"| real train | {len(identity['real_test']['values'])} | {spread(identity['real_test'])} | "
        f"{spread(v['real_train_classifiers_on_reconstructed_test']) if v else '–'} | {spread(identity['generated'])} |",
    ]
    if v:
        lines.append(f"| VAE reconstructions of train | {len(v['generated']['values'])} | {spread(v['real_test'])} | "
                     f"{spread(v['reconstructed_test'])} | {spread(v['generated'])} |")
    lines += ["", f"Generated accuracy relative to real test accuracy: **{pct(identity['ratio'])}** "
              "(reference classifiers). With the VAE classifier the gap between reconstructed test and generated "
              "is what the diffusion model loses; the gap between real and reconstructed is the VAE's share.", ""]
    if v:
        lines += [f"Identity kept through the VAE: **{pct(v['identity_kept'])}** of the identity survives the VAE "
                  "(the real-train classifiers' accuracy on VAE reconstructions of the test images, relative to "
                  "their accuracy on the images themselves).", ""]
    if r["compare"]:
        lines += ["| generated folder | on generated (real-train classifiers) | on generated (VAE classifiers) | "
                  "Frechet distance |", "|---|---|---|---|"]
        rows = [(r["generated_dir"], {"identity": identity["generated"], "vae": v["generated"] if v else None,
                                      "frechet_distance": r["distribution"]["frechet_distance"]})]
        for name, c in rows + list(r["compare"].items()):
            lines.append(f"| `{name}` | {spread(c['identity'])} | {spread(c['vae']) if c.get('vae') else '–'} | "
                         f"{c['frechet_distance']:.2f} |")
        lines.append("")
    lines += [picture("per_user_accuracy.png", "per-user accuracy"), "", picture("confusion.png", "confusion matrix"), ""]
    lines += [f"{section} Train on generated, test on real (TSTR)", "",
              f"Classifiers trained on the generated images only: {spread(r['tstr']['real_test'])} on real test "
              f"(real-train classifiers: {spread(identity['real_test'])}).", ""]
    lines += [f"{section} Augmentation gain", "",
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
    dist, mem = r["distribution"], r["memorisation"]
    lines += ["", picture("augmentation_gain.png", "augmentation gain"), "",
              f"{section} Distribution", "",
              f"In the reference classifier's feature space (k = {dist['k']}): Frechet distance generated vs real test "
              f"**{dist['frechet_distance']:.2f}** (real train vs real test, the floor for sets this size: "
              f"{dist['frechet_distance_real_train_vs_test']:.2f}); precision {dist['precision']:.3f}, recall "
              f"{dist['recall']:.3f}, density {dist['density']:.3f}, coverage {dist['coverage']:.3f}.", "",
              f"Memorisation (pixel space): **{pct(mem['share'])}** of generated images are closer to a training "
              f"image than {mem['percentile']:g}% of real test images are (L2 threshold {mem['threshold']:.2f}). "
              "Closest pairs, generated left, nearest training image right:", "",
              picture("closest_pairs.png", "closest pairs"), "", f"{section} Real vs generated", "",
              "Each row: real test images, then generated images of the same user.", "",
              picture("real_vs_generated.png", "real vs generated"), ""]
    return "\n".join(lines)
