"""check_vae.py, install_lpips.py and train_celeba_standard.py as users run them."""

import json

import pytest
import torch
import torchvision

from conftest import run_cli
from utils.gait_simulator import SimulationSettings, write_dataset


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    write_dataset(root / "data", SimulationSettings(num_users=3, images_per_user=10, resolution=32), progress=False)
    result = run_cli("training/train_vae.py", "--data_dir", root / "data", "--output_dir", root / "vae",
                     "--preset", "tiny", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return root


def test_check_vae_exit_codes_and_report(trained_vae, tmp_path):
    vae_path = trained_vae / "vae" / "final_model"
    passed = run_cli("check_vae.py", "--vae_path", vae_path, "--min_psnr", 0, "--output_dir", tmp_path / "check")
    assert passed.returncode == 0, passed.stderr
    assert "PSNR" in passed.stdout and "verdict" in passed.stdout and "matches" in passed.stdout
    assert "2x bicubic round trip" in passed.stdout
    report = json.loads((tmp_path / "check" / "vae_check.json").read_text())
    assert report["split"] == "test" and report["num_images"] == 6  # 3 users x 2 test images
    assert set(report["psnr"]["per_user"]) == {"ID_1", "ID_2", "ID_3"}
    assert (tmp_path / "check" / "vae_check.png").exists()
    failed = run_cli("check_vae.py", "--vae_path", vae_path, "--min_psnr", 99, "--output_dir", tmp_path / "check")
    assert failed.returncode == 1
    assert "较差 / poor" in failed.stdout


@pytest.mark.parametrize("case", ["missing", "not_a_vae", "missing_data"])
def test_check_vae_bad_input(trained_vae, tmp_path, case):
    vae_path = trained_vae / "vae" / "final_model"
    extra = []
    if case == "missing":
        vae_path = tmp_path / "nothing"
    elif case == "not_a_vae":
        vae_path = trained_vae / "vae"  # the run folder, whose config.json is the training config
    else:
        extra = ["--data_dir", tmp_path / "no_data"]
    result = run_cli("check_vae.py", "--vae_path", vae_path, *extra, "--output_dir", tmp_path / "check")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr


def test_install_lpips_places_offline_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    check = run_cli("install_lpips.py", "--check")
    assert check.returncode == 1 and "missing" in check.stdout
    backbone = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), backbone)  # random weights: the file format is what matters
    placed = run_cli("install_lpips.py", "--weights", backbone)
    assert placed.returncode == 0, placed.stderr + placed.stdout
    assert (tmp_path / "torch_home/hub/checkpoints/alexnet-owt-7be5be79.pth").exists()
    assert "d(x, x) = 0.0000" in placed.stdout
    assert run_cli("install_lpips.py", "--check").returncode == 0
    torch.save({"something": torch.zeros(1)}, tmp_path / "wrong.pth")
    wrong = run_cli("install_lpips.py", "--weights", tmp_path / "wrong.pth")
    assert wrong.returncode == 2 and "not a torchvision alex backbone" in wrong.stderr


def test_vae_training_uses_lpips_when_its_weights_are_present(trained_vae, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    checkpoints = tmp_path / "torch_home/hub/checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(torchvision.models.alexnet().state_dict(), checkpoints / "alexnet-owt-7be5be79.pth")
    result = run_cli("training/train_vae.py", "--data_dir", trained_vae / "data", "--output_dir", tmp_path / "vae",
                     "--preset", "tiny", "--device", "cpu", "--perceptual_weight", "0.5")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "vae/logs/metrics.jsonl").read_text().splitlines()]
    assert all("lpips" in r for r in records if "loss" in r)


