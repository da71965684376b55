"""run_pipeline.py, the main job, at the tiny preset."""

import json
import shutil

import pytest

import run_pipeline
from conftest import run_cli
from utils.data_loader import DatasetManifest

STAGES = ["data", "manifest", "vae", "check_vae", "diffusion", "generate", "evaluate"]


@pytest.mark.floors
def test_tiny_pipeline_runs_every_stage_then_skips_what_is_complete(tmp_path):
    out = tmp_path / "pipeline"
    first = run_cli("run_pipeline.py", "--preset", "tiny", "--output_dir", out, "--device", "cpu")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    record = json.loads((out / "pipeline.json").read_text())
    assert [s["name"] for s in record["stages"]] == STAGES and not any(s["skipped"] for s in record["stages"])
    assert sorted(p.name for p in (out / "data").iterdir() if p.is_dir()) == ["ID_1", "ID_2", "ID_3"]
    report = (out / "report.md").read_text()
    assert report.splitlines()[2].startswith("With all their real train images (")  # the users' case opens it
    for heading in ("## Stage 1: VAE", "## Stage 2: diffusion", "## Generation", "## Evaluation"):
        assert heading in report
    for picture in ("vae_check/vae_check.png", "generated/grid.png", "evaluation/augmentation_gain.png"):
        assert f"]({picture})" in report and (out / picture).is_file()
    assert "of the identity survives the VAE" in report
    assert "Held-out loss (val split) lowest at step " in report and "of 4 steps trained" in report
    assert "[stage 7/7 evaluate] done in" in first.stdout
    # The stage-0 manifest is the split of every model the pipeline trained.
    manifest = DatasetManifest.load(out / "dataset_manifest.json")
    for folder in ("vae/final_model", "diffusion/final_model", "evaluation/classifier"):
        assert manifest.split_mismatch(DatasetManifest.load(out / folder)) is None, folder

    # Another budget in the same folder would reuse models trained on other data: refused.
    budget = run_cli("run_pipeline.py", "--preset", "tiny", "--output_dir", out, "--device", "cpu",
                     "--train_images_per_user", 3)
    assert budget.returncode == 2 and "holds a run with other settings" in budget.stderr
    strength = run_cli("run_pipeline.py", "--preset", "tiny", "--output_dir", out, "--device", "cpu", "--strength", 0.5)
    assert strength.returncode == 2 and "strength 1.0" in strength.stderr
    steps = run_cli("run_pipeline.py", "--preset", "tiny", "--output_dir", out, "--device", "cpu",
                    "--diffusion_steps", 8)
    assert steps.returncode == 2 and "diffusion_steps not given" in steps.stderr

    # A lost evaluation is redone alone; everything before it is skipped.
    shutil.rmtree(out / "evaluation")
    again = run_cli("run_pipeline.py", "--preset", "tiny", "--output_dir", out, "--device", "cpu")
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = [s["name"] for s in json.loads((out / "pipeline.json").read_text())["stages"] if s["skipped"]]
    assert skipped == STAGES[:-1]
    assert "[stage 3/7 vae] already complete" in again.stdout


def test_diffusion_steps_and_guidance_reach_the_diffusion_stage(tmp_path):
    """Only the diffusion stage is told; the model stores the guidance, and generation reads it from there."""
    def diffusion_command(*argv):
        args = run_pipeline.parse_args(["--preset", "tiny", *argv])
        return {name: command for name, _, _, command in run_pipeline.stages(args, tmp_path, tmp_path)}["diffusion"]

    given = diffusion_command("--diffusion_steps", "9600", "--guidance_scale", "2")
    assert given[-4:] == ["--max_train_steps", "9600", "--guidance_scale", "2.0"]
    assert "--max_train_steps" not in diffusion_command() and "--guidance_scale" not in diffusion_command()


def test_a_run_interrupted_after_two_stages_keeps_its_settings_and_times(tmp_path, monkeypatch):
    """Ctrl-C in the VAE stage: pipeline.json already holds the settings and the finished stages'
    times, so resuming with another --strength is refused instead of mixing two runs' models."""
    out = tmp_path / "pipeline"
    real_run = run_pipeline.subprocess.run

    def interrupt_the_vae(command, **kwargs):
        if "training/train_vae.py" in command:
            raise KeyboardInterrupt
        return real_run(command, **kwargs)

    monkeypatch.setattr(run_pipeline.subprocess, "run", interrupt_the_vae)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline.main(run_pipeline.parse_args(["--preset", "tiny", "--output_dir", str(out), "--device", "cpu"]))
    monkeypatch.undo()  # the resumed run below goes through the real subprocess.run
    record = json.loads((out / "pipeline.json").read_text())
    assert [s["name"] for s in record["stages"]] == ["data", "manifest"] and record["finished"] is None
    assert all(s["seconds"] > 0 for s in record["stages"]) and record["strength"] == 1.0
    resumed = run_cli("run_pipeline.py", "--preset", "tiny", "--output_dir", out, "--device", "cpu", "--strength", 0.5)
    assert resumed.returncode == 2 and "strength 1.0" in resumed.stderr and "Traceback" not in resumed.stderr
    assert not (out / "vae").exists()


def test_an_impossible_strength_exits_2(tmp_path):
    result = run_cli("run_pipeline.py", "--strength", 0, "--output_dir", tmp_path / "out")
    assert result.returncode == 2 and "--strength must be in (0, 1]" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_data_dir_exits_2(tmp_path):
    result = run_cli("run_pipeline.py", "--data_dir", tmp_path / "nowhere", "--output_dir", tmp_path / "out")
    assert result.returncode == 2 and "nowhere" in result.stderr and "Traceback" not in result.stderr


def test_recordings_split_by_group_with_a_fixed_test_folder(tmp_path):
    """A user's own data: windows of recordings, split by recording, and a separate test folder."""
    data, test_dir = tmp_path / "walks", tmp_path / "held_out"
    made = run_cli("-m", "utils.gait_simulator", "--output_dir", data, "--num_users", 3, "--images_per_user", 16,
                   "--windows_per_recording", 4, "--resolution", 32)
    assert made.returncode == 0, made.stderr
    for user in ("ID_1", "ID_2", "ID_3"):  # the last recording of each user is the lab's fixed test set
        (test_dir / user).mkdir(parents=True)
        for path in (data / user).glob("*_rec003_*.png"):
            path.rename(test_dir / user / path.name)
    out = tmp_path / "pipeline"
    result = run_cli("run_pipeline.py", "--preset", "tiny", "--data_dir", data, "--group_pattern", r"(.*)_\d+\.png$",
                     "--test_dir", test_dir, "--output_dir", out, "--device", "cpu")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = DatasetManifest.load(out / "dataset_manifest.json")
    assert manifest.test_dir == str(test_dir) and manifest.grouping == "pattern"
    assert manifest.files(["test"]) == {f"ID_{u}/ID_{u}_rec003_{w:03d}.png" for u in (1, 2, 3) for w in range(4)}
    for folder in ("vae/final_model", "diffusion/final_model", "evaluation/classifier"):
        assert manifest.split_mismatch(DatasetManifest.load(out / folder)) is None, folder
    report = json.loads((out / "evaluation/report.json").read_text())
    assert report["counts"]["test"] == 12 and report["split"]["test_dir"] == str(test_dir)
    assert not report["leak_check"]["flagged"]
    assert "leak check: 0 of 12 test images" in result.stdout and (out / "leak_check.png").is_file()
    assert "Split by group (--group_pattern" in (out / "report.md").read_text()
