"""Both trainers under `torchrun --nproc_per_node 2` on the CPU (gloo): one shard per rank,
files written once, resume with two processes."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

# Each rank's first draws once start_run (which both trainers call) has run.
NOISE_PER_RANK = """
import sys
sys.path.insert(0, {repo!r})
import torch
from utils.training import make_accelerator, start_run

accelerator = make_accelerator("cpu", "no", 1, "none", {out!r})
torch.manual_seed(0)
start_run(accelerator, {out!r}, None, seed=0)
with open({here!r} + f"/noise_{{accelerator.process_index}}.json", "w") as f:  # own file: ranks share one stdout
    f.write(str(torch.randn(4).tolist()))
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), *map(str, args)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="", OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def logged_steps(run_dir):
    """Steps of the training-loss records (validation adds its own records)."""
    records = [json.loads(line) for line in (run_dir / "logs/metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def two_process_vae(tiny_generator, tmp_path_factory):
    """A two-process VAE run of 4 steps, resumed from its step-2 checkpoint in a copy of its
    folder (as after a crash there); the uninterrupted run is `straight` beside it."""
    root = tmp_path_factory.mktemp("ddp")
    straight, out = root / "straight", root / "vae"
    first = torchrun("training/train_vae.py", "--data_dir", tiny_generator / "data", "--output_dir", straight,
                     "--preset", "tiny", "--device", "cpu", "--max_train_steps", 4)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "x 2 processes" in first.stdout and first.stdout.count("train_vae: preset tiny") == 1
    shutil.copytree(straight, out)
    shutil.rmtree(out / "final_model")
    shutil.rmtree(out / "checkpoints/checkpoint-000004")
    resumed = torchrun("training/train_vae.py", "--data_dir", tiny_generator / "data", "--output_dir", out,
                       "--preset", "tiny", "--device", "cpu", "--max_train_steps", 4, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "checkpoint-000002" in resumed.stdout
    return out


def test_vae_trains_and_resumes_with_two_processes(two_process_vae):
    config = json.loads((two_process_vae / "config.json").read_text())
    assert config["num_processes"] == 2 and config["effective_batch_size"] == 2 * config["batch_size"]
    assert logged_steps(two_process_vae) == [1, 2, 3, 4]  # one line per step: rank 0 alone logs
    assert sorted(p.name for p in (two_process_vae / "checkpoints").iterdir()) == ["checkpoint-000002", "checkpoint-000004"]
    for checkpoint in (two_process_vae / "checkpoints").iterdir():  # both ranks' RNG states in every checkpoint
        assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert (two_process_vae / "final_model/diffusion_pytorch_model.safetensors").is_file()
    assert not list(two_process_vae.rglob("*.partial*"))


def test_every_rank_draws_its_own_noise(tmp_path):
    script = tmp_path / "noise.py"
    script.write_text(NOISE_PER_RANK.format(repo=str(REPO_ROOT), out=str(tmp_path / "run"), here=str(tmp_path)))
    result = torchrun(script)
    assert result.returncode == 0, result.stderr[-3000:]
    noise = {p.stem: p.read_text() for p in tmp_path.glob("noise_*.json")}
    assert set(noise) == {"noise_0", "noise_1"} and noise["noise_0"] != noise["noise_1"]
    torch_alone = subprocess.run([sys.executable, "-c", "import torch; torch.manual_seed(0); print(torch.randn(4).tolist())"],
                                 capture_output=True, text=True)
    assert noise["noise_0"] == torch_alone.stdout.strip()  # rank 0 goes on with the single-process stream


def test_a_resumed_two_process_run_equals_an_uninterrupted_one(two_process_vae):
    # Both ranks' random streams come back from the checkpoint; validation (main process only) draws from none.
    name = "final_model/diffusion_pytorch_model.safetensors"
    assert (two_process_vae / name).read_bytes() == (two_process_vae.parent / "straight" / name).read_bytes()


def test_diffusion_trains_with_two_processes(tiny_generator, two_process_vae, tmp_path):
    out = tmp_path / "diffusion"
    result = torchrun("training/train_diffusion.py", "--vae_path", two_process_vae / "final_model", "--data_dir",
                      tiny_generator / "data", "--output_dir", out, "--preset", "tiny", "--device", "cpu",
                      "--max_train_steps", 3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert logged_steps(out) == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["effective_batch_size"] == 8
    assert (out / "final_model/model_index.json").is_file()
    shutil.rmtree(out)
