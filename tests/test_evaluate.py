"""train_classifier.py, evaluate.py and classifier-filtered generation, as users run them, on tiny models."""

import json
import math

import pytest
import torch
from PIL import Image

from conftest import run_cli
from utils import classifier as clf
from utils.classifier import load_classifier, resize
from utils.presets import CLASSIC_AUGMENTATION, PRESETS

CPU = ["--device", "cpu"]


@pytest.fixture(scope="module")
def generated(tiny_generator, tmp_path_factory):
    """3 images of each of the 3 tiny users, sampled in 2 steps."""
    out = tmp_path_factory.mktemp("generated") / "g"
    result = run_cli("inference/generate.py", "--model_path", tiny_generator / "diffusion/final_model",
                     "--num_images_per_user", 3, "--num_inference_steps", 2, "--output_dir", out, *CPU)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def evaluation(tiny_generator, generated, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation") / "e"
    result = run_cli("inference/evaluate.py", "--data_dir", tiny_generator / "data", "--generated_dir", generated,
                     "--output_dir", out, "--preset", "tiny", "--compare_dir", generated, *CPU)
    assert result.returncode == 0, result.stderr
    return out


def test_resize_keeps_flat_colours_and_skips_the_same_size():
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    images[0, 0], images[1, 2] = 200, 17
    small = resize(images, 4)
    assert small.shape == (2, 3, 4, 4) and small.dtype == torch.uint8
    assert (small[0, 0] == 200).all() and (small[1, 2] == 17).all() and small[0, 1:].sum() == 0
    assert resize(images, 8) is images and resize(images[:0], 4).shape == (0, 3, 4, 4)


def test_classifiers_trained_side_by_side_come_back_in_order():
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    settings = {**PRESETS["tiny"]["classifier"], "max_train_steps": 30, "learning_rate": 1e-2}
    # Each job sees one user only, so its model answers that user; unequal steps, so the pool's
    # longest-first order differs from the order asked for.
    jobs = [clf.Job((images, torch.full((8,), label)), (images[:2], torch.full((2,), label)), 0, f"all {label}",
                    None, steps) for label, steps in ((2, 20), (0, 30), (1, 25))]
    models = clf.train_classifiers(jobs, ["a", "b", "c"], settings, processes=2)
    assert [clf.predict(m, images)[0].argmax(1).unique().tolist() for m in models] == [[2], [0], [1]]


def test_train_classifier_writes_a_reloadable_folder(tiny_generator, tmp_path):
    out = tmp_path / "classifier"
    result = run_cli("training/train_classifier.py", "--data_dir", tiny_generator / "data", "--output_dir", out,
                     "--preset", "tiny", "--manifest", tiny_generator / "diffusion/final_model", "--seed", 3, *CPU)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout
    model, manifest, resolution = load_classifier(out)
    assert manifest.users == ["ID_1", "ID_2", "ID_3"] and resolution == 16  # the tiny preset's
    assert model.config["users"] == ["ID_1", "ID_2", "ID_3"]
    info = json.loads((out / "training.json").read_text())
    assert info["counts"] == {"train": 21, "val": 3, "test": 6} and 0 <= info["test_accuracy"] <= 1
    again = run_cli("training/train_classifier.py", "--data_dir", tiny_generator / "data", "--output_dir", out, *CPU)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_without_vae_classifiers_only_the_identity_kept_is_measured(tiny_generator, generated, evaluation, tmp_path):
    """--no-vae_classifiers (the quick preset's choice): the same report less the classifiers
    trained on reconstructions, whose training is the one thing left out."""
    result = run_cli("inference/evaluate.py", "--data_dir", tiny_generator / "data", "--generated_dir", generated,
                     "--output_dir", tmp_path / "e", "--preset", "tiny", "--no-vae_classifiers", *CPU)
    assert result.returncode == 0, result.stderr
    assert "reconstructing test through the VAE" in result.stdout
    trained = [line.split("training ")[1].split()[0] for line in result.stdout.splitlines() if "] training " in line]
    assert trained == ["17"]  # 4 rows x 2 budgets x 2 seeds + 1 generated-only; the full evaluation adds 1 on VAE
    report = json.loads((tmp_path / "e/report.json").read_text())
    full = json.loads((evaluation / "report.json").read_text())
    assert set(report["vae"]) == {"vae_path", "dtype", "real_train_classifiers_on_reconstructed_test", "identity_kept"}
    assert report["vae"]["identity_kept"] == full["vae"]["identity_kept"]  # the same classifiers and reconstructions
    assert report["gain"]["all"]["rows"] == full["gain"]["all"]["rows"]
    markdown = (tmp_path / "e/report.md").read_text()
    assert "Identity kept through the VAE" in markdown and "VAE reconstructions of train" not in markdown
    assert "VAE reconstructions of train" in (evaluation / "report.md").read_text()


def test_a_classifier_saved_before_the_pool_moved_ahead_of_batchnorm_still_loads(tiny_generator, tmp_path):
    from utils.data_loader import DatasetManifest

    manifest = DatasetManifest.load(tiny_generator / "diffusion/final_model/dataset_manifest.json")
    torch.manual_seed(0)
    old = clf.build_classifier(manifest.users, (8, 16), (2, 1), pool_before_norm=False)
    assert [type(m).__name__ for m in old.features][:7] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d",
                                                           "ReLU", "MaxPool2d"]
    new = clf.build_classifier(manifest.users, (8, 16), (2, 1))
    assert [type(m).__name__ for m in new.features][:7] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "MaxPool2d",
                                                           "BatchNorm2d", "ReLU"]
    old.config.pop("pool_before_norm")  # config.json as it was written then
    clf.save_classifier(old, tmp_path / "c", manifest, {"resolution": 16})
    loaded, _, _ = load_classifier(tmp_path / "c")
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(clf.predict(loaded, images)[0], clf.predict(old, images)[0])


