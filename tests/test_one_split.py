"""One split for every stage: a VAE trained on a non-default split and a budget of train
images per user; the later stages run without --manifest use that split, or stop with
exit 2 saying why, never another one; the evaluation says what the generator saw."""

import json

import pytest
from safetensors.torch import load_file

from conftest import run_cli
from utils.data_loader import DatasetManifest, build_manifest
from utils.gait_simulator import SimulationSettings, write_dataset

CPU = ["--device", "cpu"]
SHORT_EVALUATION = ["--preset", "tiny", "--gain_seeds", 2, "--num_seeds", 1, "--max_train_steps", 2, *CPU]


@pytest.fixture(scope="module")
def odd_split(tmp_path_factory):
    """ROOT/{data, vae, diffusion, generated, classifier, evaluation}: the models on split seed 3, val 0.2,
    test 0.3 and 3 train images per user; the classifier trained without --manifest, so on the default split."""
    root = tmp_path_factory.mktemp("odd_split")
    write_dataset(root / "data", SimulationSettings(num_users=3, images_per_user=10, resolution=32), progress=False)
    steps = ["--max_train_steps", 1, "--preset", "tiny", "--batch_size", 3, *CPU]
    for command in (
        ["training/train_vae.py", "--data_dir", root / "data", "--output_dir", root / "vae", "--split_seed", 3,
         "--val_fraction", 0.2, "--test_fraction", 0.3, "--train_images_per_user", 3, "--seed", 1, *steps],
        ["training/train_diffusion.py", "--data_dir", root / "data", "--vae_path", root / "vae/final_model",
         "--output_dir", root / "diffusion", *steps],
        ["inference/generate.py", "--model_path", root / "diffusion/final_model", "--num_images_per_user", 2,
         "--num_inference_steps", 1, "--output_dir", root / "generated", *CPU],
        ["training/train_classifier.py", "--data_dir", root / "data", "--output_dir", root / "classifier",
         "--preset", "tiny", "--max_train_steps", 2, *CPU],
        ["inference/evaluate.py", "--data_dir", root / "data", "--generated_dir", root / "generated",
         "--output_dir", root / "evaluation", "--budgets", "all", 2, 5, *SHORT_EVALUATION],
    ):
        result = run_cli(*command)
        assert result.returncode == 0, result.stderr
        if "train_classifier" in str(command[0]):  # the classifier says which split it made
            assert "a new split of --data_dir at random by image, split seed 0" in result.stdout
    return root


def test_every_model_keeps_the_split_and_budget_it_was_given(odd_split):
    vae = DatasetManifest.load(odd_split / "vae/final_model")
    full = build_manifest(odd_split / "data", 0.2, 0.3, seed=3)
    assert (vae.seed, vae.val_fraction, vae.test_fraction, vae.train_counts()) == (3, 0.2, 0.3, [3, 3, 3])
    assert vae.splits["val"] == full.splits["val"] and vae.splits["test"] == full.splits["test"]
    for model in ("diffusion/final_model", "evaluation/classifier"):
        assert vae.split_mismatch(DatasetManifest.load(odd_split / model)) is None, model
    assert len(load_file(odd_split / "diffusion/latent_cache/train.safetensors")["user_index"]) == 9
    assert vae.split_mismatch(DatasetManifest.load(odd_split / "classifier")) is not None


def test_evaluate_without_manifest_uses_the_generators_split_and_says_what_it_saw(odd_split):
    report = json.loads((odd_split / "evaluation/report.json").read_text())
    assert report["split"] == {"seed": 3, "val_fraction": 0.2, "test_fraction": 0.3, "train_images_per_user": 3,
                               "description": "at random by image, split seed 3: val 0.2, test 0.3", "test_dir": None}
    assert report["counts"]["train"] == 9 and report["counts"]["test"] == 9  # 3 per user at 0.3
    assert report["generator_saw"]["per_user"] == {"ID_1": 3, "ID_2": 3, "ID_3": 3}
    assert list(report["gain"]) == ["all", "2"]  # 5 per user is every train image here: measured as "all"
    assert report["gain"]["all"]["label"] == "the generator saw the same real images: 3 per user"
    assert report["gain"]["2"]["label"] == "generator saw more real data: 3 train images per user, not 2"
    headline = (odd_split / "evaluation/report.md").read_text().splitlines()[2]
    assert headline.startswith("With all their real train images (3 per user, the users' case)")


@pytest.mark.parametrize("case", ["evaluate_classifier", "evaluate_manifest", "evaluate_new_split", "evaluate_budget",
                                  "filter", "diffusion_manifest"])
def test_another_split_stops_with_exit_2(odd_split, tmp_path, case):
    other = odd_split / "classifier"  # the default split, every train image
    evaluate = ["inference/evaluate.py", "--data_dir", odd_split / "data", "--generated_dir", odd_split / "generated",
                "--output_dir", tmp_path / "out", *SHORT_EVALUATION]
    command, expected = {
        "evaluate_classifier": (evaluate + ["--classifier_path", other], "disagree on the dataset split"),
        "evaluate_manifest": (evaluate + ["--manifest", other], "disagree on the dataset split"),
        "evaluate_new_split": (evaluate + ["--split_seed", 0], "would make a new split"),
        "evaluate_budget": (evaluate + ["--train_images_per_user", 5], "was trained with 3 train image(s) per user"),
        "filter": (["inference/generate.py", "--model_path", odd_split / "diffusion/final_model", "--filter_classifier",
                    other, "--output_dir", tmp_path / "out", *CPU], "disagree on the dataset split"),
        "diffusion_manifest": (["training/train_diffusion.py", "--data_dir", odd_split / "data", "--vae_path",
                                odd_split / "vae/final_model", "--manifest", other, "--output_dir", tmp_path / "out",
                                "--preset", "tiny", *CPU], "one keeps 3 train images per user, the other every"),
    }[case]
    result = run_cli(*command)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
