"""inference/generate.py as users run it, on a tiny stage-2 model."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from utils import training
from utils.cli import UsageError
from utils.sampling import inference_dtype

SCRIPT = "inference/generate.py"
FAST = ["--num_inference_steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def model(tiny_generator):
    return tiny_generator / "diffusion/final_model"


def three_paths(model):
    return ["--vae_path", model / "vae", "--unet_path", model / "unet",
            "--condition_encoder_path", model / "condition_encoder.pt", "--num_users", 3]


def test_writes_the_dataset_layout_and_a_manifest(model, tmp_path):
    out = tmp_path / "generated"
    result = run_cli(SCRIPT, "--model_path", model, "--user_ids", 1, "ID_3", "--num_images_per_user", 2,
                     "--output_dir", out, "--grid", "--seed", 7, *FAST)
    assert result.returncode == 0, result.stderr
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png") if p.name != "grid.png")
    # seed = --seed + 100000 * label + k: ID_1 has label 0, ID_3 label 2
    assert files == ["ID_1/ID_1_seed7.png", "ID_1/ID_1_seed8.png", "ID_3/ID_3_seed200007.png", "ID_3/ID_3_seed200008.png"]
    assert all(Image.open(out / f).size == (32, 32) for f in files)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(r["file"], r["seed"]) for r in manifest["images"]] == [(f, int(f.split("seed")[1][:-4])) for f in files]
    assert len(manifest["model"]["sha256"]) == 64 and manifest["arguments"]["seed"] == 7
    assert manifest["resolved"]["users"] == ["ID_1", "ID_3"] and manifest["resolved"]["num_inference_steps"] == 2
    assert manifest["resolved"]["dtype"] == "float32"
    assert (out / "grid.png").exists()


def test_same_arguments_same_files_in_both_command_forms(model, tmp_path):
    runs = {
        "a": ["--model_path", model],
        "b": ["--model_path", model],
        "three": three_paths(model),
    }
    for name, form in runs.items():
        result = run_cli(SCRIPT, *form, "--user_ids", "all", "--num_images_per_user", 1, "--output_dir", tmp_path / name,
                         "--batch_size", 2, *FAST)
        assert result.returncode == 0, result.stderr
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert [f.parts[0] for f in files] == ["ID_1", "ID_2", "ID_3"]  # `all`
    for f in files:
        assert (tmp_path / "b" / f).read_bytes() == (tmp_path / "a" / f).read_bytes(), f
        # The two load paths agree to float rounding: with some weights a pixel lands one level apart.
        a, three = (torch.from_numpy(np.asarray(Image.open(tmp_path / name / f))).int() for name in ("a", "three"))
        assert (a - three).abs().max() <= 1 and (a != three).float().mean() < 0.01, f


@pytest.mark.parametrize("case", ["unknown_user", "missing_part", "zero_images", "num_users", "not_empty", "both_forms"])
def test_bad_input_exits_2_and_writes_nothing(model, tmp_path, case):
    out = tmp_path / "generated"
    args = ["--model_path", model, "--user_ids", 1]
    expected = ""
    if case == "unknown_user":
        args, expected = ["--model_path", model, "--user_ids", 9], "valid users: ID_1 ID_2 ID_3"
    elif case == "missing_part":
        broken = tmp_path / "broken"
        shutil.copytree(model, broken)
        shutil.rmtree(broken / "unet")
        args, expected = ["--model_path", broken, "--user_ids", 1], "unet/config.json"
    elif case == "zero_images":
        args, expected = args + ["--num_images_per_user", 0], "--num_images_per_user"
    elif case == "num_users":
        args = three_paths(model)[:-1] + [5, "--user_ids", 1]
        expected = "trained on 3 users"
    elif case == "not_empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        expected = "not empty"
    else:
        args, expected = args + ["--unet_path", model / "unet"], "not both"
    result = run_cli(SCRIPT, *args, "--output_dir", out, *FAST)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    if case == "not_empty":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    else:
        assert not out.exists()


def test_auto_dtype_is_bf16_only_where_the_hardware_computes_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(training, "cpu_computes_bf16", lambda: True)
    assert inference_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(training, "cpu_computes_bf16", lambda: False)
    assert inference_dtype("auto", cpu) == torch.float32
    assert inference_dtype("bf16", cpu) == torch.bfloat16  # asked for: allowed, emulated
    with pytest.raises(UsageError, match="fp16 needs a GPU"):
        inference_dtype("fp16", cpu)


def test_overwrite_replaces_only_a_previous_output(model, tmp_path):
    out = tmp_path / "generated"
    first = run_cli(SCRIPT, "--model_path", model, "--user_ids", 2, "--num_images_per_user", 2, "--output_dir", out, *FAST)
    assert first.returncode == 0, first.stderr
    again = run_cli(SCRIPT, "--model_path", model, "--user_ids", 2, "--num_images_per_user", 1, "--output_dir", out, *FAST)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    replaced = run_cli(SCRIPT, "--model_path", model, "--user_ids", 2, "--num_images_per_user", 1, "--output_dir", out,
                       "--overwrite", *FAST)
    assert replaced.returncode == 0, replaced.stderr
    assert [p.name for p in (out / "ID_2").iterdir()] == ["ID_2_seed100000.png"]


def test_generation_speed_benchmark(model, tmp_path):
    trained = run_cli("benchmarks/generation_speed.py", "--model_path", model, "--schedulers", "dpmsolver", "ddim",
                      "--num_images", 2, "--batch_size", 2, "--device", "cpu", "--out", tmp_path / "trained.json")
    assert trained.returncode == 0, trained.stderr
    results = json.loads((tmp_path / "trained.json").read_text())["results"]
    assert [(r["scheduler"], r["steps"]) for r in results] == [("dpmsolver", 25), ("ddim", 50)]
    assert all(r["images_per_second"] > 0 for r in results)
    random = run_cli("benchmarks/generation_speed.py", "--preset", "tiny", "--num_users", 3, "--schedulers", "euler",
                     "--num_images", 1, "--device", "cpu")
    assert random.returncode == 0, random.stderr
    assert "images/s" in random.stdout


@pytest.mark.parametrize("scheduler", ["dpmsolver_sde", "ddpm"])
def test_an_image_does_not_depend_on_the_other_users_in_its_batch(model, tmp_path, scheduler):
    # Stochastic samplers draw their step noise from each image's own generator too.
    common = ["--model_path", model, "--num_images_per_user", 2, "--scheduler", scheduler, *FAST]
    alone = run_cli(SCRIPT, *common, "--user_ids", 2, "--batch_size", 1, "--output_dir", tmp_path / "alone")
    together = run_cli(SCRIPT, *common, "--user_ids", "all", "--batch_size", 6, "--output_dir", tmp_path / "all")
    assert alone.returncode == 0 and together.returncode == 0, alone.stderr + together.stderr
    for name in ("ID_2_seed100000.png", "ID_2_seed100001.png"):
        alone_pixels, together_pixels = (np.asarray(Image.open(tmp_path / d / "ID_2" / name)).astype(int)
                                         for d in ("alone", "all"))
        # The same noise, so the same image; kernels for another batch size round the last float bits
        # differently (about 1e-6), which can move a rare pixel by one level.
        assert np.abs(alone_pixels - together_pixels).max() <= 1
        assert (alone_pixels != together_pixels).mean() < 0.01


def test_image_to_image_starts_from_the_users_train_images(model, tiny_generator, tmp_path):
    from utils.data_loader import DatasetManifest

    manifest = DatasetManifest.load(model / "dataset_manifest.json")
    train = {path for path, _ in manifest.samples("train")}
    common = ["--model_path", model, "--user_ids", "all", "--num_images_per_user", 3, "--source_dir",
              tiny_generator / "data", "--batch_size", 4, "--device", "cpu", "--num_inference_steps", 4]
    runs = {}
    for strength in (0.25, 1.0):
        out = tmp_path / f"s{strength}"
        result = run_cli(SCRIPT, *common, "--strength", strength, "--output_dir", out)
        assert result.returncode == 0, result.stderr
        runs[strength] = json.loads((out / "manifest.json").read_text())
    records = runs[0.25]["images"]
    assert runs[0.25]["resolved"]["strength"] == 0.25
    for record in records:  # every source is a train image of the image's own user
        assert record["source"] in train and record["source"].split("/")[0] == record["user"]
    for user in ("ID_1", "ID_2", "ID_3"):  # a user's images start from distinct sources
        assert len({r["source"] for r in records if r["user"] == user}) == 3


def test_image_to_image_noises_the_source_to_the_level_of_its_first_step():
    from types import SimpleNamespace

    from diffusers import DDIMScheduler

    from utils.sampling import sample_latents

    calls = []

    class NoNoise(torch.nn.Module):
        """Predicts zero noise: DDIM then keeps x_t / sqrt(alpha_bar_t) of its first step to the end."""
        dtype = torch.float32
        config = SimpleNamespace(num_class_embeds=None)

        def forward(self, x, t, encoder_hidden_states, class_labels=None):
            calls.append(int(t))
            return SimpleNamespace(sample=torch.zeros_like(x))

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=True)
    start, seeds = torch.randn(2, 4, 8, 8), [3, 4]
    latents = sample_latents(NoNoise(), lambda users: torch.zeros(len(users), 1, 4), scheduler, torch.tensor([0, 1]),
                             seeds, (4, 8, 8), 1.0, 10, start_latents=start, strength=0.3)
    assert len(calls) == 3 and calls[0] == int(scheduler.timesteps[7])  # the last 30% of the 10 steps
    alpha_bar = scheduler.alphas_cumprod[calls[0]]
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    torch.testing.assert_close(latents, start + ((1 - alpha_bar) / alpha_bar).sqrt() * noise, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("args, expected", [
    (["--strength", "0.5"], "give --source_dir"),
    (["--strength", "0", "--source_dir", "x"], "--strength must be in (0, 1]"),
    (["--strength", "1.5", "--source_dir", "x"], "--strength must be in (0, 1]"),
])
def test_image_to_image_bad_strength_exits_2(model, tmp_path, args, expected):
    result = run_cli(SCRIPT, "--model_path", model, "--user_ids", 1, "--output_dir", tmp_path / "g", *args, *FAST)
    assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "g").exists()