def test_report_has_every_section_and_plot(evaluation, generated, tiny_generator):
    report = json.loads((evaluation / "report.json").read_text())
    card = (tiny_generator / "diffusion/final_model/README.md").read_text()  # the model card has the headline
    assert report["headline"][0] in card and "Not evaluated yet" not in card
    for key in ("identity", "vae", "compare", "tstr", "gain", "distribution", "memorisation"):
        assert key in report, key
    assert report["counts"] == {"train": 21, "val": 3, "test": 6, "generated": 9}
    # Images are read at the generator's 32x32; the tiny classifiers work at 16x16.
    assert report["resolution"] == 32 and report["classifier_resolution"] == 16
    assert load_classifier(evaluation / "classifier")[2] == 16
    assert len(report["identity"]["per_user_generated"]) == 3 and len(report["identity"]["confusion_generated_seed0"]) == 3
    assert sum(map(sum, report["identity"]["confusion_generated_seed0"])) == 9
    assert list(report["gain"]) == ["all", "2"]  # the users' case first
    for budget, gain in report["gain"].items():
        assert set(gain["rows"]) == {"real", "real + classic", "real + generated", "real + classic + generated"}
        assert all(len(accuracies) == 2 for accuracies in gain["rows"].values())
        assert all(len(b) == 2 and all(0 <= v <= 1 for v in b) for b in gain["balanced_rows"].values())
        assert all(c["n"] == 2 and c["verdict"] in ("helps", "hurts", "no measurable effect")
                   for c in gain["comparisons"].values())
        assert report["verdict"][budget]["against real only"] == gain["comparisons"]["generated vs real only"]["verdict"]
    assert report["gain"]["all"]["generator_saw_more"] is False and report["gain"]["2"]["generator_saw_more"] is True
    assert report["generator_saw"]["per_user"] == {"ID_1": 7, "ID_2": 7, "ID_3": 7}
    assert len(report["gain"]["all"]["per_user"]["real + generated"]) == 3
    assert report["classic_augmentation"] == CLASSIC_AUGMENTATION
    assert set(report["distribution"]) >= {"frechet_distance", "precision", "recall", "density", "coverage"}
    assert 0 <= report["memorisation"]["share"] <= 1
    assert report["leak_check"]["test_images"] == 6 and report["split"]["description"].startswith("at random by image")
    assert 0 <= report["identity"]["real_test_balanced"]["mean"] <= 1
    vae = report["vae"]  # the generator's VAE, found through the generated folder's manifest
    real, kept = report["identity"]["real_test"]["mean"], vae["real_train_classifiers_on_reconstructed_test"]["mean"]
    assert vae["identity_kept"] == kept / real if real > 0 else math.isnan(vae["identity_kept"])
    assert PRESETS["tiny"]["evaluation"]["vae_classifiers"] and len(vae["generated"]["values"]) == 1
    # --compare_dir with the evaluated folder itself: the same classifiers give the same accuracy.
    assert report["compare"][str(generated)]["identity"]["mean"] == report["identity"]["generated"]["mean"]
    markdown = (evaluation / "report.md").read_text()
    assert markdown.splitlines()[2].startswith("With all their real train images (7 per user, the users' case)")
    assert "generator saw more real data" in markdown.splitlines()[3]
    assert "leak check: " in markdown and "Balanced accuracy" in markdown
    for plot in ("confusion.png", "per_user_accuracy.png", "augmentation_gain.png", "gain_per_user.png",
                 "closest_pairs.png", "real_vs_generated.png", "leak_pairs.png"):
        assert f"({plot})" in markdown
        assert Image.open(evaluation / plot).size[0] > 50
    load_classifier(evaluation / "classifier")


