"""One split for every stage: a VAE trained on a non-default split, then the later stages
run without --manifest use that split or stop with exit 2 saying why, never another one."""

import json

import pytest

from conftest import run_cli
from utils.data_loader import DatasetManifest
from utils.gait_simulator import SimulationSettings, write_dataset

CPU = ["--device", "cpu"]
SHORT_EVALUATION = ["--preset", "tiny", "--budgets", "all", "--gain_seeds", 1, "--num_seeds", 1,
                    "--max_train_steps", 2, *CPU]


@pytest.fixture(scope="module")
def odd_split(tmp_path_factory):
    """ROOT/{data, vae, diffusion, generated, classifier}: the models on split seed 3, val 0.2, test 0.3;
    the classifier trained without --manifest, so on the default split."""
    root = tmp_path_factory.mktemp("odd_split")
    write_dataset(root / "data", SimulationSettings(num_users=3, images_per_user=10, resolution=32), progress=False)
    steps = ["--max_train_steps", 1, "--preset", "tiny", *CPU]
    for command in (
        ["training/train_vae.py", "--data_dir", root / "data", "--output_dir", root / "vae", "--split_seed", 3,
         "--val_fraction", 0.2, "--test_fraction", 0.3, "--seed", 1, *steps],
        ["training/train_diffusion.py", "--data_dir", root / "data", "--vae_path", root / "vae/final_model",
         "--output_dir", root / "diffusion", *steps],
        ["inference/generate.py", "--model_path", root / "diffusion/final_model", "--num_images_per_user", 2,
         "--num_inference_steps", 1, "--output_dir", root / "generated", *CPU],
        ["training/train_classifier.py", "--data_dir", root / "data", "--output_dir", root / "classifier",
         "--preset", "tiny", "--max_train_steps", 2, *CPU],
    ):
        result = run_cli(*command)
        assert result.returncode == 0, result.stderr
    assert "a new split of --data_dir (seed 0" in result.stdout  # the classifier says which split it made
    return root


def test_the_models_keep_the_split_they_were_given(odd_split):
    vae = DatasetManifest.load(odd_split / "vae/final_model")
    assert (vae.seed, vae.val_fraction, vae.test_fraction) == (3, 0.2, 0.3)
    assert vae.split_mismatch(DatasetManifest.load(odd_split / "diffusion/final_model")) is None
    assert vae.split_mismatch(DatasetManifest.load(odd_split / "classifier")) is not None


def test_evaluate_without_manifest_uses_the_generators_split(odd_split, tmp_path):
    result = run_cli("inference/evaluate.py", "--data_dir", odd_split / "data", "--generated_dir", odd_split / "generated",
                     "--output_dir", tmp_path / "e", *SHORT_EVALUATION)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "e/report.json").read_text())
    vae = DatasetManifest.load(odd_split / "vae/final_model")
    assert report["split"] == {"seed": 3, "val_fraction": 0.2, "test_fraction": 0.3}
    assert report["counts"]["test"] == len(vae.files(["test"])) == 9  # 3 per user at 0.3
    assert vae.split_mismatch(DatasetManifest.load(tmp_path / "e/classifier")) is None


@pytest.mark.parametrize("case", ["evaluate_classifier", "evaluate_manifest", "evaluate_new_split", "filter",
                                  "diffusion_manifest"])
def test_another_split_stops_with_exit_2(odd_split, tmp_path, case):
    other = odd_split / "classifier"  # the default split
    evaluate = ["inference/evaluate.py", "--data_dir", odd_split / "data", "--generated_dir", odd_split / "generated",
                "--output_dir", tmp_path / "out", *SHORT_EVALUATION]
    command, expected = {
        "evaluate_classifier": (evaluate + ["--classifier_path", other], "disagree on the dataset split"),
        "evaluate_manifest": (evaluate + ["--manifest", other], "disagree on the dataset split"),
        "evaluate_new_split": (evaluate + ["--split_seed", 0], "would make a new split"),
        "filter": (["inference/generate.py", "--model_path", odd_split / "diffusion/final_model", "--filter_classifier",
                    other, "--output_dir", tmp_path / "out", *CPU], "disagree on the dataset split"),
        "diffusion_manifest": (["training/train_diffusion.py", "--data_dir", odd_split / "data", "--vae_path",
                                odd_split / "vae/final_model", "--manifest", other, "--output_dir", tmp_path / "out",
                                "--preset", "tiny", *CPU], "disagree on the dataset split"),
    }[case]
    result = run_cli(*command)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    if "disagree" in expected:
        assert "test images of one are training images of the other" in result.stderr
    assert not (tmp_path / "out").exists()
