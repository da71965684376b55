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


# The augmentation protocol's rows: every seed trains each on the same real images from
# the same initialisation, so their differences are paired.
ROWS = ("real", "real + classic", "real + generated", "real + classic + generated")
COMPARISONS = {  # name -> (row, the row it is compared with)
    "generated vs real only": ("real + generated", "real"),
    "generated on top of classic augmentation": ("real + classic + generated", "real + classic"),
    "generated vs classic augmentation": ("real + generated", "real + classic"),
    "classic augmentation vs real only": ("real + classic", "real"),
}


def steps_for(images, all_images, max_train_steps):
    """Classifier steps for a training set of `images` real images when the whole train split
    (`all_images`) gets `max_train_steps`: in proportion, at least a quarter of them. Every
    row of a budget trains as long, however many generated images it adds."""
    return max(max_train_steps // 4, round(max_train_steps * images / all_images))


def protocol_jobs(train, val, generated, budgets, seeds, classic, max_train_steps):
    """The classifier jobs of the augmentation protocol, keyed (row, budget, seed): per seed
    the same real subset, initialisation and steps in every row; "classic" rows train with
    the classic augmentation `classic`, "generated" rows with every generated image added."""
    jobs = {}
    for budget in budgets:
        for seed in range(seeds):
            index = budget_subset(train[1], budget, seed)
            real = (train[0][index], train[1][index])
            mixed = (torch.cat([real[0], generated[0]]), torch.cat([real[1], generated[1]]))
            steps = steps_for(len(index), len(train[1]), max_train_steps)
            for row in ROWS:
                jobs[row, budget, seed] = clf.Job(mixed if "generated" in row else real, val, seed,
                                                  f"{row}, {budget} per user, seed {seed}",
                                                  classic if "classic" in row else None, steps)
    return jobs


def evaluation_jobs(train, val, generated, budgets, gain_seeds, num_seeds, classic, max_train_steps,
                    reconstructions=None, reference_given=False):
    """Every classifier the evaluation trains, keyed by role: the protocol's rows (whose
    real-only rows at 'all' are also the reference classifiers, unless one is given), the
    classifiers on VAE reconstructions (`reconstructions` = (train, val) pairs, when given) and
    those on generated images only."""
    jobs = protocol_jobs(train, val, generated, budgets, gain_seeds, classic, max_train_steps)
    for seed in range(num_seeds):
        if not reference_given:
            jobs.setdefault(("real", "all", seed), clf.Job(train, val, seed, f"real, all per user, seed {seed}"))
        if reconstructions is not None:
            jobs["vae", seed] = clf.Job(*reconstructions, seed, f"VAE-reconstruction classifier, seed {seed}")
        jobs["tstr", seed] = clf.Job(generated, val, seed, f"generated-only classifier, seed {seed}", None,
                                     steps_for(len(generated[1]), len(train[1]), max_train_steps))
    return jobs


def verdict(interval):
    """The word for a paired 95% interval: never a positive one for an interval that contains 0."""
    if not np.isfinite(interval["ci_low"]):
        return "not measured (one seed)"
    if interval["ci_low"] > 0:
        return "helps"
    if interval["ci_high"] < 0:
        return "hurts"
    return "no measurable effect"


def generator_label(budget, generator_train_counts):
    """What the generator saw, against the real images a budget's classifiers train on."""
    if generator_train_counts is None:
        return {"generator_saw_more": None, "label": "the generator's training data is unknown"}
    most = max(generator_train_counts)
    saw = f"{most}" if min(generator_train_counts) == most else f"up to {most}"
    if budget == "all" or int(budget) >= most:
        return {"generator_saw_more": False, "label": f"the generator saw the same real images: {saw} per user"}
    return {"generator_saw_more": True,
            "label": f"generator saw more real data: {saw} train images per user, not {budget}"}


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
        "real_test_balanced": mean_std([np.nanmean(s["per_user"]) for s in real_scores]),
        "generated_balanced": mean_std([np.nanmean(s["per_user"]) for s in scores]),
        "per_user_real_test": np.nanmean([s["per_user"] for s in real_scores], 0).tolist(),
        "per_user_generated": np.nanmean([s["per_user"] for s in scores], 0).tolist(),
        "confusion_generated_seed0": scores[0]["confusion"],
    }
    real_mean = section["real_test"]["mean"]
    section["ratio"] = section["generated"]["mean"] / real_mean if real_mean > 0 else float("nan")
    return section


