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
    out = tmp_path_factory.mktemp("ddp") / "vae"
    first = torchrun("training/train_vae.py", "--data_dir", tiny_generator / "data", "--output_dir", out,
                     "--preset", "tiny", "--device", "cpu", "--max_train_steps", 2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "x 2 processes" in first.stdout and first.stdout.count("train_vae: preset tiny") == 1
    resumed = torchrun("training/train_vae.py", "--data_dir", tiny_generator / "data", "--output_dir", out,
                       "--preset", "tiny", "--device", "cpu", "--max_train_steps", 4, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
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


def test_diffusion_trains_with_two_processes(tiny_generator, two_process_vae, tmp_path):
    out = tmp_path / "diffusion"
    result = torchrun("training/train_diffusion.py", "--vae_path", two_process_vae / "final_model", "--data_dir",
                      tiny_generator / "data", "--output_dir", out, "--preset", "tiny", "--device", "cpu",
                      "--max_train_steps", 3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert logged_steps(out) == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["effective_batch_size"] == 8
    assert (out / "final_model/generator.json").is_file()
    shutil.rmtree(out)