def test_a_given_classifier_is_reused(tiny_generator, generated, evaluation, tmp_path):
    out = tmp_path / "again"
    result = run_cli("inference/evaluate.py", "--data_dir", tiny_generator / "data", "--generated_dir", generated,
                     "--output_dir", out, "--preset", "tiny", "--classifier_path", evaluation / "classifier",
                     "--budgets", "all", "--gain_seeds", 1, *CPU)
    assert result.returncode == 0, result.stderr
    first, second = (json.loads((d / "report.json").read_text()) for d in (evaluation, out))
    assert second["num_seeds"] == 1 and not (out / "classifier").exists()
    assert second["identity"]["generated"]["values"][0] == first["identity"]["generated"]["values"][0]


def test_classifier_resolution_flag_overrides_the_preset(tiny_generator, generated, tmp_path):
    out = tmp_path / "at24"
    result = run_cli("inference/evaluate.py", "--data_dir", tiny_generator / "data", "--generated_dir", generated,
                     "--output_dir", out, "--preset", "tiny", "--classifier_resolution", 24, "--budgets", 2,
                     "--gain_seeds", 1, *CPU)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "report.json").read_text())["classifier_resolution"] == 24
    assert load_classifier(out / "classifier")[2] == 24


def test_classifier_filter_keeps_only_confident_images(tiny_generator, evaluation, tmp_path):
    model = tiny_generator / "diffusion/final_model"
    common = ["inference/generate.py", "--model_path", model, "--num_images_per_user", 2, "--num_inference_steps", 2,
              "--filter_classifier", evaluation / "classifier", *CPU]
    result = run_cli(*common, "--min_confidence", 0.4, "--max_tries_per_image", 3, "--output_dir", tmp_path / "f")
    assert result.returncode == 0, result.stderr
    assert "acceptance per user" in result.stdout
    manifest = json.loads((tmp_path / "f/manifest.json").read_text())
    for user, numbers in manifest["filter"].items():
        kept = [r for r in manifest["images"] if r["user"] == user]
        assert len(kept) == numbers["kept"] <= 2 and numbers["tried"] <= 6
        assert all(r["confidence"] >= 0.4 for r in kept)
        assert numbers["kept"] == 2 or numbers["tried"] == 6
    everything = run_cli(*common, "--min_confidence", 0, "--output_dir", tmp_path / "all")
    assert everything.returncode == 0, everything.stderr
    rates = json.loads((tmp_path / "all/manifest.json").read_text())["filter"]
    assert all(r == {"kept": 2, "tried": 2, "acceptance_rate": 1.0} for r in rates.values())
    impossible = run_cli(*common, "--min_confidence", 1, "--max_tries_per_image", 1, "--output_dir", tmp_path / "none")
    assert impossible.returncode == 0 and "fewer images than asked" in impossible.stderr


@pytest.mark.parametrize("case", ["unknown_user", "empty", "budget", "not_empty", "filter_users", "resolution"])
def test_bad_input_exits_2(tiny_generator, generated, evaluation, tmp_path, case):
    out = tmp_path / "report"
    generated_dir, extra, expected = generated, [], ""
    if case == "unknown_user":
        generated_dir = tmp_path / "strange"
        Image.new("RGB", (32, 32)).save((generated_dir / "ID_9").mkdir(parents=True) or generated_dir / "ID_9/a.png")
        expected = "does not know: ID_9"
    elif case == "empty":
        generated_dir = tmp_path / "empty"
        (generated_dir / "ID_1").mkdir(parents=True)
        expected = "holds no images"
    elif case == "budget":
        extra, expected = ["--budgets", "0"], "--budgets"
    elif case == "resolution":
        extra = ["--classifier_path", evaluation / "classifier", "--classifier_resolution", 24]
        expected = "--classifier_resolution and --classifier_path"
    elif case == "not_empty":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
        expected = "not empty"
    if case == "filter_users":
        other = tmp_path / "other_data"
        for user in ("ID_1", "ID_2"):
            Image.new("RGB", (32, 32)).save((other / user).mkdir(parents=True) or other / user / "a.png")
        result = run_cli("inference/generate.py", "--model_path", tiny_generator / "diffusion/final_model",
                         "--filter_classifier", evaluation / "classifier", "--output_dir", out, *CPU,
                         "--num_inference_steps", 1)
        assert result.returncode == 0, result.stderr  # same users: accepted
        result = run_cli("training/train_classifier.py", "--data_dir", other, "--output_dir", tmp_path / "c2",
                         "--preset", "tiny", *CPU)
        assert result.returncode == 0, result.stderr
        result = run_cli("inference/generate.py", "--model_path", tiny_generator / "diffusion/final_model",
                         "--filter_classifier", tmp_path / "c2", "--output_dir", tmp_path / "g2", *CPU)
        assert result.returncode == 2 and "other users" in result.stderr and not (tmp_path / "g2").exists()
        return
    result = run_cli("inference/evaluate.py", "--data_dir", tiny_generator / "data", "--generated_dir", generated_dir,
                     "--output_dir", out, "--preset", "tiny", *extra, *CPU)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    if case == "not_empty":
        assert [p.name for p in out.iterdir()] == ["mine.txt"]
    else:
        assert not out.exists()


