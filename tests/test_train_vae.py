import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, run_interrupted
from utils.gait_simulator import SimulationSettings, write_dataset

SCRIPT = "training/train_vae.py"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "sim"
    write_dataset(folder, SimulationSettings(num_users=3, images_per_user=10, resolution=32), progress=False)
    return folder


def train(data, out, *extra):
    return run_cli(SCRIPT, "--data_dir", data, "--output_dir", out, "--preset", "tiny", "--device", "cpu", *extra)


def test_tiny_run_writes_a_loadable_model(tiny_data, tmp_path):
    from diffusers import AutoencoderKL

    result = train(tiny_data, tmp_path / "run")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    for name in ("config.json", "dataset_manifest.json", "logs/metrics.jsonl", "logs/curves.png",
                 "samples/step-000004.png", "final_model/config.json", "final_model/latent_stats.json",
                 "final_model/dataset_manifest.json"):
        assert (run / name).exists(), name
    vae = AutoencoderKL.from_pretrained(run / "final_model")
    stats = json.loads((run / "final_model/latent_stats.json").read_text())
    assert vae.config.scaling_factor == pytest.approx(1 / stats["std"])
    assert vae.config.scaling_factor != pytest.approx(0.18215)
    config = json.loads((run / "config.json").read_text())
    assert config["resolution"] == 32 and config["preset"] == "tiny" and config["effective_batch_size"] == 4
    records = [json.loads(line) for line in (run / "logs/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert any("val_psnr" in r for r in records)
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["checkpoint-000002", "checkpoint-000004"]


def test_learning_rate_warms_up_then_follows_a_cosine_per_step(tiny_data, tmp_path):
    result = train(tiny_data, tmp_path / "run", "--max_train_steps", "6", "--warmup_steps", "2", "--learning_rate", "0.01")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "run/logs/metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r]
    # After step k the scheduler has advanced k times: warmup 0.005, 0.01, then cosine over 4 steps.
    expected = [0.005, 0.01, 0.01 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 1 / 4)).item()),
                0.005, 0.01 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 3 / 4)).item()), 0.0]
    assert lrs == pytest.approx(expected, abs=1e-9)


DISCRIMINATOR = ["--disc_weight", "0.5", "--disc_start", "3", "--disc_channels", "8", "--disc_layers", "2"]


@pytest.mark.floors
@pytest.mark.parametrize("extra", [[], DISCRIMINATOR], ids=["vae", "vae+discriminator"])
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tiny_data, tmp_path, extra):
    # 21 train images, batch 4: 5 steps per epoch, so the run resumes inside epoch 1.
    steps = ["--max_train_steps", "9", "--checkpointing_steps", "100", *extra]
    straight = train(tiny_data, tmp_path / "straight", *steps)
    assert straight.returncode == 0, straight.stderr

    # Ctrl-C during step 7: the handler saves step 7 and exits 130, then the same command
    # with --resume_from_checkpoint latest finishes the run.
    interrupted = run_interrupted(SCRIPT, "--data_dir", tiny_data, "--output_dir", tmp_path / "resumed", "--preset", "tiny",
                                  "--device", "cpu", *steps, step=7)
    assert interrupted.returncode == 130, interrupted.stderr
    assert "interrupted: saved step 7" in interrupted.stderr
    assert (tmp_path / "resumed/checkpoints/checkpoint-000007").is_dir()
    assert not (tmp_path / "resumed/final_model").exists()

    resumed = train(tiny_data, tmp_path / "resumed", *steps, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a = load_file(tmp_path / "straight/final_model/diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed/final_model/diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    records = [json.loads(line) for line in (tmp_path / "resumed/logs/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6, 8, 9]  # step 7 was interrupted before logging
    if extra:  # the discriminator starts after step 3 (0-based step counter >= 3)
        assert [r["step"] for r in records if "d_loss" in r] == [4, 5, 6, 8, 9]


def test_hinge_loss_known_values():
    from utils.losses import discriminator_hinge_loss

    assert discriminator_hinge_loss(torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -2.0)).item() == 0.0
    assert discriminator_hinge_loss(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)).item() == 1.0
    assert discriminator_hinge_loss(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)).item() == 1.5