def test_recipe_dry_run_prints_the_command(tmp_path):
    data = tmp_path / "mydata"
    write_dataset(data, SimulationSettings(num_users=2, images_per_user=1, resolution=16), progress=False)
    result = run_cli("train_celeba_standard.py", "--data_dir", data, "--dry_run", "--max_train_steps", 7)
    assert result.returncode == 0, result.stderr
    command = result.stdout.splitlines()[-1]
    assert "training/train_vae.py" in command and f"--data_dir {data}" in command
    for flag in ("--kl_weight 1e-4", "--perceptual_weight 1.0", "--freq_weight 0.1", "--resolution 64",
                 "--max_train_steps 7"):
        assert flag in command
    assert "device: CPU" in result.stdout
    assert not (tmp_path / "outputs").exists()


def test_vae_identity_benchmark_runs(trained_vae, tmp_path):
    out = tmp_path / "identity.json"
    result = run_cli("benchmarks/vae_identity.py", "--vae_path", trained_vae / "vae" / "final_model", "--preset", "tiny",
                     "--max_train_steps", 3, "--seeds", 2, "--device", "cpu", "--out", out)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(out.read_text())
    assert numbers["num_users"] == 3 and numbers["test_images"] == 6 and numbers["classifier"]["resolution"] == 16
    assert len(numbers["real_test_accuracy"]) == len(numbers["reconstruction_accuracy"]) == 2
    assert all(0.0 <= a <= 1.0 for a in numbers["real_test_accuracy"] + numbers["reconstruction_accuracy"])
    assert "kept (target >= 90%)" in result.stdout


def test_vae_throughput_benchmark_reports_speed_and_memory(tmp_path):
    out = tmp_path / "speed.json"
    result = run_cli("benchmarks/vae_throughput.py", "--preset", "tiny", "--device", "cpu", "--steps", 2,
                     "--disc_weight", 0.5, "--out", out)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(out.read_text())
    assert numbers["resolution"] == 32 and numbers["batch_size"] == 4 and numbers["disc_weight"] == 0.5
    assert numbers["images_per_second"] > 0 and numbers["peak_memory_gb"] > 0
    expected_hours = 50 * 4650 / numbers["images_per_second"] / 3600
    assert numbers["implied_hours"] == pytest.approx(expected_hours)
    assert "images/s" in result.stdout and "peak memory" in result.stdout


def test_stage_profile_splits_each_step_into_phases(tmp_path):
    out = tmp_path / "profile.json"
    result = run_cli("benchmarks/stage_profile.py", "--preset", "tiny", "--device", "cpu", "--steps", 1, "--out", out)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["stage"].split(" (")[0] for row in rows] == ["VAE", "diffusion", "generation", "evaluation classifiers"]
    for row in rows[:2]:  # a training step does all three, and the hooks see each of them
        assert all(row["phases"][name] > 0 for name in ("forward", "backward", "optimiser"))
    assert rows[0]["phases"]["data"] > 0 and rows[0]["steps"] == 4 and rows[1]["steps"] == 4
    # tiny generation: 4 images of each of 31 users in batches of 64, 4 sampler steps each, forward passes only
    assert rows[2]["stage"] == "generation (124 images)" and rows[2]["steps"] == 2 * 4
    assert rows[2]["phases"]["forward"] > 0 and rows[2]["phases"]["backward"] == 0
    # tiny evaluation: 4 rows x 2 seeds at 'all' (20 steps) and at 2 per user (its floor, 5), one VAE classifier
    # (20) and one on generated images (5): 18 trainings
    assert rows[3]["stage"] == "evaluation classifiers (18 trainings)" and rows[3]["steps"] == 8 * 20 + 8 * 5 + 20 + 5
    for row in rows:  # the work of a step, and the time it would take at the machine's matrix-product peak
        assert row["gflop_per_step"] > 0 and row["peak_gflops"] > 0
        assert row["floor_minutes"] == pytest.approx(row["gflop_per_step"] * row["steps"]
                                                     / (row["peak_gflops"] * row["parallel"]) / 60)
        assert row["floor_minutes"] < row["implied_minutes"]
    assert "| VAE |" in result.stdout and "implied" in result.stdout and "| **all** |" in result.stdout
