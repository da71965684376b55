"""Stage 2 as users run it: tiny VAE -> tiny diffusion through the command line."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, run_interrupted, write_image
from utils.condition_encoder import UserConditionEncoder, drop_conditions
from utils.gait_simulator import SimulationSettings, write_dataset

SCRIPT = "training/train_diffusion.py"


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    write_dataset(root / "data", SimulationSettings(num_users=3, images_per_user=10, resolution=32), progress=False)
    result = run_cli("training/train_vae.py", "--data_dir", root / "data", "--output_dir", root / "vae",
                     "--preset", "tiny", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return root


def train(stage1, out, *extra, data=None):
    return run_cli(SCRIPT, "--data_dir", data or stage1 / "data", "--vae_path", stage1 / "vae/final_model",
                   "--output_dir", out, "--preset", "tiny", "--device", "cpu", *extra)


def metric_steps(run):
    records = [json.loads(line) for line in (run / "logs/metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def generator_run(stage1, tmp_path_factory):
    run = tmp_path_factory.mktemp("generator") / "run"
    result = train(stage1, run)
    assert result.returncode == 0, result.stderr
    return run


@pytest.mark.floors
def test_tiny_run_writes_a_generator_that_reloads_alone(generator_run, tmp_path):
    from utils.pipeline import UserDiffusionPipeline, load_generator

    run = generator_run
    for name in ("config.json", "dataset_manifest.json", "latent_cache/train.safetensors", "samples/step-000004.png",
                 "logs/curves.png", "final_model/model_index.json", "final_model/condition_encoder.pt",
                 "final_model/unet/config.json", "final_model/condition_encoder/config.json",
                 "final_model/scheduler/scheduler_config.json", "final_model/vae/config.json",
                 "final_model/dataset_manifest.json", "final_model/README.md"):
        assert (run / name).exists(), name
    assert metric_steps(run) == [1, 2, 3, 4]
    index = json.loads((run / "final_model/model_index.json").read_text())
    assert index["_class_name"] == "UserDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["condition_encoder"] == ["utils.condition_encoder", "UserConditionEncoder"]
    assert index["label_map"] == {"ID_1": 0, "ID_2": 1, "ID_3": 2} and index["null_index"] == 3
    assert index["latent_shape"] == [4, 16, 16] and index["resolution"] == 32 and index["sampler"] == "dpmsolver_sde"
    card = (run / "final_model/README.md").read_text()
    assert "library_name: diffusers" in card and "3 users (ID_1 ID_2 ID_3)" in card and "4 steps" in card
    assert "Not evaluated yet" in card

    moved = tmp_path / "elsewhere"  # nothing outside the folder is needed
    shutil.copytree(run / "final_model", moved)
    pipe = load_generator(moved)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(users=["ID_1", 3], seeds=[5, 6], num_inference_steps=3, output_type="pt")
    assert out.users == ["ID_1", "ID_3"] and out.seeds == [5, 6]
    assert out.images.shape == (2, 3, 32, 32) and out.images.min() >= -1 and out.images.max() <= 1
    again = pipe(users=["ID_3"], seeds=[6], num_inference_steps=3, output_type="pt").images
    assert torch.allclose(again[0], out.images[1], atol=1e-5)  # (user, seed) fixes the image whatever the batch
    drawn = pipe(users=[2], num_images_per_user=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert len(drawn.images) == 2 and drawn.images[0].size == (32, 32) and len(set(drawn.seeds)) == 2

    # diffusers' own loading and saving round-trip: the same images from a re-saved folder.
    plain = UserDiffusionPipeline.from_pretrained(moved)
    plain.set_progress_bar_config(disable=True)
    resaved = tmp_path / "resaved"
    plain.use_scheduler("ddim").save_pretrained(resaved)
    back = UserDiffusionPipeline.from_pretrained(resaved)
    back.set_progress_bar_config(disable=True)
    assert back.config.sampler == "ddim" and back.scheduler.config == plain.scheduler.config
    torch.testing.assert_close(back(users=[3], seeds=[6], num_inference_steps=3, output_type="pt").images,
                               plain(users=[3], seeds=[6], num_inference_steps=3, output_type="pt").images)
    torch.testing.assert_close(plain.use_scheduler("dpmsolver_sde")(users=[3], seeds=[6], num_inference_steps=3,
                                                                  output_type="pt").images, again)

    state = torch.load(moved / "condition_encoder.pt", weights_only=True)
    plain = UserConditionEncoder(**{k: v for k, v in pipe.condition_encoder.config.items() if not k.startswith("_")})
    plain.load_state_dict(state)
    # The same weights exactly; the forward passes only to rounding (a module in training mode and one
    # in eval mode may take other kernels on some CPUs).
    for name, tensor in pipe.condition_encoder.state_dict().items():
        assert torch.equal(plain.state_dict()[name], tensor), name
    torch.testing.assert_close(plain(torch.tensor([1])), pipe.condition_encoder(torch.tensor([1])), rtol=1e-5, atol=1e-6)


LOAD_WITH_DIFFUSERS = """
import sys, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], custom_pipeline="utils/pipeline.py", trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
images = pipe(users=["ID_3"], seeds=[6], num_inference_steps=3, output_type="pt").images
torch.save(images, sys.argv[2])
print(type(pipe).__name__)
"""


@pytest.mark.floors
def test_diffusers_loads_the_folder_with_the_projects_pipeline_file(generator_run, tmp_path):
    from utils.pipeline import load_generator

    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}  # diffusers copies the pipeline file there
    result = run_cli("-c", LOAD_WITH_DIFFUSERS, generator_run / "final_model", tmp_path / "images.pt", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("UserDiffusionPipeline")
    pipe = load_generator(generator_run / "final_model")
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(users=["ID_3"], seeds=[6], num_inference_steps=3, output_type="pt").images
    torch.testing.assert_close(torch.load(tmp_path / "images.pt", weights_only=True), expected)


def test_a_folder_of_the_older_layout_still_loads(generator_run, stage1, tmp_path):
    """Before model_index.json: generator.json beside the parts, the stage-1 folder copied as vae/."""
    from utils.pipeline import load_generator

    old = tmp_path / "old"
    shutil.copytree(generator_run / "final_model", old)
    index = json.loads((old / "model_index.json").read_text())
    (old / "model_index.json").unlink()
    (old / "generator.json").write_text(json.dumps({
        "users": list(index["label_map"]), "label_map": index["label_map"], "num_users": 3, "null_index": 3,
        "resolution": 32, "latent_shape": [4, 16, 16], "scaling_factor": index["scaling_factor"],
        "prediction_type": "epsilon", "guidance_scale": index["guidance_scale"], "num_inference_steps": 4, "ema": False}))
    shutil.rmtree(old / "vae")
    shutil.copytree(stage1 / "vae/final_model", old / "vae")
    pipe = load_generator(old, scheduler="ddim")
    pipe.set_progress_bar_config(disable=True)
    new = load_generator(generator_run / "final_model", scheduler="ddim")
    new.set_progress_bar_config(disable=True)
    torch.testing.assert_close(pipe(users=[2], seeds=[1], num_inference_steps=2, output_type="pt").images,
                               new(users=[2], seeds=[1], num_inference_steps=2, output_type="pt").images)


def test_push_to_hub_offline_exits_2_before_training(stage1, tmp_path):
    result = train(stage1, tmp_path / "run", "--push_to_hub", "someone/model")
    assert result.returncode == 2 and "HF_HUB_OFFLINE" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_class_embedding_puts_the_user_into_every_resnet_block(stage1, tmp_path):
    from utils.pipeline import UserDiffusionPipeline

    run = tmp_path / "run"
    result = train(stage1, run, "--class_embedding")
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "config.json").read_text())["class_embedding"] is True
    pipe = UserDiffusionPipeline.from_pretrained(run / "final_model")
    assert pipe.unet.config.num_class_embeds == 4  # 3 users + the null row of guidance
    pipe.set_progress_bar_config(disable=True)
    # One row of the class embedding changed: only that user's images change, the unconditional
    # pass (guidance 1 draws none) and the other users' do not.
    images = lambda: pipe(users=[1, 2], seeds=[0, 0], num_inference_steps=2, guidance_scale=1.0, output_type="pt").images
    before = images()
    with torch.no_grad():
        pipe.unet.class_embedding.weight[1] += 1.0
    after = images()
    assert torch.equal(before[0], after[0]) and not torch.allclose(before[1], after[1])


def test_by_default_the_embedding_scales_and_shifts_every_resnet_block(stage1, tmp_path):
    from utils.pipeline import UserDiffusionPipeline

    run = tmp_path / "run"
    result = train(stage1, run)
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "config.json").read_text())["scale_shift"] is True
    unet = UserDiffusionPipeline.from_pretrained(run / "final_model").unet
    assert unet.config.resnet_time_scale_shift == "scale_shift"
    block = unet.down_blocks[0].resnets[0]
    assert block.time_emb_proj.out_features == 2 * block.conv1.out_channels  # a scale and a shift per channel


@pytest.mark.floors
def test_resume_continues_and_reuses_the_latent_cache(stage1, tmp_path):
    run = tmp_path / "run"
    first = train(stage1, run, "--max_train_steps", 3, "--checkpointing_steps", 3)
    assert first.returncode == 0, first.stderr
    assert "encoding the train split" in first.stderr
    shutil.rmtree(run / "final_model")
    resumed = train(stage1, run, "--max_train_steps", 5, "--checkpointing_steps", 3, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "encoding the train split" not in resumed.stderr
    assert metric_steps(run) == [1, 2, 3, 4, 5]
    assert (run / "final_model/model_index.json").exists()


def test_resuming_with_another_architecture_exits_2_and_names_it(stage1, tmp_path):
    run = tmp_path / "run"
    assert train(stage1, run, "--max_train_steps", 2).returncode == 0
    other = train(stage1, run, "--max_train_steps", 4, "--attention_levels", 0, "--resume_from_checkpoint", "latest")
    assert other.returncode == 2, other.stderr
    assert "attention_levels 1 (now 0)" in other.stderr and "Traceback" not in other.stderr
    # A run from before --scale_shift existed had the additive embedding; its config.json does not say so.
    config = json.loads((run / "config.json").read_text())
    del config["scale_shift"]
    (run / "config.json").write_text(json.dumps(config))
    old = train(stage1, run, "--max_train_steps", 4, "--resume_from_checkpoint", "latest")
    assert old.returncode == 2 and "scale_shift False (now True)" in old.stderr and "Traceback" not in old.stderr


def test_latent_cache_is_rebuilt_when_the_data_change(stage1, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(stage1 / "data", data)
    run = tmp_path / "run"
    assert train(stage1, run, "--max_train_steps", 2, data=data).returncode == 0
    before = load_file(run / "latent_cache/train.safetensors")["mean"]
    manifest = json.loads((run / "dataset_manifest.json").read_text())
    user, names = next(iter(manifest["splits"]["train"].items()))
    write_image(data / user / names[0], size=(32, 32), seed=123)  # a train image changes
    shutil.rmtree(run / "final_model")
    again = train(stage1, run, "--max_train_steps", 3, "--resume_from_checkpoint", "latest", data=data)
    assert again.returncode == 0, again.stderr
    assert "changed" in again.stdout
    assert not torch.equal(load_file(run / "latent_cache/train.safetensors")["mean"], before)


def test_every_user_name_maps_to_its_training_row(tmp_path):
    """Users of unequal size, numbered out of order: the cache labels each latent with the
    row of its folder in the VAE's label map, and generation resolves names to that row."""
    from utils.data_loader import DatasetManifest

    data = tmp_path / "data"
    for u, (user, count) in enumerate((("user_10", 2), ("user_2", 9), ("user_3", 6))):
        for k in range(count):
            write_image(data / user / f"{k}.png", size=(32, 32), seed=100 * u + k)
    vae = run_cli("training/train_vae.py", "--data_dir", data, "--output_dir", tmp_path / "vae", "--preset", "tiny",
                  "--device", "cpu", "--batch_size", 2, "--max_train_steps", 2)
    assert vae.returncode == 0, vae.stderr
    run = tmp_path / "run"
    result = run_cli(SCRIPT, "--data_dir", data, "--vae_path", tmp_path / "vae/final_model", "--output_dir", run,
                     "--preset", "tiny", "--device", "cpu", "--batch_size", 2, "--max_train_steps", 2)
    assert result.returncode == 0, result.stderr
    manifest = DatasetManifest.load(run / "dataset_manifest.json")
    assert manifest.users == ["user_2", "user_3", "user_10"]
    cache = load_file(run / "latent_cache/train.safetensors")
    folders = [path.split("/")[0] for path, _ in manifest.samples("train")]
    assert "user_10" in folders
    assert cache["user_index"].tolist() == [manifest.label_map[folder] for folder in folders]
    info = json.loads((run / "final_model/model_index.json").read_text())
    generation = DatasetManifest.load(run / "final_model")
    for number, folder in (("10", "user_10"), ("2", "user_2"), ("3", "user_3")):
        assert info["label_map"][generation.resolve_user(number)] == manifest.label_map[folder]