def test_adversarial_weight_is_adaptive_and_leaves_the_discriminator_alone():
    from utils.losses import adversarial_terms
    from utils.vae import PatchDiscriminator

    torch.manual_seed(0)
    discriminator = PatchDiscriminator(channels=8, layers=2)
    last_layer = torch.nn.Parameter(torch.randn(3, 3, 3, 3))
    source = torch.randn(2, 3, 32, 32)
    reconstructions = torch.nn.functional.conv2d(source, last_layer, padding=1)
    target = torch.randn(2, 3, 32, 32)
    loss = (reconstructions - target).abs().mean()
    one = adversarial_terms(discriminator, reconstructions, loss, last_layer, disc_weight=0.5)
    ten = adversarial_terms(discriminator, reconstructions, 10 * loss, last_layer, disc_weight=0.5)
    # Ten times the reconstruction gradient -> ten times the adversarial weight.
    assert ten["adv_weight"].item() == pytest.approx(10 * one["adv_weight"].item(), rel=1e-4)
    (one["adv_weight"] * one["g_adv"]).backward()
    assert last_layer.grad is not None and last_layer.grad.abs().sum() > 0
    assert all(p.grad is None and p.requires_grad for p in discriminator.parameters())


@pytest.mark.parametrize("has_bf16_units, expected", [(True, "bf16"), (False, "no")])
def test_auto_precision_on_a_cpu_uses_bf16_only_where_it_is_native(monkeypatch, has_bf16_units, expected):
    from utils import training

    monkeypatch.setattr(training, "cpu_computes_bf16", lambda: has_bf16_units)
    assert training.resolve_precision("auto", cpu=True) == expected
    assert [training.resolve_precision(c, cpu=True) for c in ("no", "bf16", "fp16")] == ["no", "bf16", "fp16"]


def test_existing_run_needs_resume_flag(tiny_data, tmp_path):
    assert train(tiny_data, tmp_path / "run").returncode == 0
    again = train(tiny_data, tmp_path / "run")
    assert again.returncode == 2 and "--resume_from_checkpoint latest" in again.stderr


def test_dry_run_prints_the_resolved_configuration(tiny_data, tmp_path):
    result = train(tiny_data, tmp_path / "run", "--dry_run", "--batch_size", "2")
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["batch_size"] == 2  # the user's value wins over the preset's 4
    assert config["resolution"] == 32 and config["block_out_channels"] == [8, 16]
    assert "batch_size" not in config["preset_filled"] and "resolution" in config["preset_filled"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resolution", "33"], "multiple of 2"),
        (["--block_out_channels", "8", "10"], "norm_num_groups"),
        (["--perceptual_weight", "1.0"], "install_lpips.py"),
        (["--perceptual_weight", "lots"], "--perceptual_weight"),
        (["--mixed_precision", "fp16"], "GPU"),
    ],
)
def test_bad_input_exits_2(tiny_data, tmp_path, extra, message, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # no LPIPS backbone here
    result = run_cli(SCRIPT, "--data_dir", tiny_data, "--output_dir", tmp_path / "run", "--preset", "tiny",
                     "--device", "cpu", *extra)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "final_model").exists()


def test_missing_data_folder_exits_2(tmp_path):
    result = train(tmp_path / "nowhere", tmp_path / "run")
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_report_to_a_missing_tracker_exits_2(tiny_data, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    result = train(tiny_data, tmp_path / "run", "--report_to", "wandb")
    assert result.returncode == 2 and "pip install wandb" in result.stderr


def test_report_to_tensorboard_writes_event_files(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    result = train(tiny_data, tmp_path / "run", "--report_to", "tensorboard")
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))


def test_unset_precision_follows_accelerate_launch(monkeypatch):
    # accelerate launch passes its --mixed_precision (or its config file's) on in this variable.
    from utils.vae import resolve_vae_config

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_vae_config({"preset": "tiny", "device": "cpu"}).mixed_precision == "no"  # the preset's
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_vae_config({"preset": "tiny", "device": "cpu"}).mixed_precision == "bf16"
    assert resolve_vae_config({"preset": "tiny", "device": "cpu", "mixed_precision": "no"}).mixed_precision == "no"