def vae_section(references, vae_models, test, reconstructed_test, generated, real_mean):
    """How much identity survives the VAE (the real-train classifiers on reconstructions of
    the test images), and, when `vae_models` are given, classifiers trained on reconstructions
    of train: their gap between reconstructed test and generated images is what the
    diffusion model loses."""
    on_reconstructions = mean_std([clf.accuracy(m, *reconstructed_test) for m in references])
    kept = {"real_train_classifiers_on_reconstructed_test": on_reconstructions,
            "identity_kept": on_reconstructions["mean"] / real_mean if real_mean > 0 else float("nan")}
    if not vae_models:
        return kept
    return {
        **kept,
        "real_test": mean_std([clf.accuracy(m, *test) for m in vae_models]),
        "reconstructed_test": mean_std([clf.accuracy(m, *reconstructed_test) for m in vae_models]),
        "generated": mean_std([clf.accuracy(m, *generated) for m in vae_models]),
    }


def tstr_section(generated_only_models, test):
    """Train on synthetic, test on real."""
    return {"real_test": mean_std([clf.accuracy(m, *test) for m in generated_only_models])}


def gain_section(models, test, budgets, seeds, generator_train_counts, num_users):
    """Real test accuracy of every protocol row per budget and seed (`models` keyed as by
    `protocol_jobs`), each comparison's paired difference with its 95% t interval and
    verdict, the budget's label, and at "all" the per-user accuracy of real vs real + generated."""
    gain = {}
    for budget in budgets:
        scores = {row: [clf.accuracies(models[row, budget, seed], *test) for seed in range(seeds)] for row in ROWS}
        rows = {row: [a for a, _ in values] for row, values in scores.items()}
        comparisons = {}
        for name, (row, baseline) in COMPARISONS.items():
            interval = paired_interval(np.subtract(rows[row], rows[baseline]))
            comparisons[name] = {**interval, "verdict": verdict(interval)}
        gain[budget] = {"rows": rows, "balanced_rows": {row: [b for _, b in values] for row, values in scores.items()},
                        "comparisons": comparisons, **generator_label(budget, generator_train_counts)}
        if budget == "all":
            gain[budget]["per_user"] = {row: np.nanmean([identity_scores(models[row, budget, seed], *test, num_users)[
                "per_user"] for seed in range(seeds)], 0).tolist() for row in ("real", "real + generated")}
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
    """Left: real test accuracy of every row per budget; right: each comparison's paired
    difference with its 95% interval."""
    import matplotlib.pyplot as plt

    budgets = list(gain)
    x = np.arange(len(budgets))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for offset, row in zip(np.linspace(-0.15, 0.15, len(ROWS)), ROWS):
        values = [gain[b]["rows"][row] for b in budgets]
        stds = [np.std(v, ddof=1) if len(v) > 1 else 0 for v in values]
        axes[0].errorbar(x + offset, [np.mean(v) for v in values], yerr=stds, marker="o", capsize=3, ls="", label=row)
    axes[0].set_ylabel("real test accuracy")
    axes[0].legend(fontsize=7)
    for offset, name in zip(np.linspace(-0.15, 0.15, len(COMPARISONS)), COMPARISONS):
        d = [gain[b]["comparisons"][name] for b in budgets]
        means = [100 * c["mean"] for c in d]  # points of accuracy
        errors = [np.nan_to_num([100 * (c["mean"] - c["ci_low"]) for c in d]),
                  np.nan_to_num([100 * (c["ci_high"] - c["mean"]) for c in d])]
        axes[1].errorbar(x + offset, means, yerr=errors, marker="o", capsize=3, ls="", label=name)
    axes[1].axhline(0, color="gray", lw=0.8)
    axes[1].set_ylabel("difference (points, 95% CI)")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(x, budgets)
        ax.set_xlabel("real images per user")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gain_colours(real, augmented):
    """Per user: green where real + generated beats real only, red where it loses, grey where they
    tie (equal test-image counts can differ in the last float32 bits of their means)."""
    same = np.isclose(augmented, real, rtol=0, atol=1e-6)
    return ["C7" if tie else "C2" if a > r else "C3" for r, a, tie in zip(real, augmented, same)]