def test_condition_dropout_selects_only_the_null_token():
    torch.manual_seed(0)
    users = torch.randint(0, 5, (20000,))
    dropped = drop_conditions(users, null_index=5, probability=0.25)
    changed = dropped != users
    assert set(dropped[changed].tolist()) == {5}
    assert torch.equal(dropped[~changed], users[~changed])
    assert 0.23 < changed.float().mean().item() < 0.27
    assert torch.equal(drop_conditions(users, 5, 0.0), users)


def test_attention_sits_on_the_lowest_resolution_levels():
    from utils.diffusion import build_unet

    def blocks(levels):
        unet = build_unet(4, 8, [8, 16, 16], 1, levels, 2, 8, 8)
        return [type(b).__name__ for b in unet.down_blocks], [type(b).__name__ for b in unet.up_blocks]

    assert blocks(1) == (["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
                         ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"])
    assert blocks(0) == (["DownBlock2D"] * 3, ["UpBlock2D"] * 3)
    assert blocks(3)[0] == ["CrossAttnDownBlock2D"] * 3


def test_heldout_loss_is_zero_for_an_oracle_and_one_for_a_zero_prediction():
    """Known answers: a denoiser that knows each user's clean latent recovers the noise
    exactly (loss 0); predicting zeros costs E[noise^2] = 1; every call draws the same."""
    from types import SimpleNamespace

    from utils.diffusion import build_noise_scheduler, heldout_loss

    scheduler = build_noise_scheduler(1000, "epsilon")
    clean = torch.randn(3, 4, 8, 8)
    cache = {"mean": clean[[0, 1, 2, 1]], "user_index": torch.tensor([0, 1, 2, 1])}
    config = SimpleNamespace(num_train_timesteps=1000, prediction_type="epsilon", snr_gamma=0.0)
    alphas = scheduler.alphas_cumprod

    def oracle(noisy, timesteps, users):
        a = alphas[timesteps].view(-1, 1, 1, 1)
        return (noisy - a.sqrt() * clean[users]) / (1 - a).sqrt()

    assert heldout_loss(oracle, scheduler, cache, config, "cpu", batch_size=5) < 1e-8
    zero = heldout_loss(lambda noisy, t, users: torch.zeros_like(noisy), scheduler, cache, config, "cpu")
    assert 0.9 < zero < 1.1
    assert heldout_loss(lambda noisy, t, users: torch.zeros_like(noisy), scheduler, cache, config, "cpu",
                        batch_size=3) == pytest.approx(zero)


def test_best_so_far_counts_the_measurements_after_the_lowest():
    from training.train_diffusion import best_so_far

    assert best_so_far([]) == (None, 0)
    assert best_so_far([3.0, 2.0, 2.5, 2.7]) == (1, 2)
    assert best_so_far([3.0, 2.0, 1.0]) == (2, 0)


def test_the_patience_stop_says_when_the_held_out_loss_diverged(tmp_path, monkeypatch, capsys):
    import contextlib
    from types import SimpleNamespace

    import training.train_diffusion as train_diffusion

    losses = iter([0.09, 0.17, 0.18, 0.9, 0.91])  # memorising (about twofold), then diverging (tenfold)
    monkeypatch.setattr(train_diffusion, "heldout_loss", lambda *args: next(losses))
    denoiser = torch.nn.Linear(1, 1)
    training = SimpleNamespace(denoiser=denoiser, noise_scheduler=None, swap_in_ema=lambda: None,
                               swap_out_ema=lambda: None)
    accelerator = SimpleNamespace(autocast=contextlib.nullcontext, device="cpu")
    config = SimpleNamespace(heldout_patience=2, use_ema=True)
    selection = train_diffusion.HeldoutSelection(accelerator, training, config, None, tmp_path, [])
    assert [selection(step)[1] for step in (1, 2, 3)] == [False, False, True]
    assert "diverged" not in capsys.readouterr().out
    selection = train_diffusion.HeldoutSelection(accelerator, training, config, None, tmp_path,
                                                 [{"step": 1, "heldout_loss": 0.09}])
    assert [selection(step)[1] for step in (2, 3)] == [False, True]
    assert "over four times that: the training diverged, try a lower --learning_rate" in capsys.readouterr().out


def test_final_model_keeps_the_weights_of_the_lowest_heldout_loss(generator_run):
    records = [json.loads(line) for line in (generator_run / "logs/metrics.jsonl").read_text().splitlines()]
    heldout = [(r["step"], r["heldout_loss"]) for r in records if "heldout_loss" in r]
    assert [step for step, _ in heldout] == [2, 4] and all(loss > 0 for _, loss in heldout)
    assert (generator_run / "latent_cache/val.safetensors").exists()
    best_step, best_loss = min(heldout, key=lambda pair: pair[1])
    assert f"weights of step {best_step}, the lowest held-out (val split) loss, {best_loss:.4f}, of 4 steps" in \
        (generator_run / "final_model/README.md").read_text()
    best = load_file(generator_run / "best/denoiser.safetensors")
    shipped = load_file(generator_run / "final_model/unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(best[f"unet.{name}"], value) for name, value in shipped.items())


@pytest.mark.parametrize("case", ["missing_vae", "not_a_vae", "other_users", "resolution", "attention_levels"])
def test_bad_input_exits_2(stage1, tmp_path, case):
    vae_path, data, extra = stage1 / "vae/final_model", stage1 / "data", []
    if case == "missing_vae":
        vae_path = tmp_path / "nothing"
    elif case == "not_a_vae":
        vae_path = stage1 / "vae"  # the run folder, not its final_model
    elif case == "other_users":
        data = tmp_path / "other"
        for user in ("alice", "bob"):
            write_image(data / user / "0.png", size=(32, 32))
    elif case == "resolution":
        extra = ["--resolution", "64"]
    else:
        extra = ["--attention_levels", "3"]  # the tiny UNet has 2 levels
    result = run_cli(SCRIPT, "--data_dir", data, "--vae_path", vae_path, "--output_dir", tmp_path / "run",
                     "--preset", "tiny", "--device", "cpu", *extra)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "final_model").exists()


def test_dry_run_shows_the_resolved_configuration(stage1, tmp_path):
    result = train(stage1, tmp_path / "run", "--dry_run", "--condition_dropout", 0.2, "--balance_users")
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["condition_dropout"] == 0.2 and config["resolution"] == 32 and config["use_ema"] is True
    assert config["balance_users"] is True
    assert config["latent_shape"] == [4, 16, 16] and "block_out_channels" in config["preset_filled"]
    assert not (tmp_path / "run").exists()


def test_stage2_benchmarks_run_on_tiny_models(stage1, tmp_path):
    speed = run_cli("benchmarks/latent_cache_speed.py", "--data_dir", stage1 / "data", "--preset", "tiny",
                    "--batch_size", 2, "--steps", 1, "--device", "cpu", "--out", tmp_path / "speed.json")
    assert speed.returncode == 0, speed.stderr
    numbers = json.loads((tmp_path / "speed.json").read_text())
    assert numbers["latent_shape"] == [4, 16, 16] and numbers["speedup"] > 0
    assert "steps/s" in speed.stdout
    memory = run_cli("benchmarks/diffusion_memory.py", "--preset", "tiny", "--batch_size", 2, "--latent_shape", 4, 8, 8,
                     "--device", "cpu", "--out", tmp_path / "memory.json")
    assert memory.returncode == 0, memory.stderr
    estimate = json.loads((tmp_path / "memory.json").read_text())
    assert estimate["activations_gb"] > 0 and estimate["peak_memory_gb"] > estimate["static_gb"] > 0
    assert estimate["fits_16gb"] is True


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(stage1, tmp_path):
    """Ctrl-C at step 6 (inside the second epoch), then the same command with
    --resume_from_checkpoint latest: the final UNet, encoder and EMA equal a straight run's."""
    steps = ["--max_train_steps", "7", "--checkpointing_steps", "100", "--validation_steps", "100"]
    straight = train(stage1, tmp_path / "straight", *steps)
    assert straight.returncode == 0, straight.stderr

    interrupted = run_interrupted(SCRIPT, "--data_dir", stage1 / "data", "--vae_path", stage1 / "vae/final_model",
                                  "--output_dir", tmp_path / "resumed", "--preset", "tiny", "--device", "cpu", *steps,
                                  step=6)
    assert interrupted.returncode == 130, interrupted.stderr
    assert (tmp_path / "resumed/checkpoints/checkpoint-000006").is_dir()

    resumed = train(stage1, tmp_path / "resumed", *steps, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr
    for part in ("unet", "condition_encoder"):
        a = load_file(tmp_path / f"straight/final_model/{part}/diffusion_pytorch_model.safetensors")
        b = load_file(tmp_path / f"resumed/final_model/{part}/diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (part, name)