def test_classifier_recipe_benchmark_reports_accuracy_and_time(tiny_generator, tmp_path):
    result = run_cli("benchmarks/classifier_recipe.py", "--data_dir", tiny_generator / "data", "--preset", "tiny",
                     "--max_train_steps", 4, "--seeds", 2, "--classic", "time_masks=1", "mixup_probability=0.3", *CPU,
                     "--out", tmp_path / "recipe.json")
    assert result.returncode == 0, result.stderr
    numbers = json.loads((tmp_path / "recipe.json").read_text())
    assert [r["seed"] for r in numbers["runs"]] == [0, 1] and numbers["settings"]["max_train_steps"] == 4
    assert 0 <= numbers["mean_test_accuracy"] <= 1 and 0 <= numbers["mean_val_accuracy"] <= 1
    assert numbers["classic_augmentation"] == {**CLASSIC_AUGMENTATION, "time_masks": 1, "mixup_probability": 0.3}
    assert "val" in result.stdout and "real test" in result.stdout
    bad = run_cli("benchmarks/classifier_recipe.py", "--data_dir", tiny_generator / "data", "--classic", "masks=2", *CPU)
    assert bad.returncode == 2 and "KEY one of" in bad.stderr and "Traceback" not in bad.stderr


def test_oracle_benchmark_scores_new_real_images_against_real_only(tiny_generator, tmp_path):
    result = run_cli("benchmarks/oracle_gain.py", "--data_dir", tiny_generator / "data", "--preset", "tiny",
                     "--images_per_user", 2, "--seeds", 2, *CPU, "--out", tmp_path / "oracle.json")
    assert result.returncode == 0, result.stderr
    numbers = json.loads((tmp_path / "oracle.json").read_text())
    gain = numbers["gain"]["2 new real images per user"]
    assert gain["counts"] == 6 and gain["n"] == 2 and gain["verdict"] in ("helps", "hurts", "no measurable effect")
    assert len(numbers["accuracy"]["real"]) == 2 and "real + 2 new real images per user" in result.stdout


def test_oracle_images_are_the_simulators_next_images_of_each_user(tiny_generator, tmp_path):
    import numpy as np

    from benchmarks.oracle_gain import write_new_images
    from utils.gait_simulator import read_settings, simulate_image

    settings = read_settings(tiny_generator / "data")  # the card reproduces the dataset's own images
    first, _ = simulate_image(settings, 2, 0)
    assert np.array_equal(np.asarray(first), np.asarray(Image.open(tiny_generator / "data/ID_2/ID_2_0000.png")))
    write_new_images(settings, ["ID_1", "ID_2", "ID_3"], 2, tmp_path / "new")
    assert sorted(p.name for p in (tmp_path / "new/ID_2").iterdir()) == ["ID_2_0010.png", "ID_2_0011.png"]
    new = np.asarray(Image.open(tmp_path / "new/ID_2/ID_2_0010.png"))
    assert np.array_equal(new, np.asarray(simulate_image(settings, 2, 10)[0]))
    assert not any(np.array_equal(new, np.asarray(Image.open(f))) for f in (tiny_generator / "data/ID_2").iterdir()
                   if f.suffix == ".png")


def test_oracle_benchmark_needs_a_simulated_dataset(mixed_dataset):
    result = run_cli("benchmarks/oracle_gain.py", "--data_dir", mixed_dataset, "--preset", "tiny", *CPU)
    assert result.returncode == 2 and "simulated dataset only" in result.stderr and "Traceback" not in result.stderr