def plot_gain_per_user(users, per_user, path):
    """Per user at "all": real test accuracy of real-only and real + generated classifiers."""
    import matplotlib.pyplot as plt

    x = np.arange(len(users))
    real, augmented = np.asarray(per_user["real"]), np.asarray(per_user["real + generated"])
    fig, ax = plt.subplots(figsize=(max(6, len(users) * 0.3), 3.5))
    ax.bar(x - 0.2, real, 0.4, label="real only")
    ax.bar(x + 0.2, augmented, 0.4, label="real + generated", color=gain_colours(real, augmented))
    ax.set_xticks(x, users, rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("real test accuracy (mean over seeds)")
    ax.set_title("all real train images: green = the generated images help this user, red = they hurt", fontsize=9)
    ax.legend(fontsize=8)
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
    if "all" in report["gain"]:
        plot_gain_per_user(report["users"], report["gain"]["all"]["per_user"], folder / "gain_per_user.png")


def pct(value):
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{100 * value:.1f}%"


def spread(stats):
    return f"{pct(stats['mean'])} ± {100 * stats['std']:.1f}"


def interval_text(c):
    return f"{100 * c['mean']:+.1f} points, 95% CI [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}], {c['n']} paired seeds"


def headline(report):
    """One sentence per budget, the users' case ("all") first: what adding the generated
    images does to real test accuracy, against real only and on top of classic augmentation."""
    sentences = []
    if report.get("leak_check", {}).get("flagged"):
        sentences.append(f"**{report['leak_check']['message']}.** Every number below is inflated by it.")
    for budget, g in report["gain"].items():
        if budget == "all":
            per_user = report["counts"]["train"] / report["num_users"]
            who = f"With all their real train images ({per_user:.0f} per user, the users' case)"
        else:
            who = f"With {budget} real images per user ({g['label']})"
        real, classic = (g["comparisons"][name] for name in ("generated vs real only",
                                                             "generated on top of classic augmentation"))
        sentences.append(f"{who}, adding the {report['counts']['generated']} generated images: **{real['verdict']}** "
                         f"against real only ({interval_text(real)}); **{classic['verdict']}** on top of classic "
                         f"augmentation ({interval_text(classic)}).")
    return sentences


def render_markdown(report, level=1, image_prefix=""):
    """The report as Markdown: a title at heading `level`, the verdict first, the sections
    one level below, pictures linked as `image_prefix` + file name (the plots and grids
    evaluate.py writes)."""
    r, title, section = report, "#" * level, "#" * (level + 1)

    def picture(name, caption):
        return f"![{caption}]({image_prefix}{name})"

    identity, v = r["identity"], r.get("vae")
    classic = ", ".join(f"{k} {value}" for k, value in r["classic_augmentation"].items())
    lines = [f"{title} Evaluation of generated spectrograms", "", *r["headline"], "",
             f"Dataset `{r['data_dir']}`: {r['num_users']} users; real test split {r['counts']['test']} images, "
             f"train {r['counts']['train']}, val {r['counts']['val']}. Generated `{r['generated_dir']}`: "
             f"{r['counts']['generated']} images at {r['resolution']}x{r['resolution']}"
             + (f" (each from a real train image of its user, noised to strength {r['generator']['strength']})"
                if r.get("generator", {}).get("strength", 1.0) < 1 else "") + ", seen by the classifiers at "
             f"{r['classifier_resolution']}x{r['classifier_resolution']}. Preset `{r['preset']}`; "
             f"mean ± standard deviation over classifier seeds. {r['seconds']:.0f} s.", "",
             *([f"Split {r['split']['description']}. {r['leak_check']['message']} "
                f"Closest pairs, test left and nearest train right: [leak_pairs.png]({image_prefix}leak_pairs.png).", ""]
               if r.get("leak_check") else []),
             f"{section} Does adding generated images help the classifier?", "",
             "Person-ID classifiers trained from scratch on a budget of real train images per user (`all`: the whole "
             "train split, the users' case), in four rows: real only, with classic spectrogram augmentation, with "
             "every generated image added, and both. Every row trains with random circular time shifts (part of the "
             f"reference recipe); classic augmentation adds {classic}. Per seed, every row starts from the same "
             "initialisation with the same real images, so the differences are paired; the verdict comes from their "
             "95% t interval and says *no measurable effect* whenever it contains 0.", "",
             "| real images per user | what the generator saw | " + " | ".join(ROWS) + " |",
             "|---|---|" + "---|" * len(ROWS)]
    for budget, g in r["gain"].items():
        lines.append(f"| {budget} | {g['label']} | " + " | ".join(spread(mean_std(g["rows"][row])) for row in ROWS) + " |")
    if all("balanced_rows" in g for g in r["gain"].values()):
        lines += ["", "Balanced accuracy (the mean of per-user accuracies: every user counts the same, however many "
                  "test images they have):", "", "| real images per user | " + " | ".join(ROWS) + " |",
                  "|---|" + "---|" * len(ROWS)]
        lines += [f"| {budget} | " + " | ".join(spread(mean_std(g["balanced_rows"][row])) for row in ROWS) + " |"
                  for budget, g in r["gain"].items()]
    lines += ["", "| real images per user | comparison | difference | 95% CI | verdict |", "|---|---|---|---|---|"]
    for budget, g in r["gain"].items():
        for name, c in g["comparisons"].items():
            lines.append(f"| {budget} | {name} | {100 * c['mean']:+.1f} points | [{100 * c['ci_low']:+.1f}, "
                         f"{100 * c['ci_high']:+.1f}] | {c['verdict']} |")
    lines += ["", picture("augmentation_gain.png", "augmentation gain"), ""]
    if "all" in r["gain"]:
        lines += ["Per user, with all real train images: whom the generated images help and whom they hurt.", "",
                  picture("gain_per_user.png", "per-user gain"), ""]
    lines += [
        f"{section} Identity: does a generated image show the user it was made for?", "",
        "| classifier trained on | seeds | its accuracy on real test | on VAE reconstructions of test | on generated |",
        "|---|---|---|---|---|",
        f"| real train | {len(identity['real_test']['values'])} | {spread(identity['real_test'])} | "
        f"{spread(v['real_train_classifiers_on_reconstructed_test']) if v else '–'} | {spread(identity['generated'])} |",
    ]
    trained_on_reconstructions = bool(v) and "generated" in v  # reports without --vae_classifiers lack them
    if trained_on_reconstructions:
        lines.append(f"| VAE reconstructions of train | {len(v['generated']['values'])} | {spread(v['real_test'])} | "
                     f"{spread(v['reconstructed_test'])} | {spread(v['generated'])} |")
    if "real_test_balanced" in identity:
        lines += ["", f"Balanced accuracy of the real-train classifiers: real test {spread(identity['real_test_balanced'])}, "
                  f"generated {spread(identity['generated_balanced'])}."]
    lines += ["", f"Generated accuracy relative to real test accuracy: **{pct(identity['ratio'])}** "
              "(reference classifiers)." + (" With the VAE classifier the gap between reconstructed test and "
                                            "generated is what the diffusion model loses; the gap between real and "
                                            "reconstructed is the VAE's share." if trained_on_reconstructions else ""), ""]
    if v:
        lines += [f"Identity kept through the VAE: **{pct(v['identity_kept'])}** of the identity survives the VAE "
                  "(the real-train classifiers' accuracy on VAE reconstructions of the test images, relative to "
                  "their accuracy on the images themselves).", ""]
    if r["compare"]:
        lines += ["| generated folder | on generated (real-train classifiers) | on generated (VAE classifiers) | "
                  "Frechet distance |", "|---|---|---|---|"]
        rows = [(r["generated_dir"], {"identity": identity["generated"], "vae": v.get("generated") if v else None,
                                      "frechet_distance": r["distribution"]["frechet_distance"]})]
        for name, c in rows + list(r["compare"].items()):
            lines.append(f"| `{name}` | {spread(c['identity'])} | {spread(c['vae']) if c.get('vae') else '–'} | "
                         f"{c['frechet_distance']:.2f} |")
        lines.append("")
    lines += [picture("per_user_accuracy.png", "per-user accuracy"), "", picture("confusion.png", "confusion matrix"), ""]
    lines += [f"{section} Train on generated, test on real (TSTR)", "",
              f"Classifiers trained on the generated images only: {spread(r['tstr']['real_test'])} on real test "
              f"(real-train classifiers: {spread(identity['real_test'])}).", ""]
    dist, mem = r["distribution"], r["memorisation"]
    lines += [f"{section} Distribution", "",
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
